"""OBS cells through DVC. kl_search: its own cached allocate stage, the OBS pass on its levels (search_kl), the
levels and their plot in the cell's MLflow run. A uniform OBS cell: its search stage writes its lsq compensation
(search_obs; no compensate stage), which equals what the compensate stage computes. Nothing reruns the second time."""
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
      obs: {metrics: [obs], structures: [kl_search, ul_um], ratios: [0.5], compensation: [lsq]}
"""
KEY = "obs-kl_search-0.5-text-16"
UNIFORM = "obs-ul_um-0.5-text-16"


def test_allocate_stage_feeds_search_kl_and_mlflow(tmp_path):
    import torch
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file
    repo = tmp_path / "repo"
    tiny_project(repo, STUDY)
    sh(repo, "git", "init", "-q")
    sh(repo, DVC, "init", "-q")
    sh(repo, sys.executable, "-m", "flap_exp.pipeline.study.compose", *OVERRIDES,
       "structures.kl_search.search_candidates=5")
    p = sh(repo, DVC, "repro")
    stages = ran(p)
    assert {f"allocate@{KEY}", f"search_kl@{KEY}", f"compensate_lsq@{KEY}-lsq", "track"} <= stages
    assert {f"search_obs@{UNIFORM}", f"evaluate@{UNIFORM}-lsq"} <= stages
    assert f"compensate_lsq@{UNIFORM}-lsq" not in stages
    # the refit the search stage wrote == the compensate stage's own lsq pass on that selection (run by hand)
    sh(repo, sys.executable, "stages/compensate.py", "check", "--cell", UNIFORM, "--compensation", "lsq",
       "--calib", "text-16")
    got, want = (load_file(repo / f) for f in (f"results/search/{UNIFORM}/refit.safetensors",
                                               "results/compensate/check.safetensors"))
    assert got.keys() == want.keys() and got
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert json.loads((repo / f"results/evaluate/{UNIFORM}-lsq/ppl.json").read_text())["perplexity"] > 1
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
