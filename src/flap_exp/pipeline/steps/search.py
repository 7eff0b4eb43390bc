"""Stage search: which k/v groups and MLP channels each layer keeps, for one (metric, structure, ratio) cell.

Dense metrics select from cached scores. Sequential ones (Wanda-sp) calibrate again, layer by layer
with the previous layers already pruned, so their statistics depend on the ratio: `prune` on a
throwaway copy of the model gives both the selection and those statistics.
"""
from __future__ import annotations

from dataclasses import asdict, replace

from ...allocation_search import search_allocation
from ...arch import ArchView
from ...catalogue import STRUCTURES, structure_of
from ...compensation import CompensationConfig
from ...errors import FlapError
from ...stats import stats_to_tensors
from ...store import as_store
from ...structures import check_ratio, get_structure, select_from_units
from ..artifacts.io import load_tensors, read_json
from ..study.settings import structure_options
from .score import checked_scores, scores_from_tensors, units_from_tensors


def selection_record(sel, arch, cell: dict) -> dict:
    removed = sel.removed_params(arch)
    return {**cell, "achieved_ratio": sel.achieved_ratio(arch), "removed_params": removed,
            "kept_params": arch.total_params - removed, "total_params": arch.total_params,
            "num_kv_heads": arch.num_kv_heads, "intermediate_size": arch.intermediate_size,
            "kept_groups_per_layer": [int(g.sum()) for g in sel.keep_groups],
            "kept_channels_per_layer": [int(c.sum()) for c in sel.keep_channels], **sel.to_json()}


def search(score_tensors: dict, arch, cell: dict, opts: dict) -> dict:
    structure = get_structure(structure_of(cell["structure"]))
    sel = structure(scores_from_tensors(score_tensors), arch, check_ratio(cell["ratio"]), structure_options(opts, arch))
    return selection_record(sel, arch, cell)


def search_units(units: dict, arch, cell: dict, opts: dict) -> dict:
    """An adaptive structure's selection from the standardize stage's units (groups, channels)."""
    groups, channels = units_from_tensors(units, arch)
    sel = select_from_units(structure_of(cell["structure"]), groups, channels, arch, cell["ratio"],
                            structure_options(opts, arch))
    return selection_record(sel, arch, cell)


def search_file(path: str, arch, cell: dict, opts: dict) -> dict:
    """The selection of a cell from its input file: standardized units (AL structures) or raw scores (UL)."""
    tensors, meta = load_tensors(path)
    if meta.get("metric") != cell["metric"]:
        raise FlapError(f"{path} holds {meta.get('metric')!r} scores, not {cell['metric']!r}; refusing it")
    adaptive = STRUCTURES.get(structure_of(cell["structure"])).adaptive
    if adaptive != bool(meta.get("units")):
        raise FlapError(f"{path}: structure {cell['structure']} reads "
                        f"{'standardized units' if adaptive else 'raw scores'}, this file holds the other kind")
    rec = (search_units(tensors, arch, cell, opts) if adaptive
           else search(checked_scores(tensors, meta, arch, cell["metric"], path), arch, cell, opts))
    return {**rec, "calib": meta.get("calib")}


def _prune_config(arch, cell: dict, metric_opts: dict, opts, batch_size: int):
    from ...prune import PruneConfig  # prune imports transformers: the search stage reads scores only
    # The selection only: the cell's compensation is its own stage (compensate@CELL-COMP).
    return PruneConfig(cell["metric"], structure_of(cell["structure"]), float(cell["ratio"]),
                       compensation=CompensationConfig("none"), square_attn=metric_opts.get("square_attn"),
                       sequential=metric_opts.get("sequential"), options=opts, batch_size=batch_size)


def allocate(model, windows, cell: dict, opts: dict, batch_size: int) -> dict:
    """Structure kl_search's searched levels for a cell (the allocate stage): levels, history, seconds."""
    arch = ArchView.from_config(model.config)
    cfg = _prune_config(arch, cell, {}, structure_options(opts, arch), batch_size).validate()
    res, secs = search_allocation(as_store(model), windows, cfg, progress=True)
    o = cfg.options
    return {**cell, **asdict(res), "seconds": secs, "search_step": o.search_step, "search_seed": o.search_seed,
            "search_candidates": o.search_candidates, "search_windows": secs["windows"]}


def searched_levels(path: str, cell: dict) -> list[float]:
    """The levels of the allocate stage's file, refused unless they were searched for this cell."""
    rec = read_json(path)
    keys = ("metric", "structure", "ratio")
    if tuple(rec.get(k) for k in keys) != tuple(cell[k] for k in keys):
        raise FlapError(f"{path} holds the levels of {rec.get('metric')}/{rec.get('structure')} at {rec.get('ratio')}, "
                        f"not of this cell; rerun its allocate stage")
    return rec["levels"]


def search_sequential(model, windows, cell: dict, metric_opts: dict, opts: dict, batch_size: int,
                      levels: list[float] | None = None, refit: bool = False):
    """(selection record, stats tensors, refit) of a sequentially calibrated cell; `model` (in memory or a layer
    store) stays dense. `levels`: kl_search's levels from the allocate stage. refit: also the OBS pass's own lsq
    refit as (its CompensationConfig, the per-layer LayerComps); None when not asked."""
    from ...prune import select  # prune imports transformers: the search stage reads scores only
    arch = ArchView.from_config(model.config)
    o = structure_options(opts, arch)
    cfg = _prune_config(arch, cell, metric_opts, o if levels is None else replace(o, levels=tuple(levels)),
                        batch_size)
    stats, sel, _, comps = select(model, windows, cfg, progress=True, refit=refit)
    assert stats is not None  # a sequential pass always records the statistics it pruned with
    if refit and comps is None:
        raise FlapError(f"metric {cell['metric']!r} has no OBS pass whose refit a cell could reuse")
    out = None if comps is None else (CompensationConfig("lsq", o.obs_damping, "sequential"), comps)
    return selection_record(sel, arch, cell), stats_to_tensors(stats), out
