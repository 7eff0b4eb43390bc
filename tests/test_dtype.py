"""`--dtype auto` / `model.dtype: auto`, and statistics that stay float64 whatever the model's dtype."""
from __future__ import annotations

import json
import random

import pytest
import torch

from flap_exp import runtime
from flap_exp.calibrate import collect_stats
from flap_exp.compensation.covariance import CovAccumulator
from flap_exp.errors import FlapError
from flap_exp.ppl import chunked_nll
from flap_exp.runtime import native_bf16, resolve_dtype

from helpers.models import save_model_dir, tiny_model

CPU = torch.device("cpu")
WORDS = [f"w{i}" for i in range(60)]


def test_auto_is_bfloat16_where_native_else_float32(monkeypatch):
    assert resolve_dtype("auto", CPU) == (torch.bfloat16 if native_bf16(CPU) else torch.float32)
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    assert resolve_dtype("auto", CPU) == torch.float32
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    assert resolve_dtype("auto", CPU) == torch.bfloat16


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    """No bf16 instructions: not native, whatever oneDNN would emulate (and it is never asked)."""
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx512f", "avx512bw", "avx512vl", "avx512dq"})
    assert not native_bf16(CPU)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert native_bf16(CPU) == bool(torch.backends.mkldnn.is_available()
                                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.parametrize("spec", ["float64", "bf16", "Auto", ""])
def test_bad_dtype_is_one_line(spec):
    if spec == "":  # empty means the default, float32
        assert resolve_dtype(spec, CPU) == torch.float32
        return
    with pytest.raises(FlapError) as err:
        resolve_dtype(spec, CPU)
    assert str(err.value) == f"unknown dtype {spec!r}; valid: auto, float32, bfloat16, float16"


def test_bf16_model_statistics_stay_float64():
    model = tiny_model().to(torch.bfloat16)
    windows = torch.randint(0, 101, (4, 12))
    stats = collect_stats(model, windows, batch_size=2, progress=False)
    for s in stats:
        for cs in (s.attn, s.mlp):
            assert cs.mean.dtype == cs.m2.dtype == cs.meansq.dtype == torch.float64
            assert torch.isfinite(cs.var).all() and cs.count == 4 * 12
    cov = CovAccumulator(8).update(torch.randn(20, 8, dtype=torch.bfloat16))
    sigma, _ = cov.finish()
    assert sigma.dtype == torch.float64 and cov.mean.dtype == torch.float64


def test_bf16_logits_give_a_float32_loss():
    """Perplexity's log-sum-exp runs in float32 on bf16 logits: it equals the float32 loss of the same
    (bf16-rounded) logits, not a bf16 log-softmax."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False).to(torch.bfloat16)
    hidden = torch.randn(2, 5, 16).to(torch.bfloat16)
    targets = torch.randint(0, 300, (2, 5))
    nll = chunked_nll(hidden, head, targets)
    logits = (hidden @ head.weight.T).float()
    ref = torch.logsumexp(logits, -1) - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert nll.dtype == torch.float32 and torch.allclose(nll, ref, atol=1e-5)


def test_cli_auto_records_the_dtype_that_ran(tmp_path, capsys, monkeypatch):
    """A bf16 run's manifest says bfloat16 (`--dtype auto` where bf16 is native, here forced)."""
    from flap_exp.cli import main
    folder = save_model_dir(tmp_path / "m", WORDS)
    rng = random.Random(0)
    (tmp_path / "text.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(2000)) + "\n")
    base = ["prune", "--model", str(folder), "--calib", "text", "--calib-path", str(tmp_path / "text.txt"),
            "--nsamples", "4", "--seqlen", "16", "--ratio", "0.3", "--device", "cpu"]
    for native, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(runtime, "native_bf16", lambda device, native=native: native)
        out = tmp_path / want
        assert main([*base, "--dtype", "auto", "--out", str(out)]) == 0, capsys.readouterr().err[-1500:]
        assert json.loads((out / "flap_manifest.json").read_text())["dtype"] == want
    capsys.readouterr()
    assert main([*base, "--dtype", "half", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "flap-exp: error: unknown dtype 'half'; valid: auto, float32, bfloat16, float16"
    assert not (tmp_path / "x").exists()


def test_pipeline_records_auto_resolved(monkeypatch):
    from flap_exp.pipeline.artifacts.records import model_dtype
    from flap_exp.pipeline.study.settings import ModelSettings
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    assert model_dtype(ModelSettings("m", "auto", "cpu")) == "bfloat16"
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    assert model_dtype(ModelSettings("m", "auto", "cpu")) == "float32"
    assert model_dtype(ModelSettings("m", "bfloat16", "cpu")) == "bfloat16"


def test_prepare_records_auto_resolved_and_stages_refuse_another(tmp_path, monkeypatch):
    """prepare hashes and records the weights in the dtype auto resolved to; a stage where auto resolves
    otherwise (another machine) is refused with that reason, not with a weights-changed hash."""
    from flap_exp.pipeline.artifacts.records import load_prepared_model
    from flap_exp.pipeline.steps.prepare import prepare
    from flap_exp.pipeline.study.settings import CalibSettings, CorpusSettings, ModelSettings
    folder = save_model_dir(tmp_path / "m", WORDS, identity=True)
    (tmp_path / "text.txt").write_text(" ".join(WORDS * 20) + "\n")
    params = ModelSettings(str(folder), "auto", "cpu")
    data = CalibSettings(CorpusSettings("text", "train", str(tmp_path / "text.txt")), 8, 16, 0, 4)
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    record = prepare(params, data, ["text"])
    assert record["model"]["dtype"] == "bfloat16"
    lm = load_prepared_model(params, record)
    assert lm.dtype == torch.bfloat16 and lm.weights_sha256 == record["model"]["weights_sha256"]
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    with pytest.raises(FlapError) as err:
        load_prepared_model(params, record)
    assert str(err.value) == ("model.dtype auto runs in float32 here, but prepare recorded bfloat16; rerun: "
                              "dvc repro -f prepare (or set model.dtype=bfloat16)")
