"""The tokenizer a GGUF carries: copied from the base model's own GGUF where the base model is an embedded one
(its `tokenizer.*` metadata verbatim: vocabulary, merges, pre-tokenizer, special ids, chat template), else
none (`tokenizer.ggml.model = none` and the vocabulary size: llama.cpp then runs on token ids)."""
from __future__ import annotations

from pathlib import Path

#: the GGUF metadata prefix of a tokenizer
PREFIX = "tokenizer."


def embedded_gguf(manifest: dict) -> Path | None:
    """The GGUF file an embedded base model was converted from, or None for any other base model."""
    from ..models import EMBEDDED, _gguf_path
    base = manifest.get("base_model") or {}
    e = EMBEDDED.get(str(base.get("name"))) if isinstance(base, dict) else None
    if e is None or base.get("file") != e.gguf:
        return None
    return _gguf_path(e)


def copy_tokenizer(writer, source: Path) -> int:
    """Copy every `tokenizer.*` key of `source` into `writer`; the number of tokens."""
    from gguf import GGUFReader, GGUFValueType
    reader = GGUFReader(source)
    n = 0
    for name, f in reader.fields.items():
        if not name.startswith(PREFIX):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = f.contents()
        writer.add_key_value(name, value, vtype, sub_type=sub)
        if name == "tokenizer.ggml.tokens":
            n = len(value)
    return n


def add_tokenizer(writer, manifest: dict, vocab_size: int) -> str:
    """Write the tokenizer metadata; says which one (for the command's report)."""
    src = embedded_gguf(manifest)
    if src is not None:
        n = copy_tokenizer(writer, src)
        return f"copied from {src.name} ({n} tokens)"
    writer.add_string("tokenizer.ggml.model", "none")
    return "none (the base model is not an embedded GGUF one; llama.cpp runs on token ids)"
