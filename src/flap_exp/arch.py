"""What FLAP needs to know about a supported model (families.py), read from its config and modules.

The attention unit is a key/value group: one k head, one v head and the G query heads that share them
(G = 1 for plain multi-head attention). Nothing here assumes a layer count, head count or head size.
"""
from __future__ import annotations

from collections.abc import MutableSequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch.nn as nn

from .errors import FlapError
from .families import FAMILIES, Family, family_of

if TYPE_CHECKING:
    # The type checker's view of a decoder layer. Every supported family's layer has the Llama layer's attributes
    # (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, ...), which nn.Module.__getattr__ would type as
    # `Tensor | Module`, making each such chain an error.
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer as DecoderLayer


@dataclass(frozen=True)
class ArchView:
    num_layers: int
    hidden_size: int
    num_heads: int  # query heads per layer in the dense model
    num_kv_heads: int  # key/value heads = attention units per layer
    head_dim: int
    intermediate_size: int
    family: str = "llama"  # a key of families.FAMILIES: where the norms around the units are

    @property
    def fam(self) -> Family:
        return FAMILIES[self.family]

    @property
    def group_size(self) -> int:
        """G: query heads sharing one key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def group_params(self) -> int:
        """Parameters one k/v group owns: G q rows + 1 k row + 1 v row blocks, G o columns blocks."""
        return self.hidden_size * self.head_dim * (2 * self.group_size + 2)

    @property
    def channel_params(self) -> int:
        """Parameters one MLP channel owns: a gate row, an up row, a down column."""
        return 3 * self.hidden_size

    @property
    def attn_channels(self) -> int:
        """Width of o_proj's input (the concatenated per-head contexts)."""
        return self.num_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        return self.num_kv_heads * self.group_params + self.intermediate_size * self.channel_params

    @property
    def total_params(self) -> int:
        """The denominator of the pruning ratio: attention + MLP weights of all decoder layers."""
        return self.num_layers * self.layer_params

    @classmethod
    def from_config(cls, config) -> ArchView:
        fam = family_of(getattr(config, "model_type", None))
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if heads % kv:
            raise FlapError(f"{heads} query heads do not split into {kv} key/value groups")
        return cls(config.num_hidden_layers, config.hidden_size, heads, kv, head_dim, config.intermediate_size,
                   fam.model_type)


def decoder_layers(model: nn.Module) -> MutableSequence[DecoderLayer]:
    """The decoder layers of a *ForCausalLM or a bare base model (the model's own nn.ModuleList)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise FlapError(f"{type(model).__name__} has no decoder layers at .model.layers; not a LLaMA-family model")
    return cast("MutableSequence[DecoderLayer]", layers)


def mlp_input(layer: nn.Module, fam: Family, h):
    """The MLP block's input for the residual stream h after the attention block."""
    return getattr(layer, fam.mlp_norm)(h)


def block_output(layer: nn.Module, norm: str | None, y):
    """What a block adds to the residual stream for its output projection's output y (a post-norm or y)."""
    return y if norm is None else getattr(layer, norm)(y)
