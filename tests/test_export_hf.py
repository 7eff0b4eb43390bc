"""`flap-exp export DIR --to hf OUT`: a stock transformers LLaMA directory whose logits equal the pruned model's,
loaded in a subprocess that never imports flap_exp; and every refusal in one line with nothing written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flap_exp import cli
from flap_exp.persist import load_pruned

from helpers.models import save_pruned_dir

# Runs with plain transformers only: loads OUT, refuses to have imported flap_exp, saves logits and config facts.
STOCK = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out, ids, dest = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(out)
assert not any(m == "flap_exp" or m.startswith("flap_exp.") for m in sys.modules), "flap_exp was imported"
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
torch.save({"logits": logits, "class": type(model).__name__, "tok": tok("w1 w2")["input_ids"]}, dest)
"""


def run(args: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(args)
    return rc, capsys.readouterr().err


def one_error(err: str, msg: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("flap-exp: error:")]
    assert len(lines) == 1 and msg in lines[0], err
    assert "Traceback" not in err


def stock_logits(out: Path, ids: list[int], tmp_path: Path) -> dict:
    dest = tmp_path / "stock.pt"
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", STOCK, str(out), json.dumps(ids), str(dest)], check=True, env=env,
                   timeout=300)
    return torch.load(dest)


@pytest.mark.parametrize("bias, kw", [(True, {}), (False, {}), (True, {"attention_bias": True, "mlp_bias": True})],
                         ids=["compensated", "no-bias", "own-biases"])
def test_uniform_model_exports_to_stock_llama(tmp_path, capsys, bias, kw):
    src = save_pruned_dir(tmp_path / "pruned", groups=[1, 1, 1], channels=[32, 32, 32], bias=bias, **kw)
    out = tmp_path / "stock"
    rc, err = run(["export", str(src), "--to", "hf", str(out)], capsys)
    assert rc == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
            cfg["intermediate_size"]) == ("llama", 2, 1, 8, 32)
    assert (cfg["attention_bias"], cfg["mlp_bias"]) == (bias, bias)
    assert not list(out.glob("flap_*")) and "layer_kv_heads" not in cfg
    ids = list(range(2, 30))
    model, tok, _ = load_pruned(src)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    got = stock_logits(out, ids, tmp_path)
    assert got["class"] == "LlamaForCausalLM"
    assert torch.allclose(got["logits"], want, atol=1e-5, rtol=1e-5), (got["logits"] - want).abs().max()
    assert got["tok"] == tok("w1 w2")["input_ids"]


def test_zero_mlp_uniform_model_is_exported_as_such(tmp_path, capsys):
    src = save_pruned_dir(tmp_path / "pruned", groups=[2, 2, 2], channels=[0, 0, 0])
    out = tmp_path / "stock"
    rc, err = run(["export", str(src), "--to", "hf", str(out)], capsys)
    assert rc == 0, err
    ids = list(range(2, 20))
    model, _, _ = load_pruned(src)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    assert torch.allclose(stock_logits(out, ids, tmp_path)["logits"], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups, channels, msg", [
    ([2, 1, 2], [48, 48, 48], "layer 1: 1 and 48; layers differing from layer 0: 1); a stock transformers model has "
                              "one width for all layers: use --to gguf"),
    ([2, 2, 2], [48, 40, 48], "use --to gguf"),
    ([0, 0, 0], [40, 40, 40], "every layer lost all its attention heads"),
], ids=["heads", "channels", "no-attention"])
def test_what_a_stock_config_cannot_hold_is_refused(tmp_path, capsys, groups, channels, msg):
    src = save_pruned_dir(tmp_path / "pruned", groups=groups, channels=channels)
    rc, err = run(["export", str(src), "--to", "hf", str(tmp_path / "out")], capsys)
    assert rc == 2
    one_error(err, msg)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    return save_pruned_dir(tmp_path_factory.mktemp("export-bad") / "pruned", groups=[1, 1], channels=[30, 30])


def _tamper(src: Path) -> Path:
    f = sorted(src.glob("*.safetensors"))[0]
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    return src


@pytest.mark.parametrize("case, extra, msg", [
    ("not-pruned", [], "is not a flap-exp pruned model directory"),
    ("missing", [], "is not a directory"),
    ("tampered", [], "does not match the sha256 recorded in flap_manifest.json"),
    ("out-file", [], "is an existing file; refusing to replace it"),
    ("out-dir", [], "is an existing directory that is not"),
    ("out-pruned", [], "is an existing directory that is not empty"),
    ("out-inside", [], "the input model's directory"),
    ("format", [], "unknown export format 'onnx'"),
    ("gguf-type", ["--gguf-type", "q4_k"], "GGUF type 'q4_k' is not supported"),
    ("gguf-type-hf", ["--gguf-type", "f16"], "--gguf-type is for --to gguf only"),
])
def test_bad_input_is_one_line_and_writes_nothing(pruned, tmp_path, capsys, case, extra, msg):
    import shutil
    src = shutil.copytree(pruned, tmp_path / "src")
    out, to = tmp_path / "out", "gguf" if case == "gguf-type" else "hf"
    if case == "not-pruned":
        (src / "flap_manifest.json").unlink()
    elif case == "missing":
        src = tmp_path / "nowhere"
    elif case == "tampered":
        _tamper(src)
    elif case == "out-file":
        out.write_text("keep me")
    elif case == "out-dir":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    elif case == "out-pruned":
        shutil.copytree(pruned, out)
    elif case == "out-inside":
        out = src / "sub"
    elif case == "format":
        to = "onnx"
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    rc, err = run(["export", str(src), "--to", to, str(out), *extra], capsys)
    assert rc == 2
    one_error(err, msg)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


@pytest.mark.parametrize("family, kw, cls", [("mistral", {"sliding_window": 4}, "MistralForCausalLM"),
                                             ("qwen2", {}, "Qwen2ForCausalLM")])
def test_other_families_export_to_their_own_stock_type(tmp_path, capsys, family, kw, cls):
    """A pruned Mistral keeps its sliding window (the probe is 7x the window) and a Qwen2 its q/k/v biases."""
    src = save_pruned_dir(tmp_path / "pruned", groups=[1, 1, 1], channels=[32, 32, 32], bias=False, family=family,
                          **kw)
    out = tmp_path / "stock"
    rc, err = run(["export", str(src), "--to", "hf", str(out)], capsys)
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    ids = list(range(2, 30))
    model, _, _ = load_pruned(src)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    got = stock_logits(out, ids, tmp_path)
    assert got["class"] == cls
    assert torch.allclose(got["logits"], want, atol=1e-5, rtol=1e-5), (got["logits"] - want).abs().max()


def test_a_compensation_bias_the_family_cannot_hold_is_refused(tmp_path, capsys):
    src = save_pruned_dir(tmp_path / "pruned", groups=[1, 1, 1], channels=[32, 32, 32], bias=True, family="qwen2")
    rc, err = run(["export", str(src), "--to", "hf", str(tmp_path / "stock")], capsys)
    assert rc == 2
    one_error(err, "do not map onto a stock Qwen2ForCausalLM")
    assert not (tmp_path / "stock").exists()


@pytest.mark.parametrize("family, kw, msg", [("qwen2", {}, "a qwen2 model is not one"),
                                             ("mistral", {"sliding_window": 4}, "a sliding-window Mistral")])
def test_gguf_refuses_layers_that_are_not_llamas(tmp_path, capsys, family, kw, msg):
    src = save_pruned_dir(tmp_path / "pruned", groups=[1, 2, 1], channels=[32, 16, 8], family=family, **kw)
    rc, err = run(["export", str(src), "--to", "gguf", str(tmp_path / "m.gguf")], capsys)
    assert rc == 2
    one_error(err, msg)
    assert not (tmp_path / "m.gguf").exists()
