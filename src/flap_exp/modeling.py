"""A LLaMA whose layers have their own widths: the config and model class that reload a pruned model.

`FlapLlamaConfig` is a LlamaConfig plus per-layer `layer_kv_heads` (kept key/value groups; query heads
= groups * G) and `layer_intermediate_size`. `FlapLlamaForCausalLM` builds the stock LLaMA and then
shapes each layer, with a bias on o_proj and down_proj for the compensation. Importing flap_exp
registers both, so `AutoModelForCausalLM.from_pretrained(dir)` loads a pruned directory.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, cast

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel, MistralModel

from .coverage import refuse_incomplete
from .errors import FlapError
from .manifest import MANIFEST, read_manifest, verify_weights

if TYPE_CHECKING:
    from .arch import DecoderLayer


class FlapLlamaConfig(LlamaConfig):
    model_type = "flap_llama"

    def __init__(self, layer_kv_heads: list[int] | None = None, layer_intermediate_size: list[int] | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        n = self.num_hidden_layers
        kv = self.num_key_value_heads or self.num_attention_heads  # set by LlamaConfig, but typed optional
        self.layer_kv_heads = list(layer_kv_heads) if layer_kv_heads is not None else [kv] * n
        self.layer_intermediate_size = (list(layer_intermediate_size) if layer_intermediate_size is not None
                                        else [self.intermediate_size] * n)
        # A Mistral base's attention window (None: full causal attention, as LLaMA): FlapLlamaModel reads it.
        self.sliding_window = kwargs.get("sliding_window", getattr(self, "sliding_window", None))


class FlapLlamaModel(LlamaModel):
    """LLaMA's decoder stack with Mistral's one difference, its forward: a sliding-window causal mask when
    `config.sliding_window` is set (a pruned Mistral), the plain causal mask otherwise (identical to LLaMA's)."""

    forward = MistralModel.forward


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
    q_out, kv_out = n_groups * group_size * head_dim, n_groups * head_dim
    o_proj = new_linear(q_out, d, True, like)
    if n_groups == 0:
        layer.self_attn = EmptyAttention(d, head_dim, attn.layer_idx, o_proj)  # type: ignore[assignment]  # no heads
    else:
        qb = attn.q_proj.bias is not None
        attn.q_proj, attn.k_proj, attn.v_proj = (new_linear(d, q_out, qb, like), new_linear(d, kv_out, qb, like),
                                                 new_linear(d, kv_out, qb, like))
        attn.o_proj = o_proj
    gb = mlp.gate_proj.bias is not None
    mlp.gate_proj, mlp.up_proj = new_linear(d, n_channels, gb, like), new_linear(d, n_channels, gb, like)
    mlp.down_proj = new_linear(n_channels, d, True, like)


class FlapLlamaForCausalLM(LlamaForCausalLM):
    config_class = FlapLlamaConfig

    def __init__(self, config: FlapLlamaConfig):
        super().__init__(config)
        self.model.__class__ = FlapLlamaModel  # the same modules and state; only the forward (the mask) differs
        g = config.num_attention_heads // (config.num_key_value_heads or config.num_attention_heads)  # as above
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        for layer, n_kv, n_ch in zip(self.model.layers, config.layer_kv_heads, config.layer_intermediate_size,
                                     strict=True):
            shape_layer(layer, n_kv, n_ch, g, hd)

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
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        model, info = cast("tuple[FlapLlamaForCausalLM, dict]", loaded)  # (model, info) with output_loading_info
        refuse_incomplete(info, pretrained_model_name_or_path)  # never a re-initialised parameter
        return (model, info) if want_info else model


AutoConfig.register("flap_llama", FlapLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(FlapLlamaConfig, FlapLlamaForCausalLM, exist_ok=True)
