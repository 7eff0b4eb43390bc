"""Report tables and figure from evaluate-stage records: the achieved ratio beside every number, methods
compared at equal achieved ratio, zero-shot in the paper's layout; MLflow groups by achieved ratio."""
from flap_exp.pipeline.artifacts.results import achieved_group
from flap_exp.pipeline.reporting.plots import ppl_vs_ratio
from flap_exp.pipeline.reporting.report import ablation_table, main_table, zeroshot_table
from flap_exp.pipeline.reporting.tracking import ratio_tags


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

    from flap_exp.pipeline.reporting.report import table_files
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
    from flap_exp.pipeline.reporting.report import _extras, metrics_summary
    from flap_exp.pipeline.reporting.tracking import run_metrics
    r = {**_row("wifv", "al_am", 0.2, 0.2001, 25.0, {"piqa": 0.65}), "key": "k", "perplexity_extra": {"c4": 30.0},
         "speedup": {"prefill_b1_s128": 1.3}, "throughput_tokens_per_s": {"prefill_b1_s128": 900.0}}
    csv_names = set(_extras(r)) | {"perplexity", "achieved_ratio", "zeroshot_avg"}
    mlflow = run_metrics(r, {})
    dvc = metrics_summary([r], {**DENSE, "key": "dense"})["k"]
    assert csv_names <= set(mlflow) and set(dvc) <= set(mlflow)
    assert {"perplexity.c4", "zeroshot.piqa", "speedup.prefill_b1_s128", "tokens_per_s.prefill_b1_s128"} <= csv_names


def _noisy(row, se, n, nll):
    """A record as the evaluate stages now write it: per-task standard errors and document counts, the
    perplexity's per-window NLLs and 95% interval."""
    import numpy as np
    for t in row["zeroshot"]["tasks"].values():
        t |= {"score_stderr": se, "n_docs": n}
    mean, std = float(np.mean(nll)), float(np.std(nll, ddof=1))
    half = 1.959963984540054 * std / np.sqrt(len(nll))
    return row | {"ppl_window_nll": list(nll), "ppl_ci95": [float(np.exp(mean - half)), float(np.exp(mean + half))],
                  "ppl_windows": len(nll)}


def test_zeroshot_table_shows_stderr_docs_and_whether_a_gap_is_noise():
    """Two tasks of 50 documents, standard error 0.07 each (the committed table's scale): the average's error is
    sqrt(2 x 0.07^2) / 2 = 0.0495, so a 5-point gap is within noise (1.96 x sqrt(2) x 0.0495 = 0.137) and a
    20-point one is not."""
    import numpy as np
    nll = np.full(8, 3.0)
    dense = _noisy({**DENSE, "zeroshot": {**DENSE["zeroshot"], "tasks": {
        "piqa": {"score": 0.5, "metric": "acc"}, "boolq": {"score": 0.4, "metric": "acc"}}}, "zeroshot_avg": 0.45},
        0.07, 50, nll + np.linspace(-0.1, 0.1, 8))
    near = _noisy(_row("wanda_sp", "ul_um", 0.2, 0.1499, 27.0, {"piqa": 0.55, "boolq": 0.45}), 0.07, 50, nll)
    far = _noisy(_row("wifv", "al_am", 0.5, 0.5, 90.0, {"piqa": 0.3, "boolq": 0.2}), 0.07, 50, nll)
    md = "\n".join(zeroshot_table([near, far], dense))
    se_avg = np.sqrt(2 * 0.07 ** 2) / 2
    assert f"{100 * se_avg:.2f}" == "4.95"
    assert "| method | ratio | removed | piqa (acc, n=50) | boolq (acc, n=50) | average | vs dense |" in md
    assert "| dense | 0 | 0.000 | 50.00 ± 7.00 | 40.00 ± 7.00 | 45.00 ± 4.95 |  |" in md
    assert "| 55.00 ± 7.00 | 45.00 ± 7.00 | 50.00 ± 4.95 | +5.00 (within noise) |" in md
    assert "| 25.00 ± 4.95 | -20.00 (beyond noise) |" in md
    assert "one standard error" in md and "1.96" in md


def test_perplexity_cells_show_their_interval_and_compensation_ratios_are_paired(tmp_path):
    import json

    import numpy as np

    from flap_exp.pipeline.reporting.report import metrics_summary, table_files
    rng = np.random.default_rng(0)
    hard = rng.gamma(4.0, 0.5, size=16)
    dense = {**_row("dense", "", 0, 0.0, 20.0), "eval_data": {"name": "wikitext2"}, "ppl_windows": 16, "seqlen": 128,
             "key": "dense"}
    rows = []
    for comp, shift in (("none", 0.4), ("bias", 0.2), ("lsq", 0.15)):
        nll = hard + shift + rng.normal(0, 0.01, 16)
        r = _row("wifv", "al_am", 0.5, 0.5004, float(np.exp(nll.mean())))
        r = {**r, "compensation": comp, "key": f"k-{comp}", "cell": "wifv-al_am-0.5"}
        r |= {"ppl_window_nll": nll.tolist(), "ppl_windows": 16}
        half = 1.959963984540054 * nll.std(ddof=1) / 4
        r["ppl_ci95"] = [float(np.exp(nll.mean() - half)), float(np.exp(nll.mean() + half))]
        rows.append(r)
    table = {"title": "Compensation", "layout": "compensation", "measure": [], "cells": [r["key"] for r in rows]}
    table_files("compensation", table, rows, dense, {"wifv-al_am-0.5": {"structure": "al_am"}}, "quick", tmp_path)
    md = (tmp_path / "compensation.md").read_text()
    lsq, bias = rows[2], rows[1]
    d = np.array(lsq["ppl_window_nll"]) - np.array(bias["ppl_window_nll"])
    half = 1.959963984540054 * d.std(ddof=1) / 4
    lo, hi = np.exp(d.mean() - half), np.exp(d.mean() + half)
    want = f"{lsq['perplexity'] / bias['perplexity']:.3f} [{lo:.3f}, {hi:.3f}]"
    assert want in md and np.exp(d.mean() + half) < 1  # paired: the 5% gain is beyond noise ...
    assert lsq["ppl_ci95"][1] > bias["ppl_ci95"][0]  # ... though the two perplexities' intervals overlap
    assert f"{lsq['perplexity']:.2f} [{lsq['ppl_ci95'][0]:.2f}, {lsq['ppl_ci95'][1]:.2f}]" in md
    assert "95% interval over the windows" in md
    m = metrics_summary(rows, dense)["k-lsq"]
    assert m["perplexity_ci95_low"] == round(lsq["ppl_ci95"][0], 4)
    assert type(m["ppl_windows"]) is int and m["ppl_windows"] == 16
    assert m["perplexity"] == round(lsq["perplexity"], 4) and m["achieved_ratio"] == 0.5004
    json.dumps(m, allow_nan=False)
    header = (tmp_path / "compensation.csv").read_text().splitlines()[0].split(",")
    assert len(header) == len(set(header)) and "perplexity_ci95_high" in header


def test_mlflow_metrics_are_rounded_like_metrics_json_and_carry_the_noise():
    from flap_exp.pipeline.reporting.report import metrics_summary
    from flap_exp.pipeline.reporting.tracking import run_metrics
    r = {**_row("wifv", "al_am", 0.2, 0.200123456, 25.123456789, {"piqa": 0.651234567}), "key": "k",
         "ppl_ci95": [24.0123456, 26.3456789], "ppl_windows": 64}
    r["zeroshot"]["tasks"]["piqa"] |= {"score_stderr": 0.0677777777, "n_docs": 50}
    logged = run_metrics(r, {"evaluate": {"seconds": 12.345678, "peak_rss_mib": 812.3456}})
    dvc = metrics_summary([r], {**DENSE, "key": "dense"})["k"]
    assert all(logged[k] == v for k, v in dvc.items())
    assert logged["perplexity"] == 25.1235 and logged["achieved_ratio"] == 0.20012 and logged["zeroshot_avg"] == 0.65123
    assert logged["zeroshot.piqa.stderr"] == 0.06778 and logged["zeroshot.piqa.n_docs"] == 50
    assert logged["zeroshot_avg_stderr"] == 0.06778 and logged["zeroshot_docs"] == 50
    assert logged["perplexity_ci95_low"] == 24.0123 and logged["ppl_windows"] == 64
    assert logged["evaluate_seconds"] == 12.35 and logged["evaluate_peak_rss_mib"] == 812.3


def test_figures_draw_error_bars(tmp_path):
    from flap_exp.pipeline.reporting.plots import bars
    half = bars({"dense": 0.45, "wanda": 0.486, "none": None}, "acc", tmp_path / "b.png",
                {"dense": 0.05, "wanda": None})
    assert half == [0.05, None] and (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    rows = [{**_row("wifv", "al_am", 0.2, 0.2, 25.0), "method": "flap", "ppl_ci95": [23.0, 27.5]}]
    assert ppl_vs_ratio(rows, 20.0, tmp_path / "p.png") == {"flap": [0.2], "dense": [0.0, 1.0]}


def test_warned_cells_are_listed_under_their_table_in_the_summary_and_in_mlflow():
    from flap_exp.pipeline.reporting.report import table_report
    from flap_exp.pipeline.reporting.summary import summary
    from flap_exp.pipeline.reporting.tracking import warning_tags
    w = "lsq on N x T = 8 x 128 = 1,024 calibration tokens for 1,537 coefficients per output row (underdetermined)"
    r = {**_row("wifv", "al_am", 0.5, 0.5, 90.0), "compensation": "lsq", "calib": "wiki-8", "key": "k",
         "warnings": [w], "ppl_ci95": [80.0, 101.0]}
    table = {"title": "T", "layout": "calibration", "cells": ["k"]}
    md = table_report("calibration", table, [r], {**DENSE, "key": "dense"}, "quick")
    assert f"- wifv/al_am (lsq) 0.5 wiki-8: {w}" in md and "**Warnings**" in md
    assert "90.00 [80.00, 101.00] (removed 0.500)" in md
    assert "**Warnings**" not in table_report("calibration", table, [{**r, "warnings": []}], DENSE, "quick")
    text = summary({"protocol": "quick"}, {"tables": {"calibration": table}, "reports": "reports"}, [r], DENSE)
    assert f"    warning: {w}" in text and "ppl      90.00 [80.00, 101.00]" in text
    assert warning_tags(r) == {"flap.warning": w} and warning_tags({**r, "warnings": []}) == {}


def test_the_summary_links_the_runs_table_of_the_study_sorted_by_perplexity(tmp_path, monkeypatch):
    """MLflow 3.17's UI opens a fresh browser on its GenAI overview whatever the experiment's tags say; the
    printed link selects the machine-learning view and the runs table through the URL."""
    import json
    import urllib.parse

    from flap_exp.pipeline.reporting.summary import summary
    from flap_exp.pipeline.reporting.tracking import landing_url
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_PORT", raising=False)
    table = {"title": "T", "layout": "calibration", "cells": []}
    cells = {"tables": {"t": table}, "reports": "reports"}
    assert summary({"protocol": "quick"}, cells, [], DENSE).endswith("then http://127.0.0.1:5000)")  # nothing tracked
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "mlflow.json").write_text(json.dumps({"experiment_id": "7"}))
    monkeypatch.setenv("MLFLOW_PORT", "5077")
    text = summary({"protocol": "quick"}, cells, [], DENSE)
    url = landing_url("7")
    assert url in text and url.startswith("http://127.0.0.1:5077/#/experiments/7/runs?")
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(url.replace("/#/", "/")).query)
    assert q == {"workflowType": ["machine_learning"], "viewStateShareKey": ["flap"]}


def test_the_shared_view_shows_perplexity_ratio_and_method_columns_sorted_by_perplexity():
    import json

    from flap_exp.pipeline.reporting.tracking import experiment_tags
    tags = experiment_tags()
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState.flap"])
    assert view["orderByKey"] == "metrics.`perplexity`" and view["orderByAsc"] is True
    assert {"metrics.`perplexity`", "metrics.`achieved_ratio`", "params.`compensation`"} <= set(view["selectedColumns"])


def test_the_installed_mlflow_ui_reads_the_link_parameters():
    """The link relies on the UI bundle's route and URL parameters; an MLflow upgrade that drops them fails here."""
    from pathlib import Path

    import mlflow
    js = "".join(p.read_text(encoding="utf-8", errors="replace")
                 for p in (Path(mlflow.__file__).parent / "server/js/build/static/js").glob("*.js"))
    assert '"/experiments/:experimentId/runs"' in js
    assert 'get("workflowType")' in js and 'MACHINE_LEARNING="machine_learning"' in js
    assert '"orderByKey","orderByAsc"' in js  # the sort facets, which a shared view state may carry
    assert 'U="viewStateShareKey",$="mlflow.sharedViewState."' in js and '"selectedColumns","columnOrder"' in js


def test_the_reports_name_the_commit_make_run_started_from(tmp_path, monkeypatch):
    """make run records HEAD when it starts (FLAP_EXP_RUN_COMMIT): the index names that commit, not one made while
    the study ran; without the record (a plain dvc repro) it names HEAD and says it is HEAD at report time."""
    import subprocess

    from flap_exp.pipeline.reporting.commit import RUN_COMMIT, run_commit
    from flap_exp.pipeline.reporting.report import index
    dense = {"perplexity": 50.0, "ppl_windows": 4}
    monkeypatch.setenv(RUN_COMMIT, "a" * 40)
    assert run_commit() == ("a" * 40, True)
    assert "at commit `aaaaaaa` (the commit `make run` started from;" in index({}, dense, "quick", run_commit())
    monkeypatch.delenv(RUN_COMMIT)
    monkeypatch.chdir(tmp_path)
    assert run_commit() == (None, False)  # not a git checkout
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                   check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert run_commit() == (head, False)
    assert f"at commit `{head[:7]}` (git's HEAD when this report was written;" in index({}, dense, "quick",
                                                                                         run_commit())
