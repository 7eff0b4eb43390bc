"""Report tables and figure from evaluate-stage records: the achieved ratio beside every number, methods
compared at equal achieved ratio, zero-shot in the paper's layout; MLflow groups by achieved ratio."""
from flap_exp.pipeline.plots import ppl_vs_ratio
from flap_exp.pipeline.report import ablation_table, main_table, zeroshot_table
from flap_exp.pipeline.results import achieved_group
from flap_exp.pipeline.tracking import ratio_tags


def _row(metric, structure, ratio, achieved, ppl, zs=None):
    r = {"metric": metric, "structure": structure, "ratio": ratio,
         "compensation": "bias" if metric == "wifv" else "none", "achieved_ratio": achieved, "perplexity": ppl}
    if zs:
        r["zeroshot"] = {"tasks": {t: {"score": v, "metric": "acc"} for t, v in zs.items()}, "limit": 10,
                         "lm_eval_version": "0.4.13", "source": "local"}
        r["zeroshot_avg"] = sum(zs.values()) / len(zs)
    return r


DENSE = {**_row("dense", "", 0, 0.0, 20.0, {"piqa": 0.7, "boolq": 0.6}), "eval_data": {"name": "wikitext2"},
         "ppl_windows": 8, "seqlen": 128}


def test_tables_show_achieved_ratio_everywhere_and_lay_out_zeroshot():
    rows = [_row("wifv", "al_am", 0.2, 0.2001, 25.0, {"piqa": 0.65, "boolq": 0.55}),
            _row("wanda_sp", "ul_um", 0.2, 0.1499, 27.0, {"piqa": 0.6, "boolq": 0.5})]
    md = "\n".join(ablation_table(rows, DENSE) + zeroshot_table(rows, DENSE))
    assert "| wifv (bias) | 25.00 / 60.00% (removed 0.200) |" in md  # on target: the achieved ratio is still shown
    assert "27.00 / 55.00% (removed 0.150)" in md
    assert "## Zero-shot accuracy (%)" in md and "first 10 documents per task" in md
    assert "| method | ratio | removed | piqa (acc) | boolq (acc) | average |" in md
    assert "| dense | 0 | 0.000 | 70.00 | 60.00 | 65.00 |" in md
    assert "| wanda_sp/ul_um (none) | 0.2 | 0.150 | 60.00 | 50.00 | 55.00 |" in md


def test_method_table_compares_at_equal_achieved_ratio():
    """A cell that missed its target sits in the column of what it removed, beside the others that removed
    as much (FLAP run at Wanda-sp's achieved 0.15), not beside the cells of its nominal ratio."""
    rows = [_row("wifv", "al_am", 0.2, 0.2001, 25.0), _row("wifv", "al_am", 0.15, 0.1502, 22.0),
            _row("wanda_sp", "ul_um", 0.2, 0.1499, 27.0)]
    section = "\n".join(main_table(rows, DENSE))
    assert "| method | 0.15 | 0.20 |" in section
    assert "| wanda_sp/ul_um (none) | 27.00 (removed 0.150) |  |" in section
    assert "| wifv/al_am (bias) | 22.00 (removed 0.150) | 25.00 (removed 0.200) |" in section


def test_figure_plots_achieved_ratio():
    rows = [{**_row("wifv", "al_am", r, a, p), "method": "flap"}
            for r, a, p in ((0.2, 0.2001, 25.0), (0.5, 0.4999, 90.0))]
    rows.append({**_row("wanda_sp", "ul_um", 0.2, 0.1499, 27.0), "method": "wanda"})
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        drawn = ppl_vs_ratio(rows, 20.0, Path(tmp) / "f.png")
        assert (Path(tmp) / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert drawn["flap"] == [0.2001, 0.4999] and drawn["wanda"] == [0.1499]


def test_mlflow_groups_by_achieved_ratio():
    assert achieved_group(0.2001) == achieved_group(0.1996) == "0.20" and achieved_group(0.1499) == "0.15"
    row = _row("wanda_sp", "ul_um", 0.2, 0.1499, 27.0)
    assert ratio_tags(row) == {"flap.nominal_ratio": "0.2", "flap.achieved_ratio": "0.15"}
    assert ratio_tags(None) == {"flap.nominal_ratio": "0", "flap.achieved_ratio": "0.00"}


def test_compensation_table_and_csv(tmp_path):
    import csv

    from flap_exp.pipeline.report import table_files
    dense = {**_row("dense", "", 0, 0.0, 20.0), "eval_data": {"name": "wikitext2"}, "ppl_windows": 8, "seqlen": 128}
    rows = []
    for comp, ppl in (("none", 40.0), ("bias", 30.0), ("lsq", 24.0)):
        r = {**_row("wifv", "al_am", 0.5, 0.5004, ppl), "compensation": comp, "key": f"wifv-al_am-0.5-{comp}",
             "cell": "wifv-al_am-0.5", "compensation_options": {"damping": 0.01, "form": "sequential"} if comp == "lsq"
             else {}}
        rows.append(r)
    rows.append({**_row("wanda_sp", "ul_um", 0.5, 0.45, 50.0), "compensation": "none", "key": "wanda_sp-ul_um-0.5-none",
                 "cell": "wanda_sp-ul_um-0.5"})
    sels = {r["cell"]: {"structure": r["structure"]} for r in rows}
    table = {"title": "Compensation", "layout": "compensation", "measure": [], "cells": [r["key"] for r in rows]}
    table_files("compensation", table, rows, dense, sels, "quick", tmp_path)
    assert (tmp_path / "figures" / "compensation.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "compensation.md").read_text()
    assert "| metric | structure | ratio | removed | none | bias | lsq | none / bias | lsq / bias |" in md
    assert "| wifv | al_am | 0.5 | 0.500 | 40.00 | 30.00 | 24.00 | 1.333 | 0.800 |" in md
    assert "| wanda_sp | ul_um | 0.5 | 0.450 | 50.00 |  |  |  |  |" in md
    assert "Options: lsq: damping=0.01, form=sequential." in md
    got = {r["key"]: r for r in csv.DictReader((tmp_path / "compensation.csv").open())}
    assert got["wifv-al_am-0.5-lsq"]["damping"] == "0.01" and got["wifv-al_am-0.5-lsq"]["form"] == "sequential"
    assert got["wifv-al_am-0.5-bias"]["damping"] == "" and float(got["wifv-al_am-0.5-none"]["perplexity"]) == 40.0


def test_one_name_per_quantity_in_csv_metrics_json_and_mlflow():
    """The same quantity has the same name in the CSV, reports/metrics.json and the MLflow run."""
    from flap_exp.pipeline.report import _extras, metrics_summary
    from flap_exp.pipeline.tracking import run_metrics
    r = {**_row("wifv", "al_am", 0.2, 0.2001, 25.0, {"piqa": 0.65}), "key": "k", "perplexity_extra": {"c4": 30.0},
         "speedup": {"prefill_b1_s128": 1.3}, "throughput_tokens_per_s": {"prefill_b1_s128": 900.0}}
    csv_names = set(_extras(r)) | {"perplexity", "achieved_ratio", "zeroshot_avg"}
    mlflow = run_metrics(r, {})
    dvc = metrics_summary([r], {**DENSE, "key": "dense"})["k"]
    assert csv_names <= set(mlflow) and set(dvc) <= set(mlflow)
    assert {"perplexity.c4", "zeroshot.piqa", "speedup.prefill_b1_s128", "tokens_per_s.prefill_b1_s128"} <= csv_names
