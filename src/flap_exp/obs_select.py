"""Metric `obs`: the selection by greedy structured OBS, sequentially through the store, under an allocation.

The structure is the allocation (how many groups and channels each layer removes; allocation.py):

    ul_um   uniform: every layer the ratio
    ul_log  SlimGPT's log-increasing profile
    al_am   FLAP's global threshold: the per-layer counts of FLAP's own selection (wifv, al_am) on the
            dense model's statistics (one dense calibration pass first)
    curve   a uniform OBS pass run to the last unit of every projection gives each layer's error curves;
            the knapsack over them, each relative to its projection's whole loss (allocation.curve_counts,
            relative_curves), sets the counts of a second OBS pass
    kl_search  per-layer levels searched by evolution, fitness the KL to the dense model (allocation_search.py;
            or the levels given in the options, the pipeline's allocate stage)

Each OBS pass is compensation/obs_pass.py, layer by layer through the store (resident or streamed), with the
pruned model's own stream. The model stays dense: the cell's compensation (lsq by default) refits the
survivors afterwards, which with lsq's damping reproduces the stream the pass selected on; so where the
compensation is that very lsq (catalogue.is_obs_refit), the pass's own refit is returned and used instead.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .allocation import Counts, counts_of, curve_counts, layer_counts, log_ratios, relative_curves
from .allocation_search import search_allocation
from .calibrate import check_windows, collect_stats, layer_inputs
from .compensation.base import LayerComp
from .compensation.obs_pass import ObsLayer, ObsPass
from .errors import FlapError
from .metrics import channel_scores, get_metric
from .selection import Selection
from .stats import LayerStats
from .store import LayerStore, ResidentStore
from .structures import get_structure

if TYPE_CHECKING:
    from .prune import PruneConfig

#: Channels per choice of the curve allocation's knapsack (a finer grid costs time, not accuracy of the ratio:
#: the budget is met to within this many channels over the whole model).
CURVE_STEP = 8


def _pass(store: LayerStore, windows: torch.Tensor, cfg: PruneConfig, counts: Counts, full_curves: bool,
          progress: bool, keep_refit: bool = False) -> list[ObsLayer]:
    hs, kws = layer_inputs(store, windows, cfg.batch_size)
    budget = 2 * 2**30 if isinstance(store, ResidentStore) else 0  # streamed: hold no MLP inputs (as lsq)
    p = ObsPass(hs, kws, store.arch, counts, cfg.options.obs_damping, cfg.options.obs_batch, full_curves, budget,
                keep_refit)
    del hs
    out = []
    for i in tqdm(range(store.num_layers), desc="obs" + (" curves" if full_curves else ""), unit="layer",
                  disable=not progress):
        with store.layer(i) as layer:
            out.append(p.step(i, layer))
    return out


def allocation_counts(store: LayerStore, windows: torch.Tensor, cfg: PruneConfig, progress: bool) -> Counts:
    """The per-layer counts of cfg.structure that need no OBS pass (ul_um and curve's first pass: uniform)."""
    arch, o = store.arch, cfg.options
    if cfg.structure == "al_am":
        stats = collect_stats(store, windows, cfg.batch_size, progress=progress)
        flap = get_structure("al_am")(channel_scores(get_metric("wifv"), store, stats, None), arch, cfg.ratio, o)
        return counts_of(flap)
    if cfg.structure == "kl_search":
        levels: list[float]
        if o.levels is None:
            levels = list(search_allocation(store, windows, cfg, progress)[0].levels)
        else:
            levels = list(o.levels)
        if len(levels) != arch.num_layers:
            raise FlapError(f"kl_search: {len(levels)} levels for {arch.num_layers} layers")
        return layer_counts(arch, list(levels), o.min_groups, o.min_channels)
    ratios = log_ratios(arch.num_layers, cfg.ratio) if cfg.structure == "ul_log" else [cfg.ratio] * arch.num_layers
    return layer_counts(arch, ratios, o.min_groups, o.min_channels)


@torch.no_grad()
def obs_select(store: LayerStore, windows: torch.Tensor, cfg: PruneConfig, progress: bool = True,
               refit: bool = False) -> tuple[list[LayerStats], Selection, list[LayerComp] | None]:
    """(the pruned stream's statistics, the selection, the refit) of metric obs under cfg.structure's allocation.

    refit: also return the pass's per-layer lsq refit of the kept columns (LayerComps; None otherwise), which is
    the lsq compensation of the selection when catalogue.is_obs_refit says so. It is held in memory until the
    end (about the size of the kept o_proj/down_proj weights in float64), so only for a model in memory."""
    check_windows(windows)
    counts = allocation_counts(store, windows, cfg, progress)
    curve = cfg.structure == "curve"
    layers = _pass(store, windows, cfg, counts, curve, progress, refit and not curve)
    if curve:
        o = cfg.options
        counts = curve_counts(store.arch, cfg.ratio, relative_curves([x.curves for x in layers]), CURVE_STEP,
                              o.min_groups, o.min_channels)
        layers = _pass(store, windows, cfg, counts, False, progress, refit)
    comps = [x.refit for x in layers if x.refit is not None] if refit else None  # every layer's, when asked
    return ([x.stats for x in layers], Selection([x.keep_groups for x in layers], [x.keep_channels for x in layers]),
            comps)
