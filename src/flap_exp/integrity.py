"""Refuse what cannot be trusted: non-finite weights or scores, (files against their recorded hashes: manifest.py).

A NaN is an error, never a result: a model with a NaN/Inf weight is refused before anything is computed
from it, and a NaN/Inf score never reaches a selection. Pure checks: tensors or paths in, FlapError out.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .errors import FlapError


def _bad(t: torch.Tensor) -> str | None:
    """None if `t` is finite (or not floating point), else a short count such as '3 NaN, 1 Inf of 4096'."""
    if not t.is_floating_point() or t.numel() == 0:
        return None
    lo, hi = torch.aminmax(t)  # NaN and +-Inf propagate; ~15x faster than isfinite(t).all() on CPU
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return None
    nan = int(torch.isnan(t).sum())
    return f"{nan} NaN, {int(torch.isinf(t).sum())} Inf of {t.numel()}"


def check_finite_weights(model: nn.Module, what: str = "model") -> None:
    """Refuse a model with a NaN/Inf parameter or buffer, naming the first one."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        bad = _bad(t.detach())
        if bad:
            raise FlapError(f"{what} has non-finite values in {name} ({bad}); refusing it")


def check_finite_scores(scores, where: str = "scores", first_layer: int = 0) -> None:
    """Per-layer (attention channel scores, MLP channel scores): refuse any NaN/Inf, naming layer and module."""
    for i, pair in enumerate(scores, start=first_layer):
        for module, s in zip(("attention (o_proj input channels)", "mlp (down_proj input channels)"), pair,
                             strict=True):
            bad = _bad(torch.as_tensor(s))
            if bad:
                raise FlapError(f"{where}: non-finite score at layer {i} {module} ({bad}); refusing to select "
                                "from it (check the model's weights and the calibration statistics)")


def check_finite_tensors(tensors: dict, where: str) -> None:
    """Refuse a dict of named tensors holding a NaN/Inf, naming the first bad tensor."""
    for key, t in tensors.items():
        bad = _bad(t)
        if bad:
            raise FlapError(f"{where}: tensor {key} has non-finite values ({bad}); refusing it")
