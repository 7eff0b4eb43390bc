"""Issue 23: reliability, second pass. Every file of a pruned directory verified on every load path; no
checkpoint that does not cover the model exactly; one writer per --out; path checks before the long work;
exact config round trips. Each test asserts the one-line error and, where files are involved, that nothing
appeared, changed or vanished (a snapshot of every path with its sha256 before and after)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from flap_exp import cli
from flap_exp.errors import FlapError
from flap_exp.manifest import FILES_KEY, MANIFEST, record_files
from flap_exp.persist import load_pruned

from helpers.models import save_model_dir


def snapshot(root: Path) -> dict:
    """{relative path: sha256 (None for a directory)} of everything under `root`, hidden entries included."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def one_error(err: str, msg: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("flap-exp: error:")]
    assert len(lines) == 1 and msg in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


def prune_args(out: str, *extra: str, model: str = "model") -> list[str]:
    return ["prune", "--model", model, "--calib", "text", "--calib-path", "corpus.txt", "--nsamples", "8",
            "--seqlen", "16", "--device", "cpu", "--ratio", "0.3", "--out", out, *extra]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A tiny GQA model directory with a tokenizer, its corpus, and a directory pruned from it by the CLI."""
    base = tmp_path_factory.mktemp("reliability")
    words = [f"w{i}" for i in range(50)]
    (base / "corpus.txt").write_text(" ".join(random.Random(0).choices(words, k=3000)) + "\n")
    save_model_dir(base / "model", words)
    cwd = os.getcwd()
    os.chdir(base)
    try:
        assert cli.main(prune_args("pruned")) == 0
    finally:
        os.chdir(cwd)
    return base


@pytest.fixture
def ws(template, tmp_path, monkeypatch) -> Path:
    shutil.copytree(template, tmp_path / "ws")
    ws = tmp_path / "ws"
    monkeypatch.setenv("FLAP_EXP_CACHE", str(ws / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ws)
    return ws


def rerecord(folder: Path) -> None:
    """Update the manifest's hashes to the directory's files, as a careless user (or a tool) would."""
    m = json.loads((folder / MANIFEST).read_text())
    m[FILES_KEY] = record_files(folder)
    m["weights_sha256"] = {n: d for n, d in m[FILES_KEY].items() if n.endswith(".safetensors")}
    (folder / MANIFEST).write_text(json.dumps(m))


# ---------------------------------------------------------------- 1. every file of a pruned directory

def test_manifest_records_every_file(ws):
    m = json.loads((ws / "pruned" / MANIFEST).read_text())
    files = sorted(p.name for p in (ws / "pruned").iterdir() if p.name != MANIFEST)
    assert sorted(m[FILES_KEY]) == files
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert all(m[FILES_KEY][n] == hashlib.sha256((ws / "pruned" / n).read_bytes()).hexdigest() for n in files)


def _edit_rope_theta(d: Path) -> str:
    c = json.loads((d / "config.json").read_text())
    c["rope_theta"] = c.get("rope_theta", 10000.0) * 2
    (d / "config.json").write_text(json.dumps(c))
    return "config.json does not match the sha256 recorded in flap_manifest.json (it was changed)"


def _swap_tokens(d: Path) -> str:
    t = json.loads((d / "tokenizer.json").read_text())
    vocab = t["model"]["vocab"]
    vocab["w1"], vocab["w2"] = vocab["w2"], vocab["w1"]
    (d / "tokenizer.json").write_text(json.dumps(t))
    return "tokenizer.json does not match the sha256 recorded in flap_manifest.json (it was changed)"


def _remove_generation_config(d: Path) -> str:
    (d / "generation_config.json").unlink()
    return "generation_config.json is missing but recorded in flap_manifest.json"


def _add_notes(d: Path) -> str:
    (d / "notes.txt").write_text("mine")
    return "notes.txt is not recorded in flap_manifest.json (a file was added)"


@pytest.mark.parametrize("damage", [_edit_rope_theta, _swap_tokens, _remove_generation_config, _add_notes])
def test_every_file_checked_on_every_load_path(ws, damage, capsys):
    d = ws / "pruned"
    msg = damage(d)
    before = snapshot(ws)
    for load in (lambda: AutoModelForCausalLM.from_pretrained(d), lambda: load_pruned(d)):
        with pytest.raises(FlapError) as err:
            load()
        assert one_line(err).startswith(f"{d}/{msg}")
    for args in (["ppl", "pruned", "--data", "text", "--data-path", "corpus.txt", "--device", "cpu"],
                 ["ppl", "pruned", "--data", "text", "--data-path", "corpus.txt", "--device", "cpu", "--stream"]):
        assert cli.main(args) == 2
        one_error(capsys.readouterr().err, msg)
    assert snapshot(ws) == before


def test_pruned_directory_without_manifest_refused(ws):
    (ws / "pruned" / MANIFEST).unlink()
    with pytest.raises(FlapError) as err:
        AutoModelForCausalLM.from_pretrained(ws / "pruned")
    assert one_line(err).startswith(f"{ws / 'pruned' / MANIFEST} is missing: a pruned directory loads only")
    AutoModelForCausalLM.from_pretrained(ws / "pruned", flap_verify=False)  # the documented way out


def test_manifest_of_an_older_flap_exp_refused(ws):
    m = json.loads((ws / "pruned" / MANIFEST).read_text())
    del m[FILES_KEY]
    (ws / "pruned" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(FlapError) as err:
        load_pruned(ws / "pruned")
    assert "records no hashes of the config and tokenizer files (written by an older flap-exp)" in one_line(err)


# ---------------------------------------------------------------- 2. tensors cover the model exactly

def _drop_tensor(f: Path, name: str) -> None:
    sd = load_file(f)
    del sd[name]
    save_file(sd, f, metadata={"format": "pt"})


def test_pruned_checkpoint_missing_a_tensor_refused(ws, capsys):
    d = ws / "pruned"
    _drop_tensor(d / "model.safetensors", "model.layers.1.mlp.down_proj.bias")
    rerecord(d)  # the hashes agree: only the coverage check can see it
    before = snapshot(ws)
    for load in (lambda: AutoModelForCausalLM.from_pretrained(d), lambda: load_pruned(d)):
        with pytest.raises(FlapError) as err:
            load()
        assert "missing model.layers.1.mlp.down_proj.bias" in one_line(err)
    assert cli.main(["ppl", "pruned", "--data", "text", "--data-path", "corpus.txt", "--device", "cpu"]) == 2
    one_error(capsys.readouterr().err, "the checkpoint's tensors do not match the model "
                                       "(missing model.layers.1.mlp.down_proj.bias)")
    assert snapshot(ws) == before


@pytest.mark.parametrize("stream", [False, True], ids=["resident", "streamed"])
@pytest.mark.parametrize("change,msg", [
    ("drop", "missing model.layers.2.self_attn.k_proj.weight"),
    ("add", "unexpected model.layers.0.mlp.extra.weight"),
])
def test_base_checkpoint_not_covering_the_model_refused(ws, stream, change, msg, capsys, monkeypatch):
    f = ws / "model" / "model.safetensors"
    if change == "drop":
        _drop_tensor(f, "model.layers.2.self_attn.k_proj.weight")
    else:
        sd = load_file(f)
        sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)
        save_file(sd, f, metadata={"format": "pt"})
    import flap_exp.calibrate
    monkeypatch.setattr(flap_exp.calibrate, "collect_stats", lambda *a, **k: pytest.fail("calibrated"))
    before = snapshot(ws)
    assert cli.main(prune_args("out", *(["--stream"] if stream else []))) == 2
    one_error(capsys.readouterr().err, msg)
    assert snapshot(ws) == before


def test_pickled_base_weights_refused_before_torch_load(ws, capsys, monkeypatch):
    sd = load_file(ws / "model" / "model.safetensors")
    (ws / "model" / "model.safetensors").unlink()
    torch.save(sd, ws / "model" / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    before = snapshot(ws)
    for args in (prune_args("out"), ["ppl", "model", "--data", "text", "--data-path", "corpus.txt"]):
        assert cli.main(args) == 2
        one_error(capsys.readouterr().err, "model: its weights are pickled (pytorch_model.bin), never loaded here")
    assert snapshot(ws) == before
