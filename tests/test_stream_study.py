"""The study streams: `model.stream=true` runs every weight-touching stage (prepare, calibrate, score, the
sequential search, bias and lsq compensation, perplexity) on the streamed store within a memory budget four
times smaller than the model's float32 weights, and gives the in-memory run's selections and numbers."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from helpers.models import save_model_dir
from helpers.pipeline import DVC, ran, sh, tiny_project

pytestmark = pytest.mark.pipeline

STUDY = """# @package _global_
tables:
  main:
    title: Main
    blocks:
      flap: {metrics: [wifv], structures: [al_am], ratios: [0.5], compensation: [bias, lsq]}
      baselines: {metrics: [wanda_sp], structures: [ul_um], ratios: [0.5]}
"""
# 16 layers of 90 KB (float32) and a 200-word vocabulary: 1.5 MB of weights; the budget holds one layer, the
# 8 windows' hidden states and lsq's matrices (three d_ff^2 float64), a fifth of the weights.
SHAPE = {"layers": 16, "hidden": 64, "inter": 64, "heads": 8, "kv": 2, "head_dim": 8}
BUDGET = 300 * 2**10
OVERRIDES = ["experiment=tiny", "model=local", "model.name=models/big", "data=text", "data.calib.path=data/corpus.txt",
             "data.eval.path=data/corpus.txt", "data.calib.nsamples=8", "data.calib.seqlen=16", "eval.seqlen=16",
             "eval.max_windows=12", "eval.batch_size=4"]
CELLS = ["wifv-al_am-0.5-text-8-bias", "wifv-al_am-0.5-text-8-lsq", "wanda_sp-ul_um-0.5-text-8-none"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("stream-study")
    repo = base / "repo"
    tiny_project(repo, STUDY)
    rng = random.Random(1)
    words = [f"w{i}" for i in range(200)]
    (repo / "data" / "corpus.txt").write_text(" ".join(rng.choices(words, k=6000)) + "\n")
    save_model_dir(repo / "models" / "big", words, identity=True, **SHAPE)
    sh(repo, "git", "init", "-q")
    sh(repo, DVC, "init", "-q")
    out = {"repo": repo}
    for mode, extra in (("memory", []), ("stream", ["model.stream=true", f"model.memory_budget={BUDGET}"])):
        sh(repo, sys.executable, "-m", "flap_exp.pipeline.study.compose", *OVERRIDES, *extra)
        out[f"{mode}_ran"] = ran(sh(repo, DVC, "repro"))
        out[mode] = {c: json.loads((repo / "results" / "evaluate" / c / "ppl.json").read_text()) for c in CELLS}
        out[mode]["dense"] = json.loads((repo / "results" / "evaluate" / "dense" / "ppl.json").read_text())
        out[f"{mode}_sel"] = {p.parent.name: json.loads(p.read_text())["kept_channels"]
                              for p in (repo / "results" / "search").glob("*/selection.json")}
    return out


@pytest.mark.slow
def test_the_streamed_study_equals_the_in_memory_one(runs):
    weights = sum(p.stat().st_size for p in (runs["repo"] / "models" / "big").glob("*.safetensors"))
    assert weights >= 4 * BUDGET
    assert {f"evaluate@{c}" for c in CELLS} <= runs["stream_ran"]  # every stage ran again, streamed
    assert "search_seq@wanda_sp-ul_um-0.5-text-8" in runs["stream_ran"] and "compensate_lsq@" + CELLS[1] in \
        runs["stream_ran"]
    assert runs["stream_sel"] == runs["memory_sel"] and len(runs["memory_sel"]) == 2
    for key in [*CELLS, "dense"]:
        a, b = runs["memory"][key], runs["stream"][key]
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-6), key
        for k in ("params_kept", "params_total", "achieved_ratio", "model_params", "ppl_windows"):
            assert b[k] == a[k], (key, k)


@pytest.mark.slow
def test_a_streamed_study_refuses_what_it_cannot_measure_at_compose(runs, capsys):
    from flap_exp.pipeline.study.compose import main
    repo: Path = runs["repo"]
    args = ["--conf", str(repo / "conf"), "--out", str(repo / "x.yaml"), "--cells", str(repo / "x-cells.yaml")]
    assert main([*OVERRIDES, "model.stream=true", "+tables.z={title: Z, measure: [zeroshot], blocks: {b: "
                 "{metrics: [wifv], structures: [al_am], ratios: [0.5]}}}", *args]) == 2
    assert "model.stream=true measures perplexity only; table(s) z ask for zero-shot" in capsys.readouterr().err
    assert main([*OVERRIDES, "model.memory_budget=1GiB", *args]) == 2
    assert "model.memory_budget applies to model.stream=true only" in capsys.readouterr().err
    assert main([*OVERRIDES, "model.stream=true", "model.memory_budget=lots", *args]) == 2
    assert "cannot read memory budget 'lots'" in capsys.readouterr().err
    assert not (repo / "x.yaml").exists()
