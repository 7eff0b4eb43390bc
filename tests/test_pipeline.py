"""The DVC/Hydra/MLflow pipeline end to end on a tiny random LLaMA, in a temporary git + DVC repository.

One module-scoped repository is built once (copy of dvc.yaml, conf/, stages/, src/; a tiny model
directory with a word-level tokenizer; a generated text corpus) and the tests run in order on it:
first `dvc repro`, then no-op repro, MLflow contents, report contents, a one-metric option change,
tampered statistics, a real MLflow server, and a push/clone/pull round trip.
The grid holds a none and a bias cell of one selection, and an lsq cell once flap_exp.compensation.lsq
exists (branch lsq; the lead merges it before CI, where the lsq parts run).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from helpers.pipeline import (
    DVC,
    OVERRIDES,
    VENV_BIN,
    env_for,
    free_port as _free_port,
    ran,
    rest as _rest,
    sh,
    stop_warm,
    tiny_repo,
)

pytestmark = pytest.mark.pipeline

C = "text-16"
COMPS = ["none", "bias", "lsq"]
FLAP_CELLS = [f"wifv-al_am-0.5-{C}-{c}" for c in COMPS]
BIAS = f"wifv-al_am-0.5-{C}-bias"
CELLS = FLAP_CELLS + ["wifv-al_am-0.5-text-8-bias", f"wanda_sp-ul_um-0.5-{C}-none", "weight_magnitude-ul_um-0.5-none"]
COMPENSATE = {f"compensate_lsq@{c}" if c.endswith("-lsq") else f"compensate@{c}" for c in CELLS}
TABLES = ["main", "compensation", "calibration", "zeroshot", "speed"]
REPORTS = {f"report@{t}" for t in TABLES} | {"report_index"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Iterator[Path]:
    """The tiny study's repository, its stages started warm as `make run` starts them (tests/test_warm.py checks
    warm == cold; the code-edit tests below also check that an edited file never runs from a warm server)."""
    repo = tiny_repo(tmp_path_factory, warm=True)
    yield repo
    stop_warm(repo.parent)


@pytest.fixture(scope="module")
def first_run(repo: Path) -> subprocess.CompletedProcess:
    return sh(repo, DVC, "repro")


def _mlflow_runs(repo: Path, protocol: str = "quick") -> dict:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("flap-tiny-llama")
    assert exp is not None and exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert "metrics.`perplexity`" in exp.tags["mlflow.sharedViewState.flap"]  # what the summary's link opens
    runs = {r.data.tags["flap.cell"]: r for r in client.search_runs([exp.experiment_id])}
    return {k.rsplit("@", 1)[0]: r for k, r in runs.items() if k.endswith(f"@{protocol}")}


def _metrics(repo: Path, key: str, measure: str = "ppl") -> dict:
    from flap_exp.pipeline.artifacts.paths import measurement
    return json.loads((repo / measurement(key, measure)).read_text())


def _cells(repo: Path) -> dict:
    return yaml.safe_load((repo / "cells.yaml").read_text())["cells"]


def test_compose_writes_params_and_derived_cells(repo: Path, tmp_path: Path):
    """params.yaml is what DVC's own Hydra composition gives (`dvc exp run -S`); the derived cell tables
    are in cells.yaml, not in the params (so `dvc params diff` shows what a person changed)."""
    code = ("import sys; from dvc.utils.hydra import compose_and_dump; "
            "compose_and_dump(sys.argv[1], sys.argv[2], None, 'config', sys.argv[3], sys.argv[4:])")
    sh(repo, sys.executable, "-c", code, str(tmp_path / "p.yaml"), str(repo / "conf"), str(repo / "conf"), *OVERRIDES)
    ours = yaml.safe_load((repo / "params.yaml").read_text())
    assert yaml.safe_load((tmp_path / "p.yaml").read_text()) == ours
    assert "cells" not in ours and ours["protocol"] == "quick"
    cells = _cells(repo)
    assert sorted(cells["evaluate"]) == sorted(CELLS)
    assert sorted(cells["calibrate"]) == ["text-16", "text-8"]
    assert "calibrate" not in json.dumps(cells["score_free"])
    # shared cells are one cell: FLAP-bias at 0.5 on the default calibration is in all five tables
    member = {t: v["cells"] for t, v in cells["tables"].items()}
    assert sum(BIAS in v for v in member.values()) == 5 and sorted(cells["zeroshot"]) == [BIAS]
    # AL search reads the standardize stage's units, UL search the scores
    assert cells["search"][f"wifv-al_am-0.5-{C}"]["input"] == f"results/standardize/{C}/wifv.safetensors"
    assert cells["search"]["weight_magnitude-ul_um-0.5"]["input"] == "results/score/weight_magnitude.safetensors"


def test_compose_unknown_option_is_one_line(repo: Path, capsys):
    from flap_exp.pipeline.study.compose import main
    out, cells = repo / "x.yaml", repo / "x-cells.yaml"
    args = ["--conf", str(repo / "conf"), "--out", str(out), "--cells", str(cells)]
    assert main(["experiment=nope", *args]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "unknown experiment 'nope'" in err and "ablation" in err and "study" in err
    assert main(["tables.main.blocks.baselines.structures=[al_am]", *args]) == 2
    err = capsys.readouterr().err
    assert "per-layer structure" in err and "table 'main' block 'baselines'" in err and err.strip().count("\n") == 0
    assert main(["metrics.wifv.no_such_option=1", *args]) == 2
    assert "no_such_option" in capsys.readouterr().err
    assert main(["protocol=fast", *args]) == 2
    assert "unknown protocol 'fast'" in capsys.readouterr().err
    assert main(["+tables.main.blocks.x={metrics: [wifv], structures: [al_am], ratios: [0.2], calibration: ['wiki:1']}",
                 *args]) == 2
    assert "N must be at least 2" in capsys.readouterr().err
    assert not out.exists() and not cells.exists()


def test_repro_builds_every_stage(repo: Path, first_run):
    stages = ran(first_run)
    expected = {"prepare", "prepare_eval", f"calibrate@{C}", "calibrate@text-8", f"score@{C}-wifv",
                "score@text-8-wifv", "score_free@weight_magnitude", f"standardize@{C}-wifv", "standardize@text-8-wifv",
                f"search@wifv-al_am-0.5-{C}", "search@wifv-al_am-0.5-text-8", "search@weight_magnitude-ul_um-0.5",
                f"search_seq@wanda_sp-ul_um-0.5-{C}", "evaluate_dense", "zeroshot_dense@dense", f"zeroshot@{BIAS}",
                f"speed@{BIAS}", "track", "code"} | {f"evaluate@{c}" for c in CELLS} | COMPENSATE | REPORTS
    assert stages == expected
    manifest = json.loads((repo / f"results/calibrate/{C}/manifest.json").read_text())
    assert manifest["nsamples"] == 16 and manifest["seqlen"] == 32 and manifest["seed"] == 0
    assert json.loads((repo / "results/calibrate/text-8/manifest.json").read_text())["nsamples"] == 8
    assert manifest["model"]["name"] == "tiny-llama" and len(manifest["data"]["text_sha256"]) == 64
    assert manifest["versions"]["torch"] == torch.__version__
    for key in CELLS:
        m = _metrics(repo, key)
        sel = json.loads((repo / "results/search" / m["cell"] / "selection.json").read_text())
        assert m["achieved_ratio"] == pytest.approx(sel["achieved_ratio"], abs=1e-12)  # rebuilt model = selection
        assert 0.3 < m["achieved_ratio"] < 0.7 and m["perplexity"] > 1 and m["ppl_windows"] == 8
        # the headline is exp of the mean per-window NLL, its interval around it (uncertainty.py)
        assert len(m["ppl_window_nll"]) == 8 and m["ppl_ci95"][0] < m["perplexity"] < m["ppl_ci95"][1]
        assert m["perplexity"] == pytest.approx(math.exp(sum(m["ppl_window_nll"]) / 8), rel=1e-12)
        # lsq on too few calibration tokens carries the warning of flap_exp/adequacy.py; other methods none
        want = None
        if m["compensation_method"] == "lsq":
            from flap_exp.adequacy import lsq_coefficients, lsq_sample_warning
            arch = json.loads((repo / "results/prepare.json").read_text())["model"]["arch"]
            want = lsq_sample_warning(8 if "text-8" in key else 16, 32, lsq_coefficients(
                sel["kept_groups_per_layer"], sel["kept_channels_per_layer"],
                arch["num_heads"] // arch["num_kv_heads"] * arch["head_dim"]))
        assert m["warnings"] == ([want] if want else [])
        assert m["compensation"] == key.rsplit("-", 1)[1]
    # One selection, several compensations: same ratio, different numbers (the compensation is applied).
    flap = {c: _metrics(repo, f"wifv-al_am-0.5-{C}-{c}") for c in COMPS}
    assert len({m["perplexity"] for m in flap.values()}) == len(COMPS)
    assert len({m["achieved_ratio"] for m in flap.values()}) == 1
    assert flap["bias"]["compensation_options"] == {}
    # N=8 and N=16 calibrations select differently or score differently: separate cells, both measured
    assert _metrics(repo, "wifv-al_am-0.5-text-8-bias")["calib"] == "text-8"
    dense = _metrics(repo, "dense")
    assert dense["achieved_ratio"] == 0 and dense["params_kept"] == dense["params_total"]
    zs = _metrics(repo, BIAS, "zeroshot")["zeroshot"]["tasks"]
    assert set(zs) == {"piqa", "arc_easy"} and all(t["n_docs"] == 4 for t in zs.values())
    assert set(_metrics(repo, BIAS, "speed")["speedup"]) == {"prefill_b1_s16", "decode_b1"}
    # No pruned model is stored per cell; timing side files are not DVC outputs (dvc.lock stays clean).
    assert not list((repo / "results").rglob("model.safetensors"))
    assert "results/usage" not in (repo / "dvc.lock").read_text()
    usage = json.loads((repo / f"results/usage/calibrate@{C}.json").read_text())
    assert usage["seconds"] > 0 and usage["cpu_seconds"] > 0 and usage["peak_rss_mib"] > 0
    # every stage but `code` (no stage body) records its clocks, and what ran before them (interpreter, imports);
    # a sequential search records under search@KEY, the name track reads
    recorded = {f.stem for f in (repo / "results/usage").glob("*.json")}
    assert len(recorded) == len(stages) - 1 and f"search@wanda_sp-ul_um-0.5-{C}" in recorded
    assert 0 < usage["startup_seconds"] < 120 and usage["startup_cpu_seconds"] > 0
    # progress: calibration and evaluation say what they do
    assert f"calibrate@{C}: 16 windows of text" in first_run.stdout


def test_second_repro_does_nothing(repo: Path, first_run):
    p = sh(repo, DVC, "repro")
    assert ran(p) == set() and "Data and pipelines are up to date" in p.stdout


def test_mlflow_one_run_per_cell(repo: Path, first_run):
    runs = _mlflow_runs(repo)
    assert sorted(runs) == sorted(CELLS + ["dense"])
    for key in CELLS:
        r, m = runs[key], _metrics(repo, key)
        assert r.data.metrics["perplexity"] == round(m["perplexity"], 4)  # rounded as in reports/metrics.json
        assert r.data.metrics["achieved_ratio"] == round(m["achieved_ratio"], 5)
        assert r.data.metrics["perplexity_ci95_low"] == round(m["ppl_ci95"][0], 4)
        assert r.data.metrics["ppl_windows"] == 8
        assert r.data.metrics["params_kept"] == m["params_kept"]
        assert "evaluate_seconds" in r.data.metrics and "search_seconds" in r.data.metrics
        p = r.data.params
        assert p["metric"] == m["metric"] and float(p["ratio"]) == 0.5 and p["protocol"] == "quick"
        if m["metric"] == "weight_magnitude":  # data-free, no compensation: no calibration behind the run
            assert "N" not in p and "calib" not in p
        else:
            assert p["N"] == ("8" if "text-8" in key else "16") and p["T"] == "32" and len(p["calib.sha256"]) == 64
        assert p["compensation"] == m["compensation"] and p["model"] == "models/tiny"
        if m["compensation"] == "lsq":
            assert p["compensation.lsq.damping"] == "0.01" and p["compensation.lsq.form"] == "sequential"
        assert "compensate_seconds" in r.data.metrics
        assert p["version.torch"]
        # a name a person recognises, tags to filter a table, and the real duration of the work
        assert r.info.run_name.startswith({"wifv": "FLAP", "wanda_sp": "Wanda-sp", "weight_magnitude": "Magnitude"}
                                          [m["metric"]]) and r.info.run_name.endswith("[quick]")
        tables = _cells(repo)["tables"]
        assert r.data.tags["flap.tables"] == ",".join(t for t in TABLES if key in tables[t]["cells"])
        assert all(r.data.tags.get(f"flap.table.{t}") == "1" for t in r.data.tags["flap.tables"].split(","))
        stages = [v for k, v in r.data.metrics.items() if k.endswith("_seconds")]
        # each stage's seconds is logged to 0.01 s (rounding.py), the run's span to the ms from the unrounded sum
        assert (r.info.end_time - r.info.start_time) / 1000 == pytest.approx(sum(stages),
                                                                             abs=0.005 * len(stages) + 0.002)
    assert runs[BIAS].info.run_name == f"FLAP al_am 0.5 bias {C} [quick]"
    zs = _metrics(repo, BIAS, "zeroshot")["zeroshot"]
    assert runs[BIAS].data.metrics["zeroshot_avg"] == round(zs["average"], 5)
    assert runs[BIAS].data.metrics["zeroshot_docs"] == 8 and runs[BIAS].data.metrics["zeroshot.piqa.n_docs"] == 4
    if zs["average_stderr"] is not None:  # lm-eval gives none when all 4 documents score alike
        assert runs[BIAS].data.metrics["zeroshot_avg_stderr"] == round(zs["average_stderr"], 5)
    speed = _metrics(repo, BIAS, "speed")["speedup"]
    assert runs[BIAS].data.metrics["speedup.decode_b1"] == round(speed["decode_b1"], 4)
    from mlflow.tracking import MlflowClient
    arts = {a.path for a in MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").list_artifacts(runs[CELLS[0]].info.run_id)}
    assert arts == {"selection.json", "kept_per_layer.png"}
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    figs = {a.path for a in client.list_artifacts(runs["dense"].info.run_id, "figures")}
    assert figs == {"figures/ppl_vs_ratio.png", "figures/zeroshot.png"}  # the comparison figures, on the reference


def test_reports_one_per_table_with_index_and_dvc_views(repo: Path, first_run):
    import csv
    cells = _cells(repo)
    for t in TABLES:
        rows = {r["key"]: r for r in csv.DictReader((repo / f"reports/{t}.csv").open())}
        assert sorted(rows) == sorted(cells["tables"][t]["cells"] + ["dense"])
        for key in rows:
            assert float(rows[key]["perplexity"]) == _metrics(repo, key)["perplexity"]
        md = (repo / f"reports/{t}.md").read_text()
        assert "Protocol **quick**" in md and "8 windows of 32 tokens" in md
        assert (repo / f"reports/figures/{t}.png").read_bytes()[:4] == b"\x89PNG"
    comp = (repo / "reports/compensation.md").read_text()
    row = next(line for line in comp.splitlines() if line.startswith("| wifv | al_am | 0.5 |"))
    assert all(f"{_metrics(repo, c)['perplexity']:.2f}" in row for c in FLAP_CELLS)
    calib = (repo / "reports/calibration.md").read_text()
    assert "| text-8 |" in calib and f"| {C} |" in calib
    assert "first 4 documents per task" in (repo / "reports/zeroshot.md").read_text()
    index = (repo / "reports/README.md").read_text()
    assert all(f"[{t}.md]({t}.md)" in index for t in TABLES) and "protocol **quick**" in index
    # DVC's own views: metrics per cell, the scatter plot's data
    shown = json.loads(sh(repo, DVC, "metrics", "show", "--json").stdout)
    data = next(iter(shown.values()))["data"]["reports/metrics.json"]["data"]
    assert data[BIAS]["perplexity"] == pytest.approx(_metrics(repo, BIAS)["perplexity"], abs=1e-4)
    assert data[BIAS]["zeroshot_avg"] == pytest.approx(_metrics(repo, BIAS, "zeroshot")["zeroshot_avg"], abs=1e-5)
    assert "speedup.decode_b1" in data[BIAS] and set(data) == set(CELLS) | {"dense"}
    plots = sh(repo, DVC, "plots", "show", "--json").stdout
    assert "reports/plots/ppl_vs_ratio.csv" in plots and "achieved_ratio" in plots


def _status(repo: Path) -> set[str]:
    return set(json.loads(sh(repo, DVC, "status", "--json").stdout or "{}"))


def test_code_edits_rerun_only_the_stages_that_run_the_edited_file(repo: Path, first_run):
    """An edit under src/ reruns the code stage; its fingerprints then say which stages are stale (dvc status):
    a figure's code only the report stages and track, the lsq pass (compensation/lsq.py) only the lsq cells."""
    plots, lsq = repo / "src/flap_exp/pipeline/reporting/plots.py", repo / "src/flap_exp/compensation/lsq.py"
    lsq_cells = {f"compensate_lsq@{c}" for c in CELLS if c.endswith("-lsq")} | {f"evaluate@{c}" for c in CELLS
                                                                                if c.endswith("-lsq")}
    for edited, stale in ((plots, {"track"} | REPORTS), (lsq, lsq_cells)):
        text = edited.read_text()
        try:
            edited.write_text(text + "\n# an edit\n")
            assert _status(repo) == {"code"}  # DVC sees the edit; the fingerprints are not rewritten yet
            sh(repo, DVC, "repro", "code")
            assert _status(repo) == stale, edited.name
        finally:
            edited.write_text(text)
        sh(repo, DVC, "repro", "code")
        assert _status(repo) == set()
    lock = (repo / "dvc.lock").read_text()
    assert "src/flap_exp/arch.py" not in lock and "results/code/evaluate-lsq.txt" in lock  # one code dep a stage


def test_structure_and_lsq_options_rerun_only_their_cells(repo: Path, first_run):
    """A structure option reruns only that structure's cells; compensations.lsq only the lsq cell's compensate
    and evaluate stages. The two touch disjoint cells, so one repro shows both (an eval change is
    test_extra_corpora's)."""
    lsq = f"wifv-al_am-0.5-{C}-lsq"
    before, bias = _metrics(repo, lsq), _metrics(repo, BIAS)
    sh(repo, sys.executable, "-m", "flap_exp.pipeline.study.compose", *OVERRIDES, "structures.ul_um.min_channels=30",
       "compensations.lsq.damping=0.5")
    p = sh(repo, DVC, "repro")
    ul = {s for s in ran(first_run) if "ul_um" in s}
    lsq_stages = {f"compensate_lsq@{lsq}", f"evaluate@{lsq}"}
    assert {"search@weight_magnitude-ul_um-0.5", f"search_seq@wanda_sp-ul_um-0.5-{C}"} | lsq_stages <= ran(p)
    assert ran(p) <= ul | lsq_stages | {"track"} | REPORTS
    after = _metrics(repo, lsq)
    assert after["compensation_options"]["damping"] == 0.5 and after["perplexity"] != before["perplexity"]
    assert _metrics(repo, BIAS) == bias
    assert _mlflow_runs(repo)[lsq].data.params["compensation.lsq.damping"] == "0.5"
    sh(repo, sys.executable, "-m", "flap_exp.pipeline.study.compose", *OVERRIDES)
    p = sh(repo, DVC, "repro")
    assert not ran(p) - ({"track"} | REPORTS)  # everything else restored from DVC's run-cache
    assert _metrics(repo, lsq)["perplexity"] == before["perplexity"]
    assert ran(sh(repo, DVC, "repro")) == set()


def test_protocol_switch_and_back_recomputes_nothing_cached(repo: Path, first_run):
    before = _metrics(repo, BIAS)
    sh(repo, sys.executable, "-m", "flap_exp.pipeline.study.compose", "protocol=paper", *OVERRIDES)
    p = sh(repo, DVC, "repro")  # the tiny overrides fix N, windows and documents: the repeats and lsq's damping differ
    lsq = f"wifv-al_am-0.5-{C}-lsq"
    assert ran(p) == {f"speed@{BIAS}", f"compensate_lsq@{lsq}", f"evaluate@{lsq}", "track"} | REPORTS
    assert _metrics(repo, lsq)["compensation_options"]["damping"] == 0.001
    # its reports in reports/paper/; the default protocol's reports/ are left as they were
    assert "Protocol **paper**" in (repo / "reports/paper/main.md").read_text()
    assert "Protocol **quick**" in (repo / "reports/main.md").read_text()
    assert sorted(_mlflow_runs(repo, "paper")) == sorted(CELLS + ["dense"])  # its own runs, beside quick's
    sh(repo, sys.executable, "-m", "flap_exp.pipeline.study.compose", *OVERRIDES)
    p = sh(repo, DVC, "repro")
    assert not ran(p) - ({"track"} | REPORTS) and _metrics(repo, BIAS) == before
    assert sorted(_mlflow_runs(repo)) == sorted(CELLS + ["dense"])
    assert ran(sh(repo, DVC, "repro")) == set()


def test_stale_cells_are_refused(repo: Path, first_run):
    """`dvc exp run -S` recomposes params.yaml only: a change that alters the cells makes them stale."""
    params = (repo / "params.yaml").read_text()
    try:
        p = yaml.safe_load(params)
        p["tables"]["main"]["blocks"]["flap"]["ratios"] = [0.5, 0.3]
        (repo / "params.yaml").write_text(yaml.safe_dump(p))
        r = sh(repo, sys.executable, "stages/report.py", "main", check=False)
        assert r.returncode == 2 and "stale" in r.stderr and "make compose" in r.stderr and "Traceback" not in r.stderr
    finally:
        (repo / "params.yaml").write_text(params)
    assert ran(sh(repo, DVC, "repro")) == set()


def test_evaluate_refuses_a_compensation_file_of_another_method_or_selection(repo: Path, first_run):
    p = sh(repo, sys.executable, "stages/evaluate.py", f"wifv-al_am-0.5-{C}-none", "--cell", f"wifv-al_am-0.5-{C}",
           "--compensation", "bias", check=False)
    assert p.returncode == 2 and "holds compensation 'none', the cell asks for 'bias'" in p.stderr
    p = sh(repo, sys.executable, "stages/evaluate.py", f"wanda_sp-ul_um-0.5-{C}-none", "--cell", f"wifv-al_am-0.5-{C}",
           "--compensation", "none", check=False)
    assert p.returncode == 2 and "computed for another selection" in p.stderr and "Traceback" not in p.stderr
    assert ran(sh(repo, DVC, "repro")) == set()


def test_tampered_statistics_refused(repo: Path, first_run):
    from flap_exp.pipeline.artifacts.io import load_tensors, save_tensors
    from flap_exp.sources import sha256_file
    stats, manifest = repo / f"results/calibrate/{C}/stats.safetensors", repo / f"results/calibrate/{C}/manifest.json"
    saved = stats.read_bytes(), manifest.read_text()
    try:
        m = json.loads(saved[1])
        m["data"]["text_sha256"] = "0" * 64  # manifest edited: no longer describes the file
        manifest.write_text(json.dumps(m))
        p = sh(repo, sys.executable, "stages/score.py", "wifv", "--calib", C, check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.strip().count("\n") == 0
        assert "refusing tampered statistics" in p.stderr
        # Statistics of another model, with a consistent manifest: refused against what prepare recorded.
        tensors, meta = load_tensors(stats)
        meta["model"] = {"name": "other-model", "source": "elsewhere"}
        save_tensors(stats, tensors, meta)
        manifest.write_text(json.dumps({**meta, "stats_sha256": sha256_file(stats)}))
        p = sh(repo, sys.executable, "stages/compensate.py", BIAS, "--cell", f"wifv-al_am-0.5-{C}",
               "--compensation", "bias", "--calib", C, "--stats", f"results/calibrate/{C}/stats.safetensors",
               check=False)
        assert p.returncode == 2 and "computed for model 'other-model'" in p.stderr and "refusing" in p.stderr
    finally:
        stats.write_bytes(saved[0])
        manifest.write_text(saved[1])
    assert ran(sh(repo, DVC, "repro")) == set()


def test_mlflow_server_receives_runs(repo: Path, first_run, tmp_path: Path):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "art")],
        env=env_for(repo, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        p = sh(repo, DVC, "repro", "-f", "-s", "track", MLFLOW_TRACKING_URI=uri)
        assert ran(p) == {"track"}
        exp = _rest(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=flap-tiny-llama")["experiment"]
        runs = _rest(f"{uri}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        by_cell = {next(t["value"] for t in r["data"]["tags"] if t["key"] == "flap.cell"): r for r in runs}
        assert sorted(by_cell) == sorted(f"{c}@quick" for c in CELLS + ["dense"])
        r = by_cell[f"{BIAS}@quick"]
        ppl = next(m["value"] for m in r["data"]["metrics"] if m["key"] == "perplexity")
        assert ppl == pytest.approx(_metrics(repo, BIAS)["perplexity"])
        assert {"key": "structure", "value": "al_am"} in r["data"]["params"]
        files = _rest(f"{uri}/api/2.0/mlflow/artifacts/list?run_id={r['info']['run_id']}")["files"]
        assert {f["path"] for f in files} == {"selection.json", "kept_per_layer.png"}
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    # The server is gone: stages refuse at once, before loading anything, with a one-line reason.
    t0 = time.perf_counter()
    p = sh(repo, sys.executable, "stages/calibrate.py", C, "text", "16", check=False, MLFLOW_TRACKING_URI=uri)
    assert p.returncode == 2 and "unreachable" in p.stderr and "Traceback" not in p.stderr
    assert time.perf_counter() - t0 < 30
    sh(repo, DVC, "repro", "-f", "-s", "track")  # back to the local database
    assert ran(sh(repo, DVC, "repro")) == set()


def test_remote_round_trip(repo: Path, first_run, tmp_path: Path):
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "pipeline")
    sh(repo, DVC, "push")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    sh(clone, DVC, "pull")
    p = sh(clone, DVC, "repro")
    assert ran(p) == set() and "Data and pipelines are up to date" in p.stdout
    for rel in [f"results/calibrate/{C}/stats.safetensors", f"results/evaluate/{BIAS}/ppl.json",
                f"results/search/wanda_sp-ul_um-0.5-{C}/selection.json", "reports/main.csv"]:
        assert (clone / rel).read_bytes() == (repo / rel).read_bytes(), rel
    # Recomputing a cell from the pulled selection and biases gives the same numbers.
    before = _metrics(repo, BIAS)
    assert ran(sh(clone, DVC, "repro", "-f", "-s", f"evaluate@{BIAS}")) == {f"evaluate@{BIAS}"}
    assert _metrics(clone, BIAS) == before


def test_metric_option_and_extra_corpus_rerun_only_what_reads_them(repo: Path, first_run):
    """Run last (it does not go back): a wifv option and a second perplexity corpus in one repro. The wifv
    cells are reselected; every cell's perplexity is recomputed (the corpus) and reaches metrics, MLflow and
    the CSV; no other metric's selection, compensation or zero-shot, and no calibration, reruns.
    Going back to a config restores from DVC's run-cache: test_structure_and_lsq_options, test_protocol_switch."""
    before = _mlflow_runs(repo)
    calib = (repo / f"results/calibrate/{C}/stats.safetensors").read_bytes()
    scores = (repo / f"results/score/{C}/wifv.safetensors").read_bytes()
    sh(repo, sys.executable, "-m", "flap_exp.pipeline.study.compose", *OVERRIDES, "metrics.wifv.square_attn=false",
       "+data.eval_extra.again={corpus: text, path: data/corpus.txt}")
    p = sh(repo, DVC, "repro")
    wifv = {s for s in ran(first_run) if "wifv" in s}
    perplexity = {f"evaluate@{c}" for c in CELLS} | {"prepare_eval", "evaluate_dense"}
    # The scores change and are reselected; later wifv stages rerun only if the selection changed (DVC compares
    # their inputs' hashes).
    assert {f"score@{C}-wifv", f"standardize@{C}-wifv", f"search@wifv-al_am-0.5-{C}", "track"} | perplexity <= ran(p)
    assert ran(p) <= wifv | perplexity | {"track"} | REPORTS
    assert (repo / f"results/calibrate/{C}/stats.safetensors").read_bytes() == calib
    assert (repo / f"results/score/{C}/wifv.safetensors").read_bytes() != scores
    after = _mlflow_runs(repo)  # replaced, not duplicated
    assert sorted(after) == sorted(before) == sorted(CELLS + ["dense"])
    assert after[BIAS].info.run_id != before[BIAS].info.run_id
    assert after[BIAS].data.params["metric.wifv.square_attn"] == "False"
    assert "metric.wifv.square_attn" not in before[BIAS].data.params
    for key in CELLS + ["dense"]:
        m = _metrics(repo, key)
        assert m["perplexity_extra"]["again"] == pytest.approx(m["perplexity"])  # same text, same numbers
        assert after[key].data.metrics["perplexity.again"] == pytest.approx(m["perplexity"])
    import csv
    rows = {r["key"]: r for r in csv.DictReader((repo / "reports/main.csv").open())}
    assert float(rows["dense"]["perplexity.again"]) == pytest.approx(_metrics(repo, "dense")["perplexity"])
    assert ran(sh(repo, DVC, "repro")) == set()
