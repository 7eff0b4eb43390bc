"""One catalogue of method facts and defaults: the library, the CLI, the pipeline and conf/ agree.

The agreement test runs the same settings through the CLI path (`flap-exp prune` options -> PruneConfig
-> prune()) and through the pipeline path (conf/ composed -> grid cells -> score/search or search_seq ->
compensate stage function) on a tiny model, and asserts identical selections and compensation tensors.
"""
from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from flap_exp import catalogue
from flap_exp.arch import ArchView
from flap_exp.calibrate import collect_stats
from flap_exp.cli import _parser, prune_config
from flap_exp.compensation import CompensationConfig, comps_to_tensors
from flap_exp.errors import FlapError
from flap_exp.metrics import get_metric
from flap_exp.pipeline.steps.compensate import compensate as pipeline_compensate
from flap_exp.pipeline.steps.score import score
from flap_exp.pipeline.steps.search import search, search_sequential
from flap_exp.pipeline.study import cells
from flap_exp.pipeline.study.compose import compose
from flap_exp.prune import prune
from flap_exp.stats import stats_from_tensors

from helpers.models import tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params() -> dict:
    return yaml.safe_load(compose([], ROOT / "conf"))


CALIB = {"corpus": "wiki", "nsamples": 128}


def expand(blocks: dict, params: dict, metrics: dict | None = None) -> dict:
    """The pipeline's cells for one table of `blocks`, on the default calibration wiki-128."""
    return cells.expand_study({"t": {"blocks": blocks}}, metrics or params["metrics"], params["compensations"], CALIB)


def test_library_facts_come_from_the_catalogue(params):
    assert set(catalogue.METRICS) == set(catalogue.METHODS) == set(cells.METRICS)
    for name in catalogue.METRICS:
        m, f = get_metric(name), catalogue.METHODS[name]
        assert (m.needs_data, m.square_attn, m.sequential) == (f.needs_data, f.square_attn, f.sequential)
    assert cells.DATA_FREE == {"weight_magnitude"}
    assert catalogue.structures_where("per_layer") == ("ul_um", "ul_mm")
    assert catalogue.structures_where("adaptive") == ("al_mm", "al_am")
    # The official defaults (flap-spec.md §4, §6): FLAP's metrics add the bias, the baselines nothing.
    assert {m: f.compensation for m, f in catalogue.METHODS.items()} == {
        "ifv": "bias", "wifv": "bias", "wifn": "bias", "weight_magnitude": "none", "wanda_sp": "none",
        "obs": "lsq"}  # the OBS selector's survivors end on lsq of the kept set: its natural compensation
    # conf/: the metric files defer to the catalogue; one file per compensation; lsq's values are the library's.
    assert all(params["metrics"][m]["compensation"] is None for m in catalogue.METHODS)
    assert {c["method"] for c in params["compensations"].values()} == set(catalogue.COMPENSATIONS)
    assert {p.stem for p in (ROOT / "conf" / "compensation").glob("*.yaml")} == set(params["compensations"])
    lsq = params["compensations"]["lsq"]
    assert lsq == {f.name: f.default if f.name != "method" else "lsq" for f in fields(CompensationConfig)}


def test_cli_and_pipeline_agree_on_default_compensation(params):
    """The catalogue's default reaches both paths: the CLI no longer compensates Wanda-sp."""
    grid = {"g": {"metrics": list(catalogue.METHODS), "structures": ["ul_um"], "ratios": [0.5]}}
    table = expand(grid, params)["evaluate"]
    for metric in catalogue.METHODS:
        cfg = prune_config(_parser().parse_args(["prune", "--metric", metric, "--structure", "ul_um", "--out", "x"]))
        method = cfg.resolved_compensation().method
        calib = None if metric in cells.DATA_FREE else "wiki-128"
        assert f"{cells.cell_key(metric, 'ul_um', 0.5, calib)}-{method}" in table
        assert method == catalogue.METHODS[metric].compensation


def _pipeline(model, windows, metric, structure, ratio, method, params):
    """What the DVC stages compute for one cell, called in-process."""
    arch = ArchView.from_config(model.config)
    mcfg, scfg = params["metrics"][metric], params["structures"][structure]
    cell = {"metric": metric, "structure": structure, "ratio": ratio}
    batch = params["data"]["calib"]["batch_size"]
    if cells.is_sequential(metric, mcfg.get("sequential")):
        rec, st, _ = search_sequential(copy.deepcopy(model), windows, cell, mcfg, scfg, batch)
        stats = stats_from_tensors(st)
    else:
        stats = collect_stats(model, windows, batch, progress=False)
        data = stats if catalogue.METHODS[metric].needs_data else None
        rec = search(score(model, data, metric, mcfg.get("square_attn")), arch, cell, scfg)
    tensors, meta = pipeline_compensate(copy.deepcopy(model), rec, arch, params["compensations"][method], stats,
                                        windows, batch)
    return rec, tensors, meta


CASES = [("wifv", "al_am", 0.5, []), ("wanda_sp", "ul_um", 0.5, []), ("weight_magnitude", "ul_um", 0.5, []),
         ("wanda_sp", "ul_um", 0.5, ["--compensation", "bias"]), ("wifv", "ul_um", 0.3, ["--no-compensate"]),
         pytest.param("wifv", "al_am", 0.5, ["--compensation", "lsq"]),
         pytest.param("wanda_sp", "ul_um", 0.5, ["--compensation", "lsq"])]


@pytest.mark.parametrize("metric,structure,ratio,extra", CASES)
def test_cli_path_equals_pipeline_path(params, metric, structure, ratio, extra):
    model = tiny_model(heads=4, kv=2)
    windows = torch.randint(0, 101, (12, 16), generator=torch.Generator().manual_seed(3))
    a = _parser().parse_args(["prune", "--metric", metric, "--structure", structure, "--ratio", str(ratio),
                              "--batch-size", str(params["data"]["calib"]["batch_size"]), "--out", "x", *extra])
    cfg = prune_config(a)
    method = cfg.resolved_compensation().method
    # The pipeline cell for the same settings: the block's compensation, or the default (no key).
    block = {"metrics": [metric], "structures": [structure], "ratios": [ratio]}
    if "--compensation" in extra or "--no-compensate" in extra:
        block["compensation"] = [method]
    table = expand({"b": block}, params)["evaluate"]
    calib = None if metric in cells.DATA_FREE else "wiki-128"
    data_comp = calib is None and method != "none"  # a data-free metric's bias reads a calibration too
    key = cells.cell_key(metric, structure, ratio, calib) + ("-wiki-128" if data_comp else "")
    assert list(table) == [f"{key}-{method}"]
    rec, tensors, meta = _pipeline(model, windows, metric, structure, ratio, method, params)
    res = prune(copy.deepcopy(model), windows, cfg, progress=False)
    sel = res.selection.to_json()
    assert sel["kept_groups"] == rec["kept_groups"] and sel["kept_channels"] == rec["kept_channels"]
    cli_tensors = comps_to_tensors(res.comps)
    assert sorted(cli_tensors) == sorted(tensors)
    assert (len(tensors) == 0) == (method == "none")
    for k, t in tensors.items():
        assert torch.equal(cli_tensors[k], t), k
    assert meta["compensation"]["method"] == method


def test_grid_rejects_unknown_and_legacy_compensation(params):
    from flap_exp.errors import FlapError
    block = {"metrics": ["wifv"], "structures": ["al_am"], "ratios": [0.5]}
    with pytest.raises(FlapError, match="unknown compensation 'ridge'; known compensations: none, bias, lsq, "):
        expand({"b": {**block, "compensation": ["ridge"]}}, params)
    with pytest.raises(FlapError, match="'compensate' was replaced by 'compensation'"):
        expand({"b": {**block, "compensate": [True]}}, params)
    t = expand({"b": {**block, "compensation": ["none", "bias", "lsq", "default", "lsq_dense"]}}, params)
    k = "wifv-al_am-0.5-wiki-128"
    assert list(t["evaluate"]) == [f"{k}-none", f"{k}-bias", f"{k}-lsq", f"{k}-lsq_dense"]
    assert list(t["compensate"]) == [f"{k}-none", f"{k}-bias"]
    assert list(t["compensate_lsq"]) == [f"{k}-lsq", f"{k}-lsq_dense"]
    assert t["compensate"][f"{k}-bias"]["stats"] == "results/calibrate/wiki-128/stats.safetensors"
    assert t["compensate_lsq"][f"{k}-lsq_dense"]["method"] == "lsq"
    # A conf override of a metric's default reaches the grid.
    t = expand({"b": block}, params, {**params["metrics"], "wifv": {"compensation": "none"}})
    assert list(t["evaluate"]) == [f"{k}-none"]


@pytest.mark.parametrize("override,msg", [
    ("compensations.lsq.damping=-1", "lsq damping must be a finite number >= 0"),
    ("compensations.lsq.form=sideways", "unknown lsq form 'sideways'; known forms: sequential, dense, drift"),
    ("+compensations.lsq.rank=4", "unknown compensation option(s) rank"),
    ("compensations.bias.method=lsq", "compensations.bias.method is 'lsq'; it must be 'bias'"),
    ("compensations.lsq_dense.method=bias", "a variant's name starts with its method"),
    ("tables.main.blocks.flap.compensation=[ridge]", "unknown compensation 'ridge'"),
])
def test_compose_validates_compensation_options(override, msg):
    """Bad compensation settings stop composition (before any stage), in one line."""
    from flap_exp.errors import FlapError
    extra = ["+tables.main.blocks.flap.compensation=[ridge]"] if override.startswith("tables.") else [override]
    with pytest.raises(FlapError) as err:
        from flap_exp.pipeline.study.compose import cells_text
        cells_text(compose(extra, ROOT / "conf"))
    assert msg in str(err.value) and "\n" not in str(err.value)


def test_compensation_fields_agree():
    assert catalogue.COMPENSATION_FIELDS == tuple(f.name for f in fields(CompensationConfig))


def test_structure_variant_is_its_base_search_with_its_options(params):
    """conf/structure/al_am_floor: a cell of its own (key and table row), searched by al_am with a floor of a
    quarter of each MLP (a fraction resolved with the model's width), removing the same share as al_am."""
    model = tiny_model(heads=4, kv=2)
    arch = ArchView.from_config(model.config)
    windows = torch.randint(0, 101, (12, 16), generator=torch.Generator().manual_seed(3))
    structures = tuple(params["structures"])
    assert "al_am_floor" in structures and params["structures"]["al_am_floor"]["min_channels"] == 0.25
    table = cells.expand_study({"t": {"blocks": {"b": {"metrics": ["wifv"], "structures": ["al_am", "al_am_floor"],
                                                        "ratios": [0.5]}}}},
                               params["metrics"], params["compensations"], CALIB, structures)
    assert sorted(table["search"]) == ["wifv-al_am-0.5-wiki-128", "wifv-al_am_floor-0.5-wiki-128"]
    assert len({c["input"] for c in table["search"].values()}) == 1  # both read one standardize output
    rec, _, _ = _pipeline(model, windows, "wifv", "al_am_floor", 0.5, "bias", params)
    floor = round(0.25 * arch.intermediate_size)
    stats = collect_stats(model, windows, params["data"]["calib"]["batch_size"], progress=False)
    base = search(score(model, stats, "wifv", params["metrics"]["wifv"].get("square_attn")), arch,
                  {"metric": "wifv", "structure": "al_am", "ratio": 0.5}, {"min_channels": floor})
    assert rec["kept_channels"] == base["kept_channels"] and rec["kept_groups"] == base["kept_groups"]
    assert min(rec["kept_channels_per_layer"]) >= floor
    assert abs(rec["achieved_ratio"] - 0.5) * arch.total_params <= arch.group_params
    with pytest.raises(FlapError, match="unknown structure 'xx_floor'"):
        cells.expand_study({"t": {"blocks": {"b": {"metrics": ["wifv"], "structures": ["al_am"], "ratios": [0.5]}}}},
                           params["metrics"], params["compensations"], CALIB, structures + ("xx_floor",))
