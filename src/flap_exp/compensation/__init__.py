"""Compensation of the surviving output projections after pruning: the registry none / bias / lsq.

The keys are the file names of conf/compensation/. One entry point, `compensate`, used the same way by
`prune()` (the CLI) and the pipeline's compensate stages. Each method receives the DENSE model (before
physical pruning) and the selection, and returns one LayerComp per decoder layer (None: nothing to add).
What a method reads besides the selection is in flap_exp.catalogue.COMPENSATIONS.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..catalogue import (
    COMPENSATIONS as NEEDS,
    check_compensation_name,
    check_compensation_options,
    check_compensation_params as check_params,
)
from ..errors import FlapError
from .base import CompensationConfig, LayerComp, from_biases

CompensateFn = Callable[..., "list[LayerComp] | None"]


@dataclass(frozen=True)
class Compensation:
    name: str
    needs: str  # "nothing", "stats" (calibration means) or "windows" (its own pass over the calibration windows)
    options: tuple[str, ...]  # the CompensationConfig fields this method reads (recorded in manifests, MLflow)
    fn: CompensateFn


def _none(model, sel, arch, cfg, stats, windows, batch_size, progress):
    return None


def _bias(model, sel, arch, cfg, stats, windows, batch_size, progress):
    from .bias import compensation_biases
    return from_biases(compensation_biases(model, stats, sel, arch))


def _lsq(model, sel, arch, cfg, stats, windows, batch_size, progress):
    try:  # lazily: the least-squares pass lives in its own module
        from .lsq import lsq_compensation
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.lsq":
            raise
        raise FlapError("compensation 'lsq' is not available in this build "
                        "(flap_exp.compensation.lsq is missing)") from None
    return lsq_compensation(model, sel, arch, windows, cfg, batch_size=batch_size, progress=progress)


COMPENSATIONS: dict[str, Compensation] = {
    "none": Compensation("none", NEEDS["none"], (), _none),
    "bias": Compensation("bias", NEEDS["bias"], (), _bias),
    "lsq": Compensation("lsq", NEEDS["lsq"], ("damping", "form"), _lsq),
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


def compensate(model, sel, arch, cfg: CompensationConfig, stats=None, windows=None, batch_size: int = 8,
               progress: bool = True) -> list[LayerComp] | None:
    """Per-layer compensation of `sel` on the dense `model` (left dense), or None for `none`."""
    entry = get_compensation(check_config(cfg).method)
    if entry.needs == "stats" and stats is None:
        raise FlapError(f"compensation {cfg.method!r} needs calibration statistics")
    if entry.needs == "windows" and windows is None:
        raise FlapError(f"compensation {cfg.method!r} needs calibration windows")
    comps = entry.fn(model, sel, arch, cfg, stats, windows, batch_size, progress)
    if comps is not None and len(comps) != arch.num_layers:
        raise FlapError(f"compensation {cfg.method!r} gave {len(comps)} layers for a {arch.num_layers}-layer model")
    return comps


from .serialize import comps_from_tensors, comps_to_tensors  # noqa: E402  (re-exported)

__all__ = ["COMPENSATIONS", "Compensation", "CompensationConfig", "LayerComp", "check_config", "comps_from_tensors",
           "comps_to_tensors", "compensate", "config_from_params", "config_record", "from_biases",
           "get_compensation"]
