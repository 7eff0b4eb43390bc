"""What a compensation produces for one decoder layer, and how it is configured.

A compensation never changes which units are removed (the selection decides that); it only decides
what the surviving output projections become. For each layer it gives a bias to add to o_proj and
to down_proj and, for reconstructing methods (`lsq`), new weights for the kept input columns.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..arch import ArchView, DecoderLayer
    from ..selection import Selection
    from ..store import LayerStore


@dataclass
class LayerComp:
    o_bias: torch.Tensor  # [hidden], added to o_proj's bias
    down_bias: torch.Tensor  # [hidden], added to down_proj's bias
    # [hidden, kept o_proj input channels]: replaces o_proj.weight[:, kept]; None keeps the dense columns.
    o_weight: torch.Tensor | None = None
    # [hidden, kept MLP channels]: replaces down_proj.weight[:, kept]; None keeps the dense columns.
    down_weight: torch.Tensor | None = None


@dataclass(frozen=True)
class CompensationConfig:
    method: str = "bias"  # a key of the registry = a file name in conf/compensation/
    # lsq only: ridge damping relative to the mean diagonal of the kept inputs' covariance.
    damping: float = 0.01
    # lsq only: where the statistics come from: "sequential" (the pruned model's own activations),
    # "dense" (the dense model's), "drift" (target: the dense model's output on its own activations).
    form: str = "sequential"


def from_biases(biases: list[tuple[torch.Tensor, torch.Tensor]]) -> list[LayerComp]:
    """Per-layer (o_proj bias, down_proj bias) pairs as LayerComps (no weight changes)."""
    return [LayerComp(o, d) for o, d in biases]


@dataclass(frozen=True)
class CompensationInputs:
    """What a compensation may read: the store (dense weights), the selection, and its data."""
    store: LayerStore
    sel: Selection
    arch: ArchView
    cfg: CompensationConfig
    stats: list | None = None  # per-layer LayerStats (needs == "stats")
    windows: torch.Tensor | None = None  # N x T calibration tokens (needs == "windows")
    batch_size: int = 8
    progress: bool = True


#: One layer's compensation: called as step(i, dense layer i) in layer order, before layer i is cut.
LayerStep = Callable[[int, "DecoderLayer"], "LayerComp | None"]
