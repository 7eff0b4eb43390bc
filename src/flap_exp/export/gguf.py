"""`--to gguf`: any pruned model as one GGUF file for llama.cpp, per-layer widths included (gguf_layout.py).

Uniform models with attention and an MLP in every layer are written as llama.cpp's stock `llama`
architecture; any other as `deci` (per-layer head, k/v-head and feed-forward arrays). Tensor types: f32, f16
or q8_0 for matrices (norms and biases stay f32; q8_0 needs rows of a multiple of 32 values, else f16, as
llama.cpp's quantizer does). Only RoPE without scaling is written; other rope types are refused.
"""
from __future__ import annotations

import numpy as np
import torch

from ..atomic import atomic_file
from ..errors import FlapError
from ..persist import load_pruned
from .gguf_layout import LayerOut, plan_layers
from .gguf_vocab import add_tokenizer
from .request import ExportRequest
from .widths import Widths

#: GGUF `general.file_type` of each --gguf-type (llama.cpp's LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_Q8_0)
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}
#: Q8_0 quantizes blocks of this many consecutive values of a row
Q8_BLOCK = 32


def rope_theta(config) -> float:
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rp.get("rope_type", rp.get("type", "default")) if isinstance(rp, dict) else "default"
    if kind not in ("default", None):
        raise FlapError(f"rope type {kind!r} is not written by the GGUF exporter (plain RoPE only); nothing written")
    theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def add_tensor(writer, name: str, t: torch.Tensor, gtype: str) -> None:
    from gguf import GGMLQuantizationType, quants
    a = np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())  # row-major, whatever view t is
    if not np.isfinite(a).all():
        raise FlapError(f"tensor {name} holds NaN or Inf; nothing written")
    if a.ndim < 2 or gtype == "f32":
        writer.add_tensor(name, a)
    elif gtype == "q8_0" and a.shape[-1] % Q8_BLOCK == 0:
        writer.add_tensor(name, quants.quantize(a, GGMLQuantizationType.Q8_0),
                          raw_dtype=GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, a.astype(np.float16))


def arch_name(layers: list[LayerOut]) -> str:
    shapes = {(lay.n_head, lay.n_head_kv, lay.n_ff) for lay in layers}
    stock = len(shapes) == 1 and all(lay.n_head > 0 and "attn_norm.weight" in lay.tensors for lay in layers)
    return "llama" if stock else "deci"


def write_metadata(writer, arch: str, config, w: Widths, layers: list[LayerOut], gtype: str) -> None:
    def per_layer(values: list[int]) -> int | list[int]:
        return values[0] if arch == "llama" else values
    writer.add_name(getattr(config, "_name_or_path", "") or "flap-exp pruned model")
    writer.add_file_type(FILE_TYPES[gtype])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(per_layer([lay.n_ff for lay in layers]))
    writer.add_head_count(per_layer([lay.n_head for lay in layers]))
    writer.add_head_count_kv(per_layer([lay.n_head_kv for lay in layers]))
    writer.add_key_length(w.head_dim)
    writer.add_value_length(w.head_dim)
    writer.add_rope_dimension_count(w.head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def llama_layers_only(config, w: Widths) -> None:
    """The layouts written here are llama.cpp's `llama`/`deci`: LLaMA's layers (a Mistral without a sliding
    window computes the same), whole k/v groups. Anything else is refused before a byte is written."""
    from ..families import family_of
    family = family_of(config.model_type).model_type
    if family not in ("llama", "mistral") or (family == "mistral" and getattr(config, "sliding_window", None)):
        what = "a sliding-window Mistral" if family == "mistral" else f"a {family} model"
        raise FlapError(f"--to gguf writes LLaMA layers (llama.cpp's llama/deci); {what} is not one: "
                        "use --to hf where its layers keep the same widths; nothing written")
    if not w.full_groups:
        raise FlapError("--to gguf writes whole k/v groups; this model removed query heads inside groups "
                        "(--attn-unit query): use --to hf where its layers keep the same widths; nothing written")


def write_gguf(model, manifest: dict, out, gtype: str = "f32") -> dict:
    """Write `model` (pruned or dense, in memory) to the GGUF file `out` atomically; a summary of what was written.
    `manifest` names the base model (its tokenizer's source)."""
    from gguf import GGUFWriter
    config, w = model.config, Widths.of(model.config)
    llama_layers_only(config, w)
    rope_theta(config)  # refused before anything is written
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    layers = plan_layers(sd, config.num_hidden_layers, w.group_size, w.head_dim)
    arch = arch_name(layers)
    with atomic_file(out) as tmp:
        writer = GGUFWriter(tmp, arch)
        write_metadata(writer, arch, config, w, layers, gtype)
        tokenizer = add_tokenizer(writer, manifest, config.vocab_size)
        add_tensor(writer, "token_embd.weight", sd["model.embed_tokens.weight"], gtype)
        add_tensor(writer, "output_norm.weight", sd["model.norm.weight"], gtype)
        if not config.tie_word_embeddings:
            add_tensor(writer, "output.weight", sd["lm_head.weight"], gtype)
        for i, lay in enumerate(layers):
            for name, t in lay.tensors.items():
                add_tensor(writer, f"blk.{i}.{name}", t, gtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"out": str(out), "format": "gguf", "arch": arch, "type": gtype, "tokenizer": tokenizer,
            "head_count": [lay.n_head for lay in layers], "head_count_kv": [lay.n_head_kv for lay in layers],
            "feed_forward_length": [lay.n_ff for lay in layers]}


def export(req: ExportRequest) -> dict:
    model, _, manifest = load_pruned(req.src, verify=False)  # verified by check_request
    return write_gguf(model, manifest, req.out, req.gguf_type)
