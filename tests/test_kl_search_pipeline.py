"""The kl_search cell through DVC: its own cached allocate stage, the OBS pass on its levels (search_kl), the
levels and their plot in the cell's MLflow run, and nothing rerun the second time."""
import json
import sys

import pytest

from helpers.pipeline import DVC, OVERRIDES, ran, sh, tiny_project

pytestmark = pytest.mark.pipeline

STUDY = """# @package _global_
tables:
  selection:
    title: Selection
    layout: compensation
    blocks:
      obs: {metrics: [obs], structures: [kl_search], ratios: [0.5], compensation: [lsq]}
"""
KEY = "obs-kl_search-0.5-text-16"


def test_allocate_stage_feeds_search_kl_and_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient
    repo = tmp_path / "repo"
    tiny_project(repo, STUDY)
    sh(repo, "git", "init", "-q")
    sh(repo, DVC, "init", "-q")
    sh(repo, sys.executable, "-m", "flap_exp.pipeline.study.compose", *OVERRIDES,
       "structures.kl_search.search_candidates=5")
    p = sh(repo, DVC, "repro")
    assert {f"allocate@{KEY}", f"search_kl@{KEY}", f"compensate_lsq@{KEY}-lsq", "track"} <= ran(p)
    rec = json.loads((repo / f"results/search/{KEY}/levels.json").read_text())
    assert rec["candidates"] == 5 and rec["kl"] <= rec["uniform_kl"] and f"allocate@{KEY}: KL" in p.stdout
    sel = json.loads((repo / f"results/search/{KEY}/selection.json").read_text())
    assert abs(sel["achieved_ratio"] - 0.5) <= 0.005
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("flap-tiny-llama")
    run, = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags["flap.cell"].startswith(KEY)]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "allocation")} == {
        "allocation/levels.json", "allocation/levels.png"}
    assert ran(sh(repo, DVC, "repro")) == set()
