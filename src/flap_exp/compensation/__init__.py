"""Compensation of the surviving output projections after pruning, through the registry
flap_exp.catalogue.COMPENSATIONS (a method is one module of flap_exp.methods.compensation + a conf file).

A method's `begin` sets up its pass and returns a per-layer step, called on each DENSE layer in order
(before that layer is cut) and returning the layer's LayerComp (None: nothing to add). `prune()` (the CLI,
in memory or streamed) interleaves the steps with the cut; `compensate` runs them alone (the pipeline's
compensate stages).
"""
from __future__ import annotations

from tqdm.auto import tqdm

from ..arch import ArchView
from ..catalogue import COMPENSATIONS, check_compensation_params
from ..errors import FlapError
from ..registry import Entry
from ..store import as_store
from .base import CompensationConfig, CompensationInputs, LayerComp, LayerStep, from_biases


def get_compensation(name: str) -> Entry:
    """The registry's entry: .obj is the method's `begin`; .needs, .options, .check, .extra_bytes its facts."""
    return COMPENSATIONS.get(name)


def check_config(cfg: CompensationConfig) -> CompensationConfig:
    """Validate a compensation config before any long work starts."""
    options = get_compensation(cfg.method).options
    check_compensation_params({"method": cfg.method, **{k: getattr(cfg, k) for k in options}})
    return cfg


def extra_bytes(cfg: CompensationConfig, arch: ArchView, windows: int, seqlen: int, elem: int) -> int:
    """The method's memory beyond two copies of the windows' hidden states (for a streamed budget)."""
    fn = get_compensation(cfg.method).extra_bytes
    return fn(arch, windows, seqlen, elem, cfg) if fn is not None and windows else 0


def config_record(cfg: CompensationConfig) -> dict:
    """The method and the options it reads: what manifests, metrics.json and MLflow record."""
    return {"method": cfg.method, **{k: getattr(cfg, k) for k in get_compensation(cfg.method).options}}


def config_from_params(params: dict) -> CompensationConfig:
    """A CompensationConfig from a conf/compensation/*.yaml block ({method, damping?, form?})."""
    check_compensation_params(params, set(CompensationConfig.__dataclass_fields__))
    return check_config(CompensationConfig(**params))


def begin(inp: CompensationInputs) -> LayerStep:
    """The per-layer step of `inp.cfg`'s method, after checking it has the data it reads."""
    entry = get_compensation(check_config(inp.cfg).method)
    if entry.needs == "stats" and inp.stats is None:
        raise FlapError(f"compensation {inp.cfg.method!r} needs calibration statistics")
    if entry.needs == "windows" and inp.windows is None:
        raise FlapError(f"compensation {inp.cfg.method!r} needs calibration windows")
    return entry.obj(inp)


def compensate(source, sel, arch, cfg: CompensationConfig, stats=None, windows=None, batch_size: int = 8,
               progress: bool = True) -> list[LayerComp] | None:
    """Per-layer compensation of `sel` on the dense model (an nn.Module or a layer store, left dense; None for a
    method that reads nothing), or None for a method that changes nothing (`none`)."""
    if source is None and get_compensation(cfg.method).needs != "nothing":
        raise FlapError(f"compensation {cfg.method!r} reads the model; none was given")
    store = None if source is None else as_store(source)
    step = begin(CompensationInputs(store, sel, arch, cfg, stats, windows, batch_size, progress))  # type: ignore[arg-type]
    comps = []
    for i in tqdm(range(arch.num_layers), desc=f"compensate ({cfg.method})", unit="layer", disable=not progress):
        if store is None:
            comps.append(step(i, None))  # type: ignore[arg-type]  # a method that reads nothing gets no layer
            continue
        with store.layer(i) as layer:
            comps.append(step(i, layer))
    kept = [c for c in comps if c is not None]
    if not kept:
        return None
    if len(kept) != len(comps):
        raise FlapError(f"compensation {cfg.method!r} gave no result for some layers")
    return kept


from .serialize import comps_from_tensors, comps_to_tensors  # noqa: E402  (re-exported)

__all__ = ["COMPENSATIONS", "CompensationConfig", "LayerComp", "check_config", "comps_from_tensors",
           "comps_to_tensors", "compensate", "config_from_params", "config_record", "from_biases",
           "get_compensation", "begin", "CompensationInputs", "LayerStep", "extra_bytes"]
