"""Warm stages (flap_exp.pipeline.running.warm_client / warm_server): `python stages/X.py` run in a process forked
from one that already imported torch and the library behaves as a fresh interpreter would: the same arguments,
directory, environment, standard streams and exit status; signals reach the stage; a stage never runs code that
changed on disk since the server imported it; anything else runs the real interpreter."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers.pipeline import ROOT, stop_warm, warm_env

TOY = """import os, sys, time
from pathlib import Path
print("torch imported before the script:", "torch" in sys.modules)
print("argv", sys.argv[1:], "cwd", os.getcwd(), "TOY", os.environ.get("TOY"), "stdin", sys.stdin.read().strip())
print("a line on stderr", file=sys.stderr)
sys.stdout.flush()
Path("pid").write_text(str(os.getpid()))
if "sleep" in sys.argv:
    time.sleep(120)
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture
def project(tmp_path: Path):
    """A folder with stages/toy.py, a copy of the library (so that editing it touches nothing of the checkout)
    and the warm environment; the servers it started are stopped afterwards."""
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "toy.py").write_text(TOY)
    shutil.copytree(ROOT / "src" / "flap_exp", tmp_path / "src" / "flap_exp",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, **warm_env(tmp_path, tmp_path / "src"), "PYTHONPATH": str(tmp_path / "src"), "TOY": "t1"}
    yield tmp_path, env
    stop_warm(tmp_path)


def run(folder: Path, env: dict, *args: str, stdin: str = "in") -> subprocess.CompletedProcess:
    return subprocess.run(["python", *args], cwd=folder, env=env, input=stdin, capture_output=True, text=True,
                          timeout=120)


def server_pids(folder: Path) -> list[int]:
    return [int(p.read_text().split()[0]) for p in (folder / "warm" / "sock").glob("*.lock") if p.read_text().strip()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def wait_for(cond, seconds: float = 30.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_a_warm_stage_behaves_as_a_fresh_interpreter(project):
    folder, env = project
    cold = run(folder, env, "stages/toy.py", "3", "x y")  # no server yet: runs cold and starts one
    assert cold.returncode == 3 and "torch imported before the script: False" in cold.stdout
    assert wait_for(lambda: server_pids(folder)), "no server started"
    warm = run(folder, env, "stages/toy.py", "3", "x y")
    assert warm.returncode == 3, warm.stderr
    assert "torch imported before the script: True" in warm.stdout  # the server's imports
    assert warm.stdout.splitlines()[1] == cold.stdout.splitlines()[1] == \
        f"argv ['3', 'x y'] cwd {folder} TOY t1 stdin in"
    assert warm.stderr == cold.stderr == "a line on stderr\n"
    env2 = {**env, "TOY": "t2"}  # another environment: another server (its imports may read it)
    assert "TOY t2" in run(folder, env2, "stages/toy.py", "0").stdout
    assert wait_for(lambda: len(server_pids(folder)) == 2)
    assert run(folder, env, "-c", "import sys; print(sys.argv, 'torch' in sys.modules)").stdout.strip() == \
        "['-c'] False"  # not a stage: the real interpreter


def test_signals_reach_the_stage_and_a_lost_client_ends_it(project):
    folder, env = project
    run(folder, env, "stages/toy.py", "0")
    assert wait_for(lambda: server_pids(folder))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        (folder / "pid").unlink(missing_ok=True)
        p = subprocess.Popen(["python", "stages/toy.py", "0", "sleep"], cwd=folder, env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert wait_for(lambda: (folder / "pid").exists() and (folder / "pid").read_text())
        stage = int((folder / "pid").read_text())
        assert stage != p.pid and alive(stage)  # the stage runs in the server's fork, not in the client
        p.send_signal(sig)
        assert p.wait(timeout=30) == -sig
        assert wait_for(lambda s=stage: not alive(s), 10), f"stage {stage} survived its client's {sig!r}"


def test_a_changed_library_file_is_never_run_warm(project):
    folder, env = project
    run(folder, env, "stages/toy.py", "0")
    assert wait_for(lambda: server_pids(folder))
    assert "True" in run(folder, env, "stages/toy.py", "0").stdout.splitlines()[0]
    server = server_pids(folder)[0]
    ppl = folder / "src" / "flap_exp" / "ppl.py"
    ppl.write_text(ppl.read_text() + "\n# edited\n")
    again = run(folder, env, "stages/toy.py", "0")
    assert again.returncode == 0 and "False" in again.stdout.splitlines()[0]  # cold: the edited code
    assert wait_for(lambda: not alive(server), 10)  # the stale server is gone


def test_warm_off(project):
    folder, env = project
    for _ in range(2):
        out = run(folder, {**env, "FLAP_WARM": "0"}, "stages/toy.py", "0")
        assert out.returncode == 0 and "False" in out.stdout.splitlines()[0]
    assert not (folder / "warm" / "sock").exists() or not server_pids(folder)


def test_make_run_installs_the_shim_before_the_study(tmp_path: Path):
    """`make run` on a fresh clone builds the warm shim and puts it first on the stages' PATH (a prerequisite
    named by a variable defined below the rule once left it out, and every stage of `make run` started cold)."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / ".venv").mkdir()
    time.sleep(0.01)
    (tmp_path / ".venv" / ".installed").write_text("")  # newer than pyproject.toml: setup is done
    plan = subprocess.run(["make", "-n", "run"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    lines = plan.splitlines()
    install = [i for i, line in enumerate(lines) if "warm_client --install .venv/warm" in line]
    repro = [i for i, line in enumerate(lines) if "fast_lock repro" in line]
    assert install and repro and install[0] < repro[0], plan
    assert f"PATH={tmp_path}/.venv/warm:{tmp_path}/.venv/bin:" in lines[repro[0]]
    off = subprocess.run(["make", "-n", "run", "WARM=0"], cwd=tmp_path, capture_output=True, text=True).stdout
    assert ".venv/warm:" not in off
