"""The pruning job as one function of a typed config, on any layer store: calibrate, score, select, then
compensate and cut one layer at a time (optionally handing each cut layer to a sink that writes it)."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .calibrate import collect_stats
from .catalogue import default_compensation, is_obs_refit, method_facts, structure_problem
from .compensation import (
    CompensationConfig,
    CompensationInputs,
    LayerComp,
    begin,
    check_config,
    extra_bytes,
    get_compensation,
)
from .errors import FlapError
from .integrity import check_finite_scores, check_finite_weights
from .metrics import channel_scores, get_metric, layer_channel_scores
from .selection import Selection
from .stats import LayerStats
from .store import LayerStore, ResidentStore, as_store
from .structures import StructureOptions, check_attn_unit, check_ratio, get_structure, groups_removed, ul_layer
from .surgery import cut_layer, flap_config, mask_layer

if TYPE_CHECKING:
    from .arch import ArchView, DecoderLayer


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

    def resolved_compensation(self) -> CompensationConfig:
        """The compensation this job runs: the explicit one or the metric's default."""
        if isinstance(self.compensation, str):  # a bare method name takes that method's default options
            return check_config(CompensationConfig(self.compensation))
        if self.compensation is not None:
            return check_config(self.compensation)
        return CompensationConfig(default_compensation(self.metric))

    def validate(self) -> PruneConfig:
        check_ratio(self.ratio)
        get_structure(self.structure)
        metric = get_metric(self.metric)
        self.resolved_compensation()
        check_attn_unit(self.structure, self.options)
        sequential = self.sequential if self.sequential is not None else metric.sequential
        if self.options.attn_unit == "query" and (sequential or method_facts(self.metric).selector == "obs"):
            raise FlapError(f"query-head units (attn_unit 'query') are not available with {self.metric} "
                            "(sequential calibration or its own OBS pass); use attn_unit 'group'")
        problem = structure_problem(self.metric, self.structure, sequential)
        if problem:
            raise FlapError(problem)
        return self

    def to_dict(self) -> dict:
        """The settings with the compensation resolved (what a manifest records)."""
        return asdict(replace(self, compensation=self.resolved_compensation()))


@dataclass
class PruneResult:
    selection: Selection
    achieved_ratio: float
    stats: list[LayerStats] | None
    comps: list[LayerComp] | None  # kept for a resident model without a sink; None when written or nothing
    seconds: dict
    compensation: CompensationConfig | None = None


class LayerSink(Protocol):
    """Receives each decoder layer right after it is cut (persist.ShardSink writes it to its own shard)."""

    def write_layer(self, i: int, layer: DecoderLayer) -> None: ...


def _sequential_selection(store: LayerStore, windows: torch.Tensor, cfg: PruneConfig, arch: ArchView,
                          progress: bool) -> tuple[list[LayerStats], Selection]:
    """Wanda-sp as officially run: select layer l, then feed its masked outputs to layer l+1. The masking is
    done on a copy of the layer, so the store's layers stay dense (a compensation reads them afterwards)."""
    metric = get_metric(cfg.metric)
    n_groups = None if cfg.structure == "ul_um" else groups_removed(cfg.options, arch, cfg.ratio) // arch.num_layers
    keep: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_layer(i: int, layer: DecoderLayer, stats: LayerStats) -> nn.Module:
        a, m = layer_channel_scores(metric, layer.self_attn.o_proj.weight.cpu(), layer.mlp.down_proj.weight.cpu(),
                                    stats, cfg.square_attn)
        check_finite_scores([(a, m)], f"{cfg.metric} scores", first_layer=i)
        keep.append(ul_layer(a, m, arch, cfg.ratio, cfg.options, n_groups))
        masked = copy.deepcopy(layer)
        mask_layer(masked, *keep[-1], None, arch)
        return masked

    stats = collect_stats(store, windows, cfg.batch_size, on_layer=on_layer, progress=progress)
    return stats, Selection([g for g, _ in keep], [c for _, c in keep])


@torch.no_grad()
def select(source: nn.Module | LayerStore, windows: torch.Tensor | None, cfg: PruneConfig, progress: bool = True,
           refit: bool = False) -> tuple[list[LayerStats] | None, Selection, dict, list[LayerComp] | None]:
    """(statistics, selection, seconds, refit) of `cfg` on the model behind `source`, which is left dense:
    calibration (sequential for Wanda-sp), scores and the structure's selection. refit: also return the OBS
    pass's own lsq refit (obs_select; None for every other metric, or when not asked)."""
    cfg.validate()
    store = as_store(source)
    metric, entry = get_metric(cfg.metric), get_compensation(cfg.resolved_compensation().method)
    needs_stats = metric.needs_data or entry.needs == "stats"
    t0 = time.perf_counter()
    sequential = cfg.sequential if cfg.sequential is not None else metric.sequential
    stats: list[LayerStats] | None
    comps = None
    if method_facts(cfg.metric).selector == "obs":
        if windows is None:
            raise FlapError(f"metric {cfg.metric!r} selects on calibration windows; none were given")
        from .obs_select import obs_select
        stats, sel, comps = obs_select(store, windows, cfg, progress, refit)
    elif sequential:
        if windows is None:
            raise FlapError(f"metric {cfg.metric!r} calibrates sequentially and needs calibration windows")
        stats, sel = _sequential_selection(store, windows, cfg, store.arch, progress)
    else:
        if needs_stats and windows is None:
            raise FlapError(f"metric {cfg.metric!r} / compensation {entry.name!r} needs calibration windows")
        stats = collect_stats(store, windows, cfg.batch_size, progress=progress) \
            if needs_stats and windows is not None else None  # (not None when needs_stats: checked above)
    t1 = time.perf_counter()
    if not sequential and method_facts(cfg.metric).selector != "obs":
        sel = get_structure(cfg.structure)(channel_scores(metric, store, stats, cfg.square_attn), store.arch,
                                           cfg.ratio, cfg.options)
    return stats, sel, {"calibrate": t1 - t0, "score_select": time.perf_counter() - t1}, comps


@torch.no_grad()
def prune(source: nn.Module | LayerStore, windows: torch.Tensor | None, cfg: PruneConfig, progress: bool = True,
          sink: LayerSink | None = None) -> PruneResult:
    """Prune the model behind `source` (an in-memory model, or a layer store such as a StreamedModel).

    Each layer is compensated on its dense weights, cut, and handed to `sink` if given. An in-memory model
    ends physically pruned with a FlapLlamaConfig; a streamed store's layers exist only in what the sink
    wrote (the store is spent). `windows` (N x T tokens) may be None for data-free metrics."""
    cfg.validate()
    store = as_store(source)
    if isinstance(store, ResidentStore):
        check_finite_weights(store.model)  # streamed: every layer is checked as it is read
    elif sink is None:
        raise FlapError("a streamed prune needs a sink to write the cut layers to (persist.write_streamed)")
    comp, arch, metric = cfg.resolved_compensation(), store.arch, get_metric(cfg.metric)
    entry = get_compensation(comp.method)
    reads = metric.needs_data or entry.needs != "nothing"
    if reads and windows is None:
        raise FlapError(f"metric {cfg.metric!r} / compensation {comp.method!r} needs calibration windows")
    n, t = windows.shape[:2] if windows is not None and reads else (0, 0)
    extra = extra_bytes(comp, arch, n, t, torch.empty(0, dtype=store.dtype).element_size())
    store.check_budget(n, t, "streamed pruning" + (f" with {comp.method} ({comp.form})" if extra else ""), extra)
    # in memory, an OBS selection's own refit is the lsq compensation asked for: no second pass (obs_select)
    reuse = isinstance(store, ResidentStore) and is_obs_refit(cfg.metric, asdict(comp), cfg.options.obs_damping)
    stats, sel, seconds, refit = select(store, windows, cfg, progress, refit=reuse)
    t2 = time.perf_counter()
    step = (lambda i, _layer: refit[i]) if refit is not None else \
        begin(CompensationInputs(store, sel, arch, comp, stats, windows, cfg.batch_size, progress))
    comps: list[LayerComp | None] = []
    for i in tqdm(range(store.num_layers), desc=f"compensate ({comp.method}) + cut", unit="layer",
                  disable=not progress):
        with store.layer(i) as layer:  # dense weights: the compensation is computed before the cut
            c = step(i, layer)
            cut_layer(layer, sel.keep_groups[i], sel.keep_channels[i], c, arch,
                      sel.keep_heads[i] if sel.keep_heads else None)
            if sink is not None:
                sink.write_layer(i, layer)
            else:
                comps.append(c)
    store.model.config = flap_config(store.config, sel)
    store.cut = True  # its layers are cut: a streamed store is spent for another run
    kept = None if sink is not None or any(c is None for c in comps) else [c for c in comps if c is not None]
    return PruneResult(sel, sel.achieved_ratio(arch), stats, kept,
                       {**seconds, "compensate_cut": time.perf_counter() - t2}, comp)
