"""The smoke protocol (`make run PROTOCOL=smoke`) end to end on the tiny model: conf/experiment/smoke.yaml's
every table in one `dvc repro`, its reports in reports/smoke/ with the protocol in each caption, its MLflow runs
tagged smoke, and the default protocol's reports/ untouched."""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests.helpers.pipeline import DVC, ROOT, sh, stop_warm, tiny_project, warm_env

pytestmark = [pytest.mark.pipeline, pytest.mark.slow]

# The tiny model, its word-level corpus and small throughput shapes; N, windows and documents are the protocol's.
TINY = ["model=local", "model.name=models/tiny", "data=text", "data.calib.path=data/corpus.txt",
        "data.eval.path=data/corpus.txt", "data.calib.seqlen=32", "eval.seqlen=32",
        "eval.zeroshot.tasks=[piqa,arc_easy]", "eval.throughput.prefill_shapes=[[1,16]]",
        "eval.throughput.decode_batches=[1]", "eval.throughput.prompt_len=4", "eval.throughput.new_tokens=3"]


def test_smoke_protocol_runs_every_table_into_its_own_reports(tmp_path: Path):
    repo = tmp_path / "repo"
    tiny_project(repo, "")
    committed = {"main.md": "the default protocol's committed table\n", "README.md": "index\n"}
    (repo / "reports").mkdir()
    for name, text in committed.items():
        (repo / "reports" / name).write_text(text)
    sh(repo, "git", "init", "-q")
    sh(repo, DVC, "init", "-q")
    sh(repo, sys.executable, "-m", "flap_exp.pipeline.study.compose", "protocol=smoke", "experiment=smoke", *TINY)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["protocol"] == "smoke" and params["data"]["calib"]["nsamples"] == 8
    assert params["eval"]["max_windows"] == 4 and params["eval"]["zeroshot"]["limit"] == 4
    cells = yaml.safe_load((repo / "cells.yaml").read_text())["cells"]
    smoke_tables = yaml.safe_load((ROOT / "conf/experiment/smoke.yaml").read_text())["tables"]
    study_tables = yaml.safe_load((ROOT / "conf/experiment/study.yaml").read_text())["tables"]
    assert list(cells["tables"]) == list(smoke_tables) == list(study_tables)  # every table of the study
    assert cells["reports"] == "reports/smoke"

    # as `make run` runs it: stages start warm (forked from a server that imported the library once)
    warm = warm_env(tmp_path, repo / "src")
    start = time.monotonic()
    try:
        p = sh(repo, DVC, "repro", **warm)
    finally:
        stop_warm(tmp_path)
    wall = time.monotonic() - start
    stages = [s for s in sh(repo, DVC, "stage", "list", "--name-only").stdout.split() if s]
    ran = set(re.findall(r"Running stage '([^']+)'", p.stdout))
    assert ran == set(stages), set(stages) - ran
    print(f"\nsmoke protocol on the tiny model: {len(stages)} stages in {wall:.0f} s "
          f"({wall / len(stages):.1f} s per stage)")

    for t in smoke_tables:
        md = (repo / "reports/smoke" / f"{t}.md").read_text()
        assert "Protocol **smoke**" in md, t
        assert (repo / "reports/smoke/figures" / f"{t}.png").read_bytes()[:4] == b"\x89PNG"
        assert not (repo / "reports" / f"{t}.csv").exists()
    assert "protocol **smoke**" in (repo / "reports/smoke/README.md").read_text()
    for name, text in committed.items():  # the default protocol's reports are never overwritten
        assert (repo / "reports" / name).read_text() == text
    assert sorted(p.name for p in (repo / "reports").iterdir()) == ["README.md", "main.md", "smoke"]

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("flap-tiny-llama")
    runs = client.search_runs([exp.experiment_id])
    evaluated = set(cells["evaluate"]) | {"dense"}
    assert {r.data.tags["flap.cell"] for r in runs} == {f"{k}@smoke" for k in evaluated}
    assert all(r.data.tags["flap.protocol"] == "smoke" and "[smoke]" in r.info.run_name for r in runs)
    assert ran_again(repo) == set()

    # warm == cold: most stages started warm (the first ones run while the server imports), and a calibration and
    # an evaluation rerun in fresh interpreters write the same bytes (dvc.lock unchanged, nothing downstream reruns)
    starts = [json.loads(f.read_text())["startup_seconds"] for f in (repo / "results" / "usage").glob("*.json")]
    assert sum(s < 0.5 for s in starts) >= 0.8 * len(starts), sorted(starts)
    lock = (repo / "dvc.lock").read_bytes()
    for name in (f"calibrate@{next(iter(cells['calibrate']))}", f"evaluate@{next(iter(cells['evaluate']))}"):
        sh(repo, DVC, "repro", "-f", "-s", name)
    assert (repo / "dvc.lock").read_bytes() == lock
    assert ran_again(repo) == set()


def ran_again(repo: Path) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", sh(repo, DVC, "repro").stdout))
