import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config

from flap_exp.arch import ArchView
from flap_exp.atomic import atomic_dir
from flap_exp.calibrate import collect_stats
from flap_exp.data import Corpus, calibration_windows, load_text
from flap_exp.errors import FlapError
from flap_exp.persist import load_pruned


def test_non_llama_model_refused():
    with pytest.raises(FlapError, match="is not supported; supported: llama"):
        ArchView.from_config(GPT2Config())


def test_calibration_text_too_short_and_n_below_two():
    tokens = torch.arange(100)
    with pytest.raises(FlapError, match="too short: 100 tokens for N x T = 8 x 16"):
        calibration_windows(tokens, 8, 16)
    with pytest.raises(FlapError, match="at least 2 samples"):
        calibration_windows(tokens, 1, 16)
    w = calibration_windows(tokens, 4, 16, seed=3)
    assert w.shape == (4, 16) and torch.equal(w, calibration_windows(tokens, 4, 16, seed=3))
    assert all(torch.equal(r, torch.arange(int(r[0]), int(r[0]) + 16)) for r in w)


def test_nan_activations_refused(model, windows):
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FlapError, match="non-finite activations .* layer 1"):
        collect_stats(model, windows, progress=False)


def test_unknown_corpus_and_missing_files(tmp_path):
    with pytest.raises(FlapError, match="known corpora: wikitext2, ptb, wiki, c4, text"):
        load_text(Corpus("penn"))
    with pytest.raises(FlapError, match="wiki.test.raw not found"):
        load_text(Corpus("wikitext2", "test", str(tmp_path)))
    with pytest.raises(FlapError, match="not a pruned model directory"):
        load_pruned(tmp_path)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as d:
            (d / "half").write_text("x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,msg", [
    (["prune", "--ratio", "1.2", "--out", "x"], "pruning ratio must be in [0, 1)"),
    (["prune", "--metric", "foo", "--out", "x"], "known metrics: ifv, wifv"),
    (["prune", "--structure", "foo", "--out", "x"], "known structures: ul_um"),
    (["prune", "--metric", "wanda_sp", "--structure", "al_am", "--out", "x"],
     "calibrates sequentially and needs a per-layer structure"),
    (["ppl", "/nonexistent/model-dir"], "cannot load model"),
])
def test_cli_one_line_errors(args, msg, tmp_path):
    r = subprocess.run([sys.executable, "-m", "flap_exp.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("flap-exp: error:")]
    assert len(err) == 1 and msg in err[0], r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_compose_refuses_a_bad_device_or_dtype(tmp_path, capsys):
    """model.device/model.dtype are checked when params.yaml is composed, before any stage runs."""
    from pathlib import Path

    from flap_exp.pipeline.study.compose import main
    conf = Path(__file__).resolve().parents[1] / "conf"
    out, cells = tmp_path / "params.yaml", tmp_path / "cells.yaml"
    args = ["--conf", str(conf), "--out", str(out), "--cells", str(cells)]
    assert main(["model.device=gpu", *args]) == 2
    err = capsys.readouterr().err
    assert "model.device must be auto, cpu, cuda or cuda:N, got 'gpu'" in err and err.strip().count("\n") == 0
    assert main(["model.dtype=float64", *args]) == 2
    assert "model.dtype must be auto, float32, bfloat16 or float16, got 'float64'" in capsys.readouterr().err
    assert not out.exists() and not cells.exists()
    assert main(["model.device=auto", "model.dtype=bfloat16", *args]) == 0  # spelled right: composed
    assert "device: auto" in out.read_text()
