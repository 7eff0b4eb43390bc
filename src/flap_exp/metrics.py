"""Per-channel importance scores for the inputs of o_proj (attention) and down_proj (MLP).

A metric maps (W, stats) to one score per input channel j of W, where W[:, j] multiplies channel j; each is one
module of flap_exp.methods.metric, registered with its facts in catalogue.METRICS:

    ifv              F_j                          (unbiased variance over all calibration tokens)
    wifv             F_j * ||W[:, j]||^2          (FLAP's fluctuation metric, the default)
    wifn             sqrt(s_j) * mean_i |W_ij|    (s_j = mean over tokens of x_j^2)
    weight_magnitude ||W[:, j]||_2                (no data)
    wanda_sp         sqrt(s_j) * mean_i |W_ij|    (the Wanda-sp baseline; sequential by default)

The official code computes F_j with a running update that approximates T * Var and s_j as T * mean x^2
(T = tokens per sample). Every structure is invariant to a per-layer constant factor (ranking within a
layer, z-scoring per layer), so the clean definitions select exactly the same units.

FLAP's code squares the attention channel score (o_proj) and not the MLP one; the baselines do not.
`square_attn` reproduces that and can be switched off.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .catalogue import METHODS, METRICS
from .errors import FlapError
from .stats import ChannelStats, LayerStats
from .store import LayerStore, as_store

ChannelScoreFn = Callable[[torch.Tensor, "ChannelStats | None"], torch.Tensor]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: ChannelScoreFn
    needs_data: bool
    square_attn: bool  # default of the official code for this metric
    sequential: bool = False  # official Wanda-sp prunes layer l before calibrating layer l+1


def get_metric(name: str) -> Metric:
    """The registered metric (flap_exp.methods.metric) with its facts from the one catalogue."""
    entry, f = METRICS.get(name), METHODS[name]
    return Metric(name, entry.obj, f.needs_data, f.square_attn, f.sequential)


def layer_channel_scores(metric: Metric, w_o: torch.Tensor, w_down: torch.Tensor, stats: LayerStats | None,
                         square_attn: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention channel scores [H*hd], MLP channel scores [I]) of one layer, in float64."""
    if metric.needs_data and stats is None:
        raise FlapError(f"metric {metric.name!r} needs calibration statistics")
    sq = metric.square_attn if square_attn is None else square_attn
    attn = metric.fn(w_o.detach().to(torch.float64), stats.attn if stats else None)
    mlp = metric.fn(w_down.detach().to(torch.float64), stats.mlp if stats else None)
    return (attn * attn if sq else attn), mlp


def channel_scores(metric: Metric, source: nn.Module | LayerStore, stats: list[LayerStats] | None,
                   square_attn: bool | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer channel scores of a dense model (in memory or a layer store)."""
    store = as_store(source)
    if stats is not None and len(stats) != store.num_layers:
        raise FlapError(f"statistics cover {len(stats)} layers but the model has {store.num_layers}")
    out = []
    for i in range(store.num_layers):
        with store.layer(i) as layer:
            out.append(layer_channel_scores(metric, layer.self_attn.o_proj.weight.cpu(),
                                            layer.mlp.down_proj.weight.cpu(), stats[i] if stats is not None else None,
                                            square_attn))
    return out
