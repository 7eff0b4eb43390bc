"""A model whose layers have their own widths: the config and model classes that reload a pruned model.

One pair per pruned type of families.PRUNED (flap_llama, flap_qwen2, flap_qwen3, flap_gemma2,
flap_gemma3_text): `FlapLlamaConfig` is a LlamaConfig plus per-layer `layer_kv_heads` (kept key/value groups;
query heads = groups * G) and `layer_intermediate_size`; `FlapLlamaForCausalLM` builds the stock LLaMA and
then shapes each layer, with a bias on o_proj and down_proj for the compensation; the other families' are
the same mix-ins over their own classes. Importing flap_exp registers them all, so
`AutoModelForCausalLM.from_pretrained(dir)` loads a pruned directory.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM

from .coverage import refuse_incomplete
from .errors import FlapError
from .families import PRUNED, Family
from .manifest import MANIFEST, read_manifest, verify_weights

if TYPE_CHECKING:
    from .arch import DecoderLayer


class EmptyAttention(nn.Module):
    """Attention of a layer that lost every group: its output is o_proj's bias (the compensation).

    It still appends zero-width keys/values to a KV cache, so the cache's sequence length stays right.
    """

    def __init__(self, hidden_size: int, head_dim: int, layer_idx: int, o_proj: nn.Linear):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(hidden_size, 0, bias=False) for _ in range(3))
        self.o_proj = o_proj  # Linear(0, hidden, bias=True)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, **kwargs):
        lead = hidden_states.shape[:-1]
        if past_key_values is not None:
            empty = hidden_states.new_zeros(lead[0], 0, lead[1], self.head_dim)
            past_key_values.update(empty, empty, self.layer_idx)
        return self.o_proj(hidden_states.new_zeros(*lead, 0)), None


def new_linear(in_f: int, out_f: int, bias: bool, like: torch.Tensor) -> nn.Linear:
    return nn.Linear(in_f, out_f, bias=bias, device=like.device, dtype=like.dtype)


def shape_layer(layer: DecoderLayer, n_groups: int, n_channels: int, group_size: int, head_dim: int) -> None:
    """Give a stock decoder layer the widths of a pruned one (weights uninitialized, to be loaded)."""
    attn, mlp = layer.self_attn, layer.mlp
    d, like = attn.q_proj.in_features, attn.q_proj.weight
    q_out, kv_out = n_groups * group_size * head_dim, n_groups * head_dim  # group_size: this layer's G'
    o_proj = new_linear(q_out, d, True, like)
    if n_groups == 0:
        layer.self_attn = EmptyAttention(d, head_dim, attn.layer_idx, o_proj)  # type: ignore[assignment]  # no heads
    else:
        qb = attn.q_proj.bias is not None
        attn.q_proj, attn.k_proj, attn.v_proj = (new_linear(d, q_out, qb, like), new_linear(d, kv_out, qb, like),
                                                 new_linear(d, kv_out, qb, like))
        attn.o_proj = o_proj
        attn.num_key_value_groups = group_size
    gb = mlp.gate_proj.bias is not None
    mlp.gate_proj, mlp.up_proj = new_linear(d, n_channels, gb, like), new_linear(d, n_channels, gb, like)
    mlp.down_proj = new_linear(n_channels, d, True, like)


class _PerLayerConfig:
    """Mixed into a family's config: per-layer kept k/v groups and MLP widths (default: the dense ones)."""

    def __init__(self, layer_kv_heads: list[int] | None = None, layer_intermediate_size: list[int] | None = None,
                 layer_q_heads: list[int] | None = None, **kwargs):
        super().__init__(**kwargs)
        n = self.num_hidden_layers  # type: ignore[attr-defined]  # set by the family's config
        kv = self.num_key_value_heads or self.num_attention_heads  # type: ignore[attr-defined]  # (same)
        self.layer_kv_heads = list(layer_kv_heads) if layer_kv_heads is not None else [kv] * n
        g = (self.num_attention_heads // kv)  # type: ignore[attr-defined]  # (same)
        # query heads per layer: G per kept group unless query-head units removed some (selection.py)
        self.layer_q_heads = list(layer_q_heads) if layer_q_heads is not None else [n * g for n in self.layer_kv_heads]
        self.layer_intermediate_size = (list(layer_intermediate_size) if layer_intermediate_size is not None
                                        else [self.intermediate_size] * n)  # type: ignore[attr-defined]


class _PerLayerModel:
    """Mixed into a family's *ForCausalLM: the stock model, then each layer shaped to its pruned widths."""

    def __init__(self, config):
        super().__init__(config)  # the family's *ForCausalLM
        g = config.num_attention_heads // (config.num_key_value_heads or config.num_attention_heads)
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        for layer, n_kv, n_q, n_ch in zip(self.model.layers, config.layer_kv_heads, config.layer_q_heads,
                                          config.layer_intermediate_size, strict=True):
            shape_layer(layer, n_kv, n_ch, n_q // n_kv if n_kv else g, hd)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, flap_verify: bool = True, **kwargs):
        """Safetensors only (a pruned directory is never unpickled); a local directory is checked against its
        flap_manifest.json's hashes of every file first, as `flap-exp ppl` does, and the loaded tensors must cover
        the model exactly.
        `flap_verify=False` skips the hashes (for a caller that has just checked them)."""
        kwargs["use_safetensors"] = True
        path = pretrained_model_name_or_path
        if flap_verify and isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
            if not os.path.exists(os.path.join(path, MANIFEST)):
                raise FlapError(f"{os.path.join(path, MANIFEST)} is missing: a pruned directory loads only with "
                                "its manifest (prune again, or pass flap_verify=False for a copy you saved yourself)")
            verify_weights(path, read_manifest(path))
        want_info = kwargs.pop("output_loading_info", False)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args,  # type: ignore[misc]
                                         output_loading_info=True, **kwargs)
        model, info = loaded  # (model, info) with output_loading_info
        refuse_incomplete(info, pretrained_model_name_or_path)  # never a re-initialised parameter
        return (model, info) if want_info else model


def _camel(model_type: str) -> str:
    return "".join(p.capitalize() for p in model_type.split("_"))


def _define(fam: Family) -> tuple[type, type]:
    """The pruned config and model classes of one family, registered with transformers' Auto classes."""
    import transformers
    base_cfg, base_model = getattr(transformers, fam.config_class), getattr(transformers, fam.model_class)
    name = _camel(fam.pruned_type)  # FlapLlama, FlapQwen2, FlapGemma3Text, ...
    cfg = type(f"{name}Config", (_PerLayerConfig, base_cfg), {"model_type": fam.pruned_type, "__module__": __name__})
    model = type(f"{name}ForCausalLM", (_PerLayerModel, base_model), {"config_class": cfg, "__module__": __name__})
    AutoConfig.register(fam.pruned_type, cfg, exist_ok=True)
    AutoModelForCausalLM.register(cfg, model, exist_ok=True)
    return cfg, model


#: pruned model_type -> (config class, model class), one pair per pruned type of families.PRUNED
PRUNED_CLASSES: dict[str, tuple[type, type]] = {t: _define(f) for t, f in PRUNED.items()}
for _cfg, _model in PRUNED_CLASSES.values():
    globals()[_cfg.__name__], globals()[_model.__name__] = _cfg, _model
FlapLlamaConfig, FlapLlamaForCausalLM = PRUNED_CLASSES["flap_llama"]
