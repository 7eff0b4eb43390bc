"""Baseline bias compensation: put back the mean contribution of the removed input channels.

For an output projection W (o_proj or down_proj) with keep-mask m over its input channels and mean
input x̄ over the calibration tokens, the bias is  b = W[:, ~m] @ x̄[~m]  (the unpruned W). Then
W x ≈ W[:, m] x[m] + b, exactly so when the removed channels are constant across tokens.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..arch import ArchView, decoder_layers
from ..selection import Selection
from ..stats import LayerStats
from .base import LayerComp

if TYPE_CHECKING:
    from ..arch import DecoderLayer


def compensation_bias(w: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """b = W[:, ~keep] @ mean[~keep], computed in float64."""
    drop = ~keep.to(w.device)
    return w.detach()[:, drop].to(torch.float64) @ mean.to(w.device, torch.float64)[drop]


def compensation_biases(model: nn.Module, stats: list[LayerStats], sel: Selection,
                        arch: ArchView) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (o_proj bias, down_proj bias), float64 on the weights' device."""
    comps = [layer_bias(layer, i, sel, arch, stats) for i, layer in enumerate(decoder_layers(model))]
    return [(c.o_bias, c.down_bias) for c in comps]

def layer_bias(layer: DecoderLayer, i: int, sel: Selection, arch: ArchView, stats: list[LayerStats]) -> LayerComp:
    """FLAP's baseline bias of decoder layer i from its dense weights and the calibration means."""
    return LayerComp(compensation_bias(layer.self_attn.o_proj.weight, sel.channel_mask(i, arch), stats[i].attn.mean),
                     compensation_bias(layer.mlp.down_proj.weight, sel.keep_channels[i], stats[i].mlp.mean))
