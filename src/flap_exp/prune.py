"""The pruning job as one pure-ish function of a typed config: calibrate, score, select, compensate, cut."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .arch import ArchView
from .calibrate import collect_stats
from .catalogue import default_compensation
from .compensation import CompensationConfig, LayerComp, check_config, compensate, get_compensation
from .errors import FlapError
from .integrity import check_finite_scores, check_finite_weights
from .metrics import channel_scores, get_metric, layer_channel_scores
from .selection import Selection
from .stats import LayerStats
from .structures import PER_LAYER, StructureOptions, _remove_groups, check_ratio, get_structure, ul_layer
from .surgery import mask_model, prune_model

if TYPE_CHECKING:
    from .arch import DecoderLayer


@dataclass(frozen=True)
class PruneConfig:
    metric: str = "wifv"
    structure: str = "al_am"
    ratio: float = 0.2
    # None: the metric's default from flap_exp.catalogue (FLAP's metrics: bias; the baselines: none, as officially)
    compensation: CompensationConfig | str | None = None
    square_attn: bool | None = None  # None: the metric's official default (on for FLAP's metrics)
    sequential: bool | None = None  # None: the metric's default (on for wanda_sp only, as its official code)
    options: StructureOptions = field(default_factory=StructureOptions)
    batch_size: int = 8  # calibration windows per forward; larger is faster until memory runs out
    # Deprecated alias of `compensation` kept for old callers: True = bias, False = none.
    compensate: bool | None = None

    def resolved_compensation(self) -> CompensationConfig:
        """The compensation this job runs: the explicit one, the deprecated bool, or the metric's default."""
        if self.compensation is not None and self.compensate is not None:
            raise FlapError("give either compensation or the deprecated compensate flag, not both")
        if isinstance(self.compensation, str):  # a bare method name takes that method's default options
            return check_config(CompensationConfig(self.compensation))
        if self.compensation is not None:
            return check_config(self.compensation)
        if self.compensate is not None:
            return CompensationConfig("bias" if self.compensate else "none")
        return CompensationConfig(default_compensation(self.metric))

    def validate(self) -> PruneConfig:
        check_ratio(self.ratio)
        get_structure(self.structure)
        metric = get_metric(self.metric)
        self.resolved_compensation()
        if (self.sequential if self.sequential is not None else metric.sequential) and self.structure not in PER_LAYER:
            raise FlapError(f"sequential calibration needs a per-layer structure ({', '.join(sorted(PER_LAYER))}), "
                            f"not {self.structure!r}")
        return self

    def to_dict(self) -> dict:
        """The settings with the compensation resolved (what a manifest records)."""
        return asdict(replace(self, compensation=self.resolved_compensation(), compensate=None))


@dataclass
class PruneResult:
    selection: Selection
    achieved_ratio: float
    stats: list[LayerStats] | None
    comps: list[LayerComp] | None
    seconds: dict
    compensation: CompensationConfig | None = None

    @property
    def biases(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per-layer (o_proj bias, down_proj bias), as before compensations could replace weights."""
        return None if self.comps is None else [(c.o_bias, c.down_bias) for c in self.comps]


def _sequential_pass(model, windows, cfg: PruneConfig, arch: ArchView, progress: bool, collect=collect_stats):
    """Wanda-sp as officially run: select and mask layer l, then feed its pruned outputs to layer l+1."""
    metric = get_metric(cfg.metric)
    n_groups = None if cfg.structure == "ul_um" else _remove_groups(cfg.options, arch, cfg.ratio) // arch.num_layers
    keep: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_layer(i: int, layer: DecoderLayer, stats: LayerStats) -> bool:
        a, m = layer_channel_scores(metric, layer.self_attn.o_proj.weight.cpu(), layer.mlp.down_proj.weight.cpu(),
                                    stats, cfg.square_attn)
        check_finite_scores([(a, m)], f"{cfg.metric} scores", first_layer=i)
        keep.append(ul_layer(a, m, arch, cfg.ratio, cfg.options, n_groups))
        one = Selection([keep[-1][0]], [keep[-1][1]])
        _mask_layer(layer, one, arch)
        return True

    stats = collect(model, windows, cfg.batch_size, on_layer=on_layer, progress=progress)  # or stream_stats
    return stats, Selection([g for g, _ in keep], [c for _, c in keep])


def _mask_layer(layer: DecoderLayer, one: Selection, arch: ArchView) -> None:
    wrapper = nn.Module()
    wrapper.layers = nn.ModuleList([layer])
    mask_model(wrapper, one, None, arch)


def prune(model: nn.Module, windows: torch.Tensor | None, cfg: PruneConfig, progress: bool = True) -> PruneResult:
    """Prune `model` in place (physically). `windows` (N x T tokens) may be None for data-free metrics."""
    cfg.validate()
    comp = cfg.resolved_compensation()
    needs = get_compensation(comp.method).needs
    arch = ArchView.from_config(model.config)
    check_finite_weights(model)  # before calibration: a NaN weight would only surface as NaN scores later
    metric = get_metric(cfg.metric)
    t0 = time.perf_counter()
    needs_stats = metric.needs_data or needs == "stats"
    if (needs_stats or needs == "windows") and windows is None:
        raise FlapError(f"metric {cfg.metric!r} / compensation {comp.method!r} needs calibration windows")
    sequential = cfg.sequential if cfg.sequential is not None else metric.sequential
    if sequential:
        # The sequential pass masks the model as it goes; a compensation that runs its own pass (lsq)
        # needs the dense model afterwards, so that one works on a copy (twice the model's memory).
        stats, sel = _sequential_pass(copy.deepcopy(model) if needs == "windows" else model, windows, cfg, arch,
                                      progress)
    else:
        stats = (collect_stats(model, windows, cfg.batch_size, progress=progress)
                 if needs_stats and windows is not None else None)  # (not None when needs_stats: checked above)
    t1 = time.perf_counter()
    if not sequential:
        scores = channel_scores(metric, model, stats, cfg.square_attn)
        sel = get_structure(cfg.structure)(scores, arch, cfg.ratio, cfg.options)
    t2 = time.perf_counter()
    comps = compensate(model, sel, arch, comp, stats, windows, cfg.batch_size, progress)
    t3 = time.perf_counter()
    prune_model(model, sel, comps, arch)
    t4 = time.perf_counter()
    return PruneResult(sel, sel.achieved_ratio(arch), stats, comps,
                       {"calibrate": t1 - t0, "score_select": t2 - t1, "compensate": t3 - t2, "surgery": t4 - t3},
                       comp)
