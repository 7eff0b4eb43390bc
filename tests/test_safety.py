"""Issue 8 §1 and §3: never destroy what the user did not ask to replace; check every option before the
long work. Each test asserts the exit status, the one-line message, and that nothing appeared, changed or
vanished outside the intended output (a snapshot of paths, sha256 and modes before and after)."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from flap_exp import cli
from flap_exp.atomic import atomic_dir, atomic_file
from flap_exp.data import Corpus, load_text, read_utf8
from flap_exp.errors import FlapError
from flap_exp.tempfiles import HOST, sweep_stale, temp_prefix

from helpers.models import save_model_dir

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures and helpers

def _make_model(path: Path) -> str:
    """A tiny GQA LLaMA with a word-level tokenizer, saved like a user's local model; returns its corpus."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(50)]
    text = " ".join(rng.choices(words, k=3000)) + "\n"
    save_model_dir(path, words, std=None)
    return text


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("safety-template")
    (base / "corpus.txt").write_text(_make_model(base / "model"))
    return base


@pytest.fixture
def ws(template, tmp_path, monkeypatch) -> Path:
    """A private workspace: model/, corpus.txt, an empty model cache; the cwd."""
    shutil.copytree(template, tmp_path / "ws")
    ws = tmp_path / "ws"
    (ws / "cache").mkdir()
    monkeypatch.setenv("FLAP_EXP_CACHE", str(ws / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ws)
    return ws


def snapshot(root: Path, skip: Path | None = None) -> dict:
    """{relative path: (kind, sha256 or None, mode)} of everything under root (hidden entries included)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            if skip is not None and (p == skip or skip in p.parents):
                continue
            st = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), digest, stat.S_IMODE(st.st_mode))
    return out


def prune_args(out: str, *extra: str) -> list[str]:
    return ["prune", "--model", "model", "--calib", "text", "--calib-path", "corpus.txt", "--nsamples", "8",
            "--seqlen", "16", "--device", "cpu", "--out", out, *extra]


def one_error(err: str, msg: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("flap-exp: error:")]
    assert len(lines) == 1 and msg in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def run_main(args: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(args)
    return rc, capsys.readouterr().err


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any model weights are loaded (validation must come first)."""
    import flap_exp.models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(flap_exp.models, "load_model", refuse)


# ---------------------------------------------------------------- §1: --out never destroys user files

def _prepare(ws: Path, case: str) -> str:
    if case == "unrelated_dir":
        (ws / "mine").mkdir()
        (ws / "mine" / "notes.txt").write_text("precious")
        return "mine"
    if case == "regular_file":
        (ws / "report.txt").write_text("precious")
        return "report.txt"
    if case == "inside_file":
        (ws / "report.txt").write_text("precious")
        return "report.txt/pruned"
    if case == "symlink":
        (ws / "mine").mkdir()
        (ws / "mine" / "notes.txt").write_text("precious")
        os.symlink("mine", ws / "link")
        return "link"
    return {"model_dir": "model", "inside_model": "model/pruned", "contains_model": str(ws)}[case]


@pytest.mark.parametrize("case,msg", [
    ("unrelated_dir", "is an existing directory that is not a flap-exp pruned model (no flap_manifest.json); "
                      "refusing to replace it"),
    ("model_dir", "is the input model's directory"),
    ("inside_model", "is inside the input model's directory"),
    ("contains_model", "contains the input model's directory"),
    ("regular_file", "is an existing file; refusing to replace it"),
    ("inside_file", "report.txt is a file, so nothing can be created inside it"),
    ("symlink", "is a symbolic link; refusing to replace it"),
])
def test_out_refuses_what_it_would_destroy(ws, case, msg, capsys, no_loading):
    out = _prepare(ws, case)
    before = snapshot(ws)
    rc, err = run_main(prune_args(out, "--overwrite"), capsys)  # --overwrite never widens what is replaced
    assert rc == 2
    one_error(err, msg)
    assert snapshot(ws) == before


def test_out_in_an_unwritable_place(ws, capsys, no_loading):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc (a directory nobody can create entries in)")
    before = snapshot(ws)
    rc, err = run_main(prune_args("/proc/flap-exp-out"), capsys)
    assert rc == 2
    one_error(err, "--out /proc/flap-exp-out: cannot create anything in /proc")
    assert snapshot(ws) == before


def test_overwrite_replaces_only_a_flap_exp_directory(ws, capsys):
    assert cli.main(prune_args("out")) == 0
    capsys.readouterr()
    manifest = json.loads((ws / "out" / "flap_manifest.json").read_text())
    before = snapshot(ws)
    rc, err = run_main(prune_args("out"), capsys)  # without --overwrite: refused, nothing touched
    assert rc == 2
    one_error(err, "--out out already holds a flap-exp pruned model; pass --overwrite to replace it")
    assert snapshot(ws) == before
    assert cli.main(prune_args("out", "--overwrite", "--ratio", "0.5")) == 0
    after = snapshot(ws, skip=ws / "out")
    assert {k: v for k, v in before.items() if k != "out" and not k.startswith("out/")} == after  # only out/
    new = json.loads((ws / "out" / "flap_manifest.json").read_text())
    assert new["settings"]["ratio"] == 0.5 and manifest["settings"]["ratio"] == 0.2
    assert not [p for p in ws.iterdir() if p.name.startswith(".")]  # no temporaries or old copies left


def test_empty_directory_is_used(ws, capsys):
    (ws / "empty").mkdir()
    assert cli.main(prune_args("empty")) == 0
    assert (ws / "empty" / "flap_manifest.json").is_file()


# ---------------------------------------------------------------- §1: interrupted runs leave nothing

_SLOW_SAVE = """
import sys, time
from pathlib import Path
import flap_exp.manifest as manifest
real = manifest.sha256_file
def slow(path):  # called inside the atomic temporary directory, after the weights are written
    Path(sys.argv[1]).write_text(str(path))
    time.sleep(60)
    return real(path)
manifest.sha256_file = slow
from flap_exp.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _start_slow_prune(ws: Path, out: str) -> tuple[subprocess.Popen, Path]:
    ready = ws.parent / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(ready), *prune_args(out)], cwd=ws, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the prune never reached its save"
        time.sleep(0.1)
    return proc, ready


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_save_removes_the_temporary(ws, sig):
    before = snapshot(ws)
    proc, ready = _start_slow_prune(ws, "out")
    tmps = [p for p in ws.iterdir() if p.name.startswith(f".out.tmp-{proc.pid}-{HOST}-")]
    assert len(tmps) == 1 and (tmps[0] / "model.safetensors").exists()  # the signal lands mid-save
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"flap-exp: stopped by {sig.name}; temporaries removed" in err and "Traceback" not in err
    assert snapshot(ws) == before  # no temporary, no half output, nothing else touched


def test_kill9_temporary_is_swept_next_run_and_live_ones_kept(ws, capsys):
    proc, _ = _start_slow_prune(ws, "out")
    proc.kill()
    proc.communicate(timeout=60)
    stale = [p for p in ws.iterdir() if p.name.startswith(f".out.tmp-{proc.pid}-")]
    assert len(stale) == 1
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = ws / f".other.tmp-{sleeper.pid}-{HOST}-abcd1234"
        live.mkdir()
        foreign = ws / f".other.tmp-{proc.pid}-{'0' * 6 if HOST != '0' * 6 else '1' * 6}-abcd1234"
        foreign.mkdir()  # another host's temporary on a shared filesystem: its pid means nothing here
        user = ws / ".out.tmp-notes"  # a user's file that merely looks similar
        user.write_text("mine")
        before = snapshot(ws, skip=stale[0])
        assert before.pop(".out.lock")  # the killed run's lock on --out: taken over, then released
        rc, err = run_main(prune_args("out"), capsys)
        assert rc == 0, err
        assert f"flap-exp: removed stale temporary {stale[0]} (process {proc.pid} is gone)" in err
        assert f"flap-exp: took over the stale lock {ws / '.out.lock'} (process {proc.pid} is gone)" in err
        assert not stale[0].exists() and live.is_dir() and foreign.is_dir() and user.read_text() == "mine"
        after = snapshot(ws, skip=ws / "out")
        assert after == before
    finally:
        sleeper.kill()
        sleeper.wait()


def test_interrupted_replacement_is_put_back(tmp_path, capsys):
    """kill -9 between moving the old output aside and moving the new one in: the next run restores it."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    aside = tmp_path / f".out.old-{dead.pid}-{HOST}-0001"
    aside.mkdir()
    (aside / "flap_manifest.json").write_text("{}")
    tmp = tmp_path / f".out.tmp-{dead.pid}-{HOST}-0002"
    tmp.mkdir()
    done = sweep_stale(tmp_path)
    assert sorted(done) == sorted([aside, tmp])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "flap_manifest.json").read_text() == "{}"
    err = capsys.readouterr().err
    assert f"restored {tmp_path / 'out'} from an interrupted replacement (process {dead.pid} is gone)" in err


def test_cache_temporaries_carry_the_pid_and_are_swept(tmp_path, monkeypatch, capsys):
    """The model cache's temporaries (conversion, wheel downloads) go through atomic_dir/scratch_dir."""
    from flap_exp.atomic import scratch_dir
    monkeypatch.setenv("FLAP_EXP_CACHE", str(tmp_path))
    with atomic_dir(tmp_path / "models" / "m") as d:
        assert d.name.startswith(temp_prefix("m"))
    with scratch_dir(tmp_path / "wheels", "w.download") as d:
        assert d.name.startswith(temp_prefix("w.download"))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / "models" / f".smollm2-135m.tmp-{dead.pid}-{HOST}-zz"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    import flap_exp.models

    def no_conversion(*a):  # the sweep must come before any conversion or loading
        raise FlapError("conversion not wanted in this test")
    monkeypatch.setattr(flap_exp.models, "_convert", no_conversion)
    with pytest.raises(FlapError, match="conversion not wanted"):
        flap_exp.models.load_model("smollm2-135m")
    assert not stale.exists()
    assert f"removed stale temporary {stale}" in capsys.readouterr().err


# ---------------------------------------------------------------- §1: the user's umask

@pytest.mark.parametrize("mask,dmode,fmode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_outputs_follow_the_umask(ws, capsys, mask, dmode, fmode):
    old = os.umask(mask)
    try:
        assert cli.main(prune_args("a/b/out")) == 0
        with atomic_file(ws / "f.json") as t:
            t.write_text("{}")
    finally:
        os.umask(old)
    for p in [ws / "a", ws / "a" / "b", ws / "a" / "b" / "out"]:
        assert stat.S_IMODE(p.stat().st_mode) == dmode, p
    files = list((ws / "a" / "b" / "out").iterdir()) + [ws / "f.json"]
    assert "model.safetensors" in {f.name for f in files}
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: fmode for f in files}


# ---------------------------------------------------------------- §3: every option before the long work

@pytest.mark.parametrize("extra,msg", [
    (["--nsamples", "1"], "--nsamples must be at least 2 (the variance of one sample is undefined), got 1"),
    (["--seqlen", "1"], "--seqlen must be at least 2 (a window of one token predicts nothing), got 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--min-groups", "-1"], "--min-groups must be at least 0, got -1"),
    (["--remove-groups", "-2", "--structure", "al_mm"], "--remove-groups must be at least 0, got -2"),
    (["--device", "foo"], "unknown device 'foo'; valid: auto, cpu, cuda (or cuda:N)"),
    (["--min-groups", "3"], "--min-groups 3 is above the model's 2 k/v groups per layer"),
    (["--min-channels", "49"], "--min-channels 49 is above the model's 48 MLP channels per layer"),
    (["--remove-groups", "7", "--structure", "al_mm"],
     "--remove-groups 7 is above the model's 6 k/v groups (3 layers x 2)"),
    (["--remove-groups", "2", "--structure", "ul_mm", "--min-groups", "2"],
     "--remove-groups 2 cannot be met with --min-groups 2"),
    (["--remove-groups", "6", "--structure", "al_mm", "--ratio", "0.2"],
     "ratio 0.2 cannot be met: --remove-groups 6 alone removes 0.4000"),
    (["--min-groups", "2", "--min-channels", "48"],
     "ratio 0.2 cannot be met: --min-groups 2 / --min-channels 48 leave at most 0.0000"),
    (["--calib-path", "latin1.txt"], "latin1.txt is not UTF-8 text: byte 0xe9 at offset 6 (invalid continuation byte)"),
    (["--calib-path", "missing.txt"], "corpus 'text' needs an existing file path, got 'missing.txt'"),
    (["--eval", "--eval-data", "text", "--eval-data-path", "missing.txt"], "corpus 'text' needs an existing file path"),
    (["--eval", "--eval-data-path", "nowhere"], "nowhere/wiki.test.raw not found"),
    (["--ratio", "nan"], "pruning ratio must be in [0, 1), got nan"),
])
def test_prune_options_checked_before_loading(ws, extra, msg, capsys, no_loading):
    (ws / "latin1.txt").write_bytes("caf\xe9 w1 caf\xe9".encode("latin-1").replace(b"caf", b"cafcaf", 1))
    before = snapshot(ws)
    rc, err = run_main(prune_args("out", *extra), capsys)
    assert rc == 2
    one_error(err, msg)
    assert snapshot(ws) == before


def test_cuda_without_a_gpu(ws, capsys, no_loading):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    before = snapshot(ws)
    rc, err = run_main(prune_args("out", "--device", "cuda"), capsys)
    assert rc == 2
    one_error(err, "--device cuda: no CUDA GPU is available here")
    assert snapshot(ws) == before


def test_remove_groups_ignored_by_al_am_is_a_warning(ws, capsys):
    rc, err = run_main(prune_args("out", "--remove-groups", "2"), capsys)
    assert rc == 0
    assert ("flap-exp: warning: --remove-groups is used by the MM structures (ul_mm, al_mm) only; "
            "ignored by al_am") in err


@pytest.mark.parametrize("extra,msg", [
    (["--max-windows", "0"], "--max-windows must be at least 1, got 0"),
    (["--seqlen", "1"], "--seqlen must be at least 2"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--data", "text", "--data-path", "latin1.txt"], "is not UTF-8 text: byte 0xe9 at offset 3"),
    (["--data-path", "nowhere"], "nowhere/wiki.test.raw not found"),
])
def test_ppl_options_checked_before_loading(ws, extra, msg, capsys, no_loading):
    (ws / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    before = snapshot(ws)
    rc, err = run_main(["ppl", "model", "--device", "cpu", *extra], capsys)
    assert rc == 2
    one_error(err, msg)
    assert snapshot(ws) == before


def test_read_utf8_matches_read_text(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes("a\r\nb\rc\nd é\n".encode())
    assert read_utf8(f) == f.read_text(encoding="utf-8") == "a\nb\nc\nd é\n"
    f.write_bytes(b"ok\n" * 10 + b"\xff")
    with pytest.raises(FlapError, match=r"t.txt is not UTF-8 text: byte 0xff at offset 30"):
        load_text(Corpus("text", path=str(f)))


# ---------------------------------------------------------------- §3: the pipeline's composition

@pytest.mark.parametrize("overrides,msg", [
    (["model=local"], "model.name is not set: model=local needs model.name=/path/to/model"),
    (["data.calib.nsamples=abc"], "data.calib.nsamples must be an integer, got 'abc'"),
    (["data.calib.nsamples=1e3"], "data.calib.nsamples must be an integer, got 1000.0"),
    (["data.calib.nsamples=1"], "data.calib.nsamples must be at least 2"),
    (["eval.max_windows=ten"], "eval.max_windows must be an integer, got 'ten'"),
    (["eval.seqlen=1"], "eval.seqlen must be at least 2"),
    (["eval.zeroshot.limit=0"], "eval.zeroshot.limit must be at least 1, got 0"),
    (["tables.main.blocks.flap.ratios=[abc]"],
     "table 'main' block 'flap': ratio must be a number in [0, 1), got 'abc'"),
    (["metrics.wifv.compensation=maybe"], "unknown compensation 'maybe'; known compensations: none, bias, lsq"),
    (["structures.al_am.min_groups=-1"], "structures.al_am.min_groups must be at least 0, got -1"),
    (["data=text", "data.calib.path=f.txt"], "data.eval.path is not set: corpus 'text' needs data.eval.path=FILE"),
])
def test_compose_validates_params_before_writing(tmp_path, overrides, msg, capsys):
    from flap_exp.pipeline.study.compose import main
    (tmp_path / "params.yaml").write_text("keep: me\n")
    before = snapshot(tmp_path)
    assert main(["--conf", str(ROOT / "conf"), "--out", str(tmp_path / "params.yaml"), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compose: error: ") and msg in err[0], err
    assert snapshot(tmp_path) == before


def test_stage_params_are_checked_too(tmp_path, monkeypatch):
    """`dvc exp run -S` composes with DVC's own code: the stages' load_params checks the same way."""
    from flap_exp.pipeline.steps.stage import load_params
    (tmp_path / "params.yaml").write_text("model: {name: '???'}\n")
    with pytest.raises(FlapError, match="model.name is not set"):
        load_params(tmp_path / "params.yaml")


# ---------------------------------------------------------------- §3: the MLflow store is reached

class _NotMlflow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("uri,msg", [
    ("localhost:5000", "unknown scheme 'localhost'; use http(s)://host:port, sqlite:///file.db"),
    ("htp://127.0.0.1:5000", "unknown scheme 'htp'"),
    ("http//127.0.0.1:5000", "unknown scheme '(none)'"),
    ("http://", "no host"),
    ("sqlite://mlflow.db", "a SQLite store is sqlite:///relative.db or sqlite:////absolute/path.db"),
    ("sqlite:///notadb.db", "MLflow database notadb.db is not a usable SQLite database (file is not a database)"),
    ("sqlite:////nonexistent-dir/x.db", "MLflow database folder /nonexistent-dir is missing or not writable"),
    ("file:///etc/hostname", "is a file, not a directory"),
    ("http://127.0.0.1:1", "MLflow tracking server http://127.0.0.1:1 is unreachable"),
    ("postgresql://u@127.0.0.1:1/db", "MLflow database 127.0.0.1:1 is unreachable"),
    ("NOT_MLFLOW", "does not answer as an MLflow tracking server (HTTP 404 on /api/2.0/mlflow/experiments/search)"),
])
def test_tracking_preflight_reaches_the_store(tmp_path, monkeypatch, capsys, uri, msg):
    from flap_exp.pipeline.reporting.tracking import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notadb.db").write_text("not a database")
    server = None
    if uri == "NOT_MLFLOW":  # a web server that answers /health but is not MLflow
        server = http.server.HTTPServer(("127.0.0.1", 0), _NotMlflow)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        before = snapshot(tmp_path)
        assert main(["--check"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mlflow: error: ") and msg in err[0], err
        assert snapshot(tmp_path) == before
    finally:
        if server is not None:
            server.shutdown()
