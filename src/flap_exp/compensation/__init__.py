"""Compensation of the surviving output projections after pruning: the registry none / bias / lsq.

The keys are the file names of conf/compensation/. One entry point, `compensate`, used the same way by
`prune()` (the CLI, in memory or streamed) and the pipeline's compensate stages. A method's `begin` sets up
its pass and returns a per-layer step, called on each DENSE layer in order (before that layer is cut) and
returning the layer's LayerComp (None: nothing to add).
What a method reads besides the selection is in flap_exp.catalogue.COMPENSATIONS.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..arch import ArchView
from ..catalogue import (
    COMPENSATIONS as NEEDS,
    check_compensation_name,
    check_compensation_options,
    check_compensation_params as check_params,
)
from ..errors import FlapError
from ..selection import Selection
from ..store import LayerStore, as_store
from .base import CompensationConfig, LayerComp, from_biases

if TYPE_CHECKING:
    from ..arch import DecoderLayer


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


@dataclass(frozen=True)
class Compensation:
    name: str
    needs: str  # "nothing", "stats" (calibration means) or "windows" (its own pass over the calibration windows)
    options: tuple[str, ...]  # the CompensationConfig fields this method reads (recorded in manifests, MLflow)
    begin: Callable[[CompensationInputs], LayerStep]  # set up (e.g. embed the windows), return the per-layer step
    # bytes it holds beyond two copies of the windows' hidden states: (arch, windows, seqlen, elem, cfg) -> int
    extra_bytes: Callable[[ArchView, int, int, int, CompensationConfig], int] = lambda *_: 0


def _none(inp: CompensationInputs) -> LayerStep:
    return lambda i, layer: None


def _bias(inp: CompensationInputs) -> LayerStep:
    from .bias import layer_bias
    stats = inp.stats
    assert stats is not None  # checked by begin (needs == "stats")
    return lambda i, layer: layer_bias(layer, i, inp.sel, inp.arch, stats)


def _lsq(inp: CompensationInputs) -> LayerStep:
    from .lsq import begin_lsq
    return begin_lsq(inp)


def _lsq_bytes(arch: ArchView, windows: int, seqlen: int, elem: int, cfg: CompensationConfig) -> int:
    from .lsq import lsq_extra_bytes
    return lsq_extra_bytes(arch, windows, seqlen, elem, cfg.form, store=False)


COMPENSATIONS: dict[str, Compensation] = {
    "none": Compensation("none", NEEDS["none"], (), _none),
    "bias": Compensation("bias", NEEDS["bias"], (), _bias),
    "lsq": Compensation("lsq", NEEDS["lsq"], ("damping", "form"), _lsq, _lsq_bytes),
}


def get_compensation(name: str) -> Compensation:
    check_compensation_name(name)
    return COMPENSATIONS[name]


def check_config(cfg: CompensationConfig) -> CompensationConfig:
    """Validate a compensation config before any long work starts."""
    check_compensation_options(cfg.method, cfg.damping, cfg.form)
    return cfg


def config_record(cfg: CompensationConfig) -> dict:
    """The method and the options it reads: what manifests, metrics.json and MLflow record."""
    return {"method": cfg.method, **{k: getattr(cfg, k) for k in get_compensation(cfg.method).options}}


def config_from_params(params: dict) -> CompensationConfig:
    """A CompensationConfig from a conf/compensation/*.yaml block ({method, damping?, form?})."""
    check_params(params, set(CompensationConfig.__dataclass_fields__))
    return check_config(CompensationConfig(**params))


def begin(inp: CompensationInputs) -> LayerStep:
    """The per-layer step of `inp.cfg`'s method, after checking it has the data it reads."""
    entry = get_compensation(check_config(inp.cfg).method)
    if entry.needs == "stats" and inp.stats is None:
        raise FlapError(f"compensation {inp.cfg.method!r} needs calibration statistics")
    if entry.needs == "windows" and inp.windows is None:
        raise FlapError(f"compensation {inp.cfg.method!r} needs calibration windows")
    return entry.begin(inp)


def compensate(source, sel, arch, cfg: CompensationConfig, stats=None, windows=None, batch_size: int = 8,
               progress: bool = True) -> list[LayerComp] | None:
    """Per-layer compensation of `sel` on the dense model (an nn.Module or a layer store, left dense), or None
    for a method that changes nothing (`none`)."""
    store = as_store(source)
    step = begin(CompensationInputs(store, sel, arch, cfg, stats, windows, batch_size, progress))
    comps = []
    for i in tqdm(range(store.num_layers), desc=f"compensate ({cfg.method})", unit="layer", disable=not progress):
        with store.layer(i) as layer:
            comps.append(step(i, layer))
    kept = [c for c in comps if c is not None]
    if not kept:
        return None
    if len(kept) != len(comps):
        raise FlapError(f"compensation {cfg.method!r} gave no result for some layers")
    return kept


from .serialize import comps_from_tensors, comps_to_tensors  # noqa: E402  (re-exported)

__all__ = ["COMPENSATIONS", "Compensation", "CompensationConfig", "LayerComp", "check_config", "comps_from_tensors",
           "comps_to_tensors", "compensate", "config_from_params", "config_record", "from_biases",
           "get_compensation", "begin", "CompensationInputs", "LayerStep"]
