"""A pruned model's decoder layers in llama.cpp's tensor layout, with per-layer widths (pure: tensors in, out).

llama.cpp's `deci` architecture reads per-layer arrays of query heads, k/v heads and feed-forward lengths
(`{arch}.attention.head_count`, `.head_count_kv`, `.feed_forward_length`) and loads `attn_output.bias` and
`ffn_down.bias` when present. What it cannot hold as such is rewritten into an exactly equivalent form:
- an attention-less layer's output bias (the compensation) is added to the previous layer's `ffn_down.bias`
  (the same residual stream; deci's attention-free layer passes its input on unchanged). Layer 0 has no
  previous layer, and llama.cpp takes the head size from layer 0's head count, so an attention-less layer 0
  keeps one all-zero k/v group instead: zero values give a zero context and the output is its bias.
- every feed-forward length is padded with all-zero channels (silu(0) * 0 = 0: the same output) up to a
  multiple of FFN_MULTIPLE. llama.cpp's fast CPU matmul (llamafile's sgemm) needs the inner dimension to be a
  multiple of 16 floats, else it falls back to a slower path for ffn_down, and Q8_0 needs rows of multiples
  of 32 values. An MLP-less layer so keeps FFN_MULTIPLE zero channels and outputs its `ffn_down.bias`: deci
  skips the rest of a layer whose feed-forward length is 0, its attention output included.
q and k rows are permuted from transformers' rotate-half RoPE to llama.cpp's interleaved pairs, as llama.cpp's
own converter does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: feed-forward lengths are padded to this multiple (zero channels; see above): 32 = a Q8_0 block, and a
#: multiple of the 16 floats of an AVX-512 register that llama.cpp's sgemm needs
FFN_MULTIPLE = 32


@dataclass
class LayerOut:
    n_head: int
    n_head_kv: int
    n_ff: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # GGUF name (without blk.i.) -> tensor


def rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or its bias) per head from halves [x0..x(h/2-1), y0..] to pairs [x0, y0, ...]."""
    if n_heads == 0:
        return w
    shape = w.shape
    return w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def pad_rows(w: torch.Tensor, n: int) -> torch.Tensor:
    """`w` with `n` zero rows appended."""
    return torch.cat([w, w.new_zeros(n, *w.shape[1:])]) if n else w


def plan_layer(sd: dict[str, torch.Tensor], i: int, group_size: int, head_dim: int) -> LayerOut:
    """Layer i of a pruned state dict (keys `model.layers.i.*`) as llama.cpp tensors, before bias folding."""
    p = f"model.layers.{i}."
    k = sd[p + "self_attn.k_proj.weight"]
    kv = k.shape[0] // head_dim
    d = k.shape[1]
    down = sd[p + "mlp.down_proj.weight"]
    o_bias = sd.get(p + "self_attn.o_proj.bias")
    down_bias = sd.get(p + "mlp.down_proj.bias")
    t: dict[str, torch.Tensor] = {"attn_norm.weight": sd[p + "input_layernorm.weight"],
                                  "ffn_norm.weight": sd[p + "post_attention_layernorm.weight"]}
    if kv == 0 and i == 0:
        kv, zeros = 1, torch.zeros(group_size * head_dim, d, dtype=k.dtype)
        q, k, v, o = zeros, torch.zeros(head_dim, d, dtype=k.dtype), torch.zeros(head_dim, d, dtype=k.dtype), zeros.T
    else:
        q, v, o = (sd[p + f"self_attn.{n}_proj.weight"] for n in "qvo")
    n_head = kv * group_size
    if kv:
        t.update({"attn_q.weight": rope_permute(q, n_head), "attn_k.weight": rope_permute(k, kv),
                  "attn_v.weight": v, "attn_output.weight": o})
        for name, gname, heads in (("q_proj", "attn_q", n_head), ("k_proj", "attn_k", kv), ("v_proj", "attn_v", 0)):
            b = sd.get(p + f"self_attn.{name}.bias")
            if b is not None and b.numel():
                t[f"{gname}.bias"] = rope_permute(b, heads) if heads else b
        if o_bias is not None and bool(o_bias.any()):
            t["attn_output.bias"] = o_bias
    else:
        del t["attn_norm.weight"]
        if o_bias is not None and bool(o_bias.any()):
            t["fold.bias"] = o_bias  # moved onto the previous layer's ffn_down.bias by fold_biases
    gate, up = sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]
    pad = -down.shape[1] % FFN_MULTIPLE if down.shape[1] else FFN_MULTIPLE
    n_ff = down.shape[1] + pad
    t.update({"ffn_gate.weight": pad_rows(gate, pad), "ffn_up.weight": pad_rows(up, pad),
              "ffn_down.weight": pad_rows(down.T, pad).T})
    for name in ("gate_proj", "up_proj"):
        b = sd.get(p + f"mlp.{name}.bias")
        if b is not None and b.numel() and bool(b.any()):
            t[f"ffn_{name.removesuffix('_proj')}.bias"] = pad_rows(b, pad)
    if down_bias is not None and bool(down_bias.any()):
        t["ffn_down.bias"] = down_bias
    return LayerOut(n_head, kv, n_ff, t)


def fold_biases(layers: list[LayerOut]) -> list[LayerOut]:
    """Move each attention-less layer's output bias onto the previous layer's ffn_down.bias (see above)."""
    for i, lay in enumerate(layers):
        b = lay.tensors.pop("fold.bias", None)
        if b is None:
            continue
        prev = layers[i - 1].tensors  # i > 0: layer 0 keeps a zero group instead (plan_layer)
        prev["ffn_down.bias"] = prev.get("ffn_down.bias", torch.zeros_like(b)) + b
    return layers


def plan_layers(sd: dict[str, torch.Tensor], num_layers: int, group_size: int, head_dim: int) -> list[LayerOut]:
    return fold_biases([plan_layer(sd, i, group_size, head_dim) for i in range(num_layers)])
