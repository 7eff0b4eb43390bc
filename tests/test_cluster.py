"""The study on a real one-node SLURM cluster (flap_exp.pipeline.running.cluster, cluster=slurm).

A module-scoped cluster (tests/helpers/slurm.py: munge, slurmctld, slurmd under a temporary directory, stopped
by their PIDs). Where SLURM cannot be started, the tests fail with the reason when CI=true and skip elsewhere.
The tiny study of test_parallel.py runs serially and on the cluster (two array tasks at once, a DVC remote in
a directory, one MLflow server on 127.0.0.1); a toy pipeline covers a failed task, a rerun, a requeued task
and Ctrl-C. Stage processes are counted independently of DVC by test_parallel's sitecustomize hook.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from helpers.pipeline import (
    CELLS,
    DVC,
    GATHER,
    HOOK,
    OVERRIDES,
    ROOT,
    STUDY,
    VENV_BIN,
    env_for as _env,
    free_port as _free_port,
    ran,
    rest as _rest,
    results as _results,
    tiny_project,
)
from helpers.slurm import LocalSlurm, Unavailable

pytestmark = pytest.mark.pipeline

CLUSTER = [sys.executable, "-m", "flap_exp.pipeline.running.cluster", "cluster=slurm", "cluster.poll_s=0.5",
           "cluster.array_parallelism=2", "cluster.mem_gb=1", "cluster.time_min=20"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    except Unavailable as err:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"SLURM could not be started in CI: {err}")
        pytest.skip(f"SLURM could not be started here: {err}")
    yield cluster
    cluster.stop()


def _hook(where: Path) -> Path:
    (where / "hook").mkdir(parents=True, exist_ok=True)
    (where / "hook" / "sitecustomize.py").write_text(HOOK)
    return where / "hook"


def _run(repo: Path, cmd: list[str], slurm: LocalSlurm | None, check: bool = True, popen: bool = False, **extra):
    env = {**_env(repo, FLAP_TEST_STAGE_LOG=str(repo.parent / "stages.log")), **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(_hook(repo.parent)), env["PYTHONPATH"]])
    if slurm is not None:
        env.update(slurm.env())
        env["PATH"] = os.pathsep.join([env["PATH"], "/usr/bin", "/usr/sbin"])
    if popen:  # SIGINT as a terminal's Ctrl-C finds it: a suite started in the background (`make test &`) runs with
        # SIGINT ignored, which children inherit and Python then leaves ignored (three suite runs hung on it)
        return subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def _git_repo(repo: Path, remote: Path | None) -> None:
    cmds = [["git", "init", "-q"], [DVC, "init", "-q"]]
    if remote is not None:
        cmds.append([DVC, "remote", "add", "-d", "shared", str(remote)])
    for cmd in [*cmds, ["git", "add", "-A"], ["git", "commit", "-q", "-m", "pipeline"]]:
        subprocess.run(cmd, cwd=repo, env=_env(repo), check=True, capture_output=True)


def _commit(repo: Path, message: str) -> None:
    for cmd in (["git", "add", "-A"], ["git", "commit", "-q", "-m", message]):
        subprocess.run(cmd, cwd=repo, env=_env(repo), check=True, capture_output=True)


def _squeue(slurm: LocalSlurm, *args: str) -> str:
    return subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", *args], capture_output=True, text=True,
                          env={**os.environ, **slurm.env()}, timeout=60).stdout


def _mlflow_server(tmp: Path, repo: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "art")],
        env=_env(repo, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return server, uri
        except OSError:
            assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)


@pytest.mark.slow
def test_tiny_study_on_slurm_equals_serial_each_cell_once(slurm: LocalSlurm, tmp_path: Path):
    base = tmp_path / "base" / "repo"
    tiny_project(base, STUDY)
    subprocess.run([sys.executable, "-m", "flap_exp.pipeline.study.compose", *OVERRIDES], cwd=base, env=_env(base),
                   check=True, capture_output=True)
    serial = tmp_path / "serial" / "repo"
    shutil.copytree(base, serial)
    _git_repo(serial, None)
    t0 = time.monotonic()
    _run(serial, [DVC, "repro"], None, MLFLOW_TRACKING_URI=f"sqlite:///{serial.parent / 'mlflow.db'}")
    serial_s = time.monotonic() - t0

    repo = tmp_path / "cluster" / "repo"
    shutil.copytree(base, repo)
    _git_repo(repo, tmp_path / "remote")
    server, uri = _mlflow_server(tmp_path, repo)
    try:
        t0 = time.monotonic()
        p = _run(repo, [*CLUSTER, f"cluster.mlflow_tracking_uri={uri}"], slurm)
        cluster_s = time.monotonic() - t0
        print(p.stdout[-3000:])
        print(f"tiny study: serial dvc repro {serial_s:.0f} s, cluster=slurm {cluster_s:.0f} s")

        # Same numbers, selections and report metrics as the serial run.
        assert _results(repo) == _results(serial)
        metrics = {r: (r / "reports" / "metrics.json").read_text().replace(str(r), "<repo>") for r in (repo, serial)}
        assert metrics[repo] == metrics[serial]
        # Every stage process ran exactly once, the same ones as serially; the cells in the array's tasks,
        # two at once; the final repro only restored the cells and gathered.
        runs, serial_runs = Counter(_lines(repo)), Counter(_lines(serial))
        assert runs == serial_runs and set(runs.values()) == {1}, runs
        assert f"submitted {len(CELLS) + 1} cell(s) as SLURM job array" in p.stdout
        assert "at most 2 running at once" in p.stdout
        final = p.stdout.split("cluster: final dvc repro")[1]
        assert set(ran(subprocess.CompletedProcess([], 0, final, ""))) == GATHER
        assert all(f"Stage 'evaluate@{c}' is cached - skipping run" in final for c in CELLS)
        assert "Stage 'evaluate_dense' is cached - skipping run" in final
        # Usage side files: one per computed stage, as serially; the cells' came back from the tasks.
        usage = sorted(f.name for f in (repo / "results" / "usage").glob("*.json"))
        assert usage == sorted(f.name for f in (serial / "results" / "usage").glob("*.json"))
        assert all(f"evaluate@{c}.json" in usage for c in CELLS)
        # The remote holds the run-cache the final repro restored from.
        assert list((tmp_path / "remote" / "runs").rglob("*")), "no run-cache pushed to the remote"

        # One MLflow run per cell (+ dense) on the server, with the serial numbers.
        exp = _rest(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=flap-tiny-llama")["experiment"]
        rs = _rest(f"{uri}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                          "run_view_type": "ALL"})["runs"]
        cells = Counter(next(t["value"] for t in r["data"]["tags"] if t["key"] == "flap.cell") for r in rs)
        assert cells == Counter(f"{c}@quick" for c in [*CELLS, "dense"])

        # Nothing to do the second time: nothing submitted, nothing run, no new MLflow run.
        p = _run(repo, [*CLUSTER, f"cluster.mlflow_tracking_uri={uri}"], slurm)
        assert "submitted" not in p.stdout and ran(p) == set() and Counter(_lines(repo)) == runs
        assert len(_rest(f"{uri}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                                "run_view_type": "ALL"})["runs"]) == len(rs)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _lines(repo: Path) -> list[str]:
    log = repo.parent / "stages.log"
    return log.read_text().splitlines() if log.exists() else []


# A toy pipeline: a shared stage, three cells (each can be told to fail or to sleep on its first attempt),
# a gathering stage.
TOY_DVC = """stages:
  base:
    cmd: python -c "open('shared.txt', 'w').write(open('seed.txt').read())"
    deps: [seed.txt]
    outs: [shared.txt]
  cell:
    foreach: [a, b, c]
    do:
      cmd: python cell.py ${item}
      deps: [shared.txt, cell.py]
      params:
        - cells.${item}
      outs:
        - out/${item}.txt
  gather:
    cmd: python -c "import glob; open('all.txt', 'w').write(','.join(sorted(glob.glob('*.txt', root_dir='out'))))"
    deps: [out]
    outs: [all.txt]
"""
CELL_PY = """import os, sys, time, yaml
item = sys.argv[1]
p = yaml.safe_load(open("params.yaml"))["cells"][item]
with open(os.environ["FLAP_TEST_CELL_LOG"], "a") as f:
    f.write(f"{item} {os.environ.get('SLURM_RESTART_COUNT', '0')}\\n")
if p["fail"]:
    sys.exit(f"cell {item} refuses to run")
if p["sleep"] and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    time.sleep(p["sleep"])
os.makedirs("out", exist_ok=True)
open(f"out/{item}.txt", "w").write(open("shared.txt").read() + item + str(p["v"]))
"""


def _toy(tmp_path: Path) -> Path:
    repo = tmp_path / "toy" / "repo"
    repo.mkdir(parents=True)
    (repo / "dvc.yaml").write_text(TOY_DVC)
    (repo / "cell.py").write_text(CELL_PY)
    (repo / "seed.txt").write_text("s")
    _params(repo, b={"fail": True})
    shutil.copytree(ROOT / "conf" / "cluster", repo / "conf" / "cluster")
    (repo / ".gitignore").write_text("mlflow.db\n")
    _git_repo(repo, tmp_path / "toy" / "remote")
    return repo


def _params(repo: Path, **cells: dict) -> None:
    full = {c: {"fail": False, "sleep": 0, "v": 0, **cells.get(c, {})} for c in "abc"}
    (repo / "params.yaml").write_text(json.dumps({"cells": full}))


def _cell_log(repo: Path) -> list[str]:
    f = repo.parent / "cells.log"
    return sorted(f.read_text().splitlines()) if f.exists() else []


@pytest.mark.slow
def test_failed_task_rerun_requeue_and_ctrl_c(slurm: LocalSlurm, tmp_path: Path):
    repo = _toy(tmp_path)
    env = {"FLAP_TEST_CELL_LOG": str(repo.parent / "cells.log"), "PYTHONPATH": str(ROOT / "src"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo.parent / 'mlflow.db'}"}
    cmd = [*CLUSTER, "cluster.array_parallelism=3"]

    # b fails: its log tail with its name, the others finish and are restored here; exit 2, one error line.
    p = _run(repo, cmd, slurm, check=False, **env)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "cell@b: FAILED" in p.stderr and "cell b refuses to run" in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("flap-exp: error: 1 cell(s) failed: cell@b (logs above)")
    assert _cell_log(repo) == ["a 0", "b 0", "c 0"]
    assert (repo / "out" / "a.txt").read_text() == "sa0" and not (repo / "all.txt").exists()

    # Fixed and committed: the rerun submits b only (a and c are up to date), then gathers once.
    _params(repo)
    _commit(repo, "b fixed")
    p = _run(repo, cmd, slurm, **env)
    assert "submitted 1 cell(s)" in p.stdout and "cell@b: done" in p.stdout
    assert _cell_log(repo) == ["a 0", "b 0", "b 0", "c 0"]
    assert (repo / "all.txt").read_text() == "a.txt,b.txt,c.txt"
    assert ran(p) == {"gather"}

    # c changed and slow on its first attempt: requeued while running, only c's task reruns, once more.
    _params(repo, c={"v": 1, "sleep": 600})
    _commit(repo, "c slow")
    proc = _run(repo, cmd, slurm, popen=True, **env)
    task = _wait_running(slurm, repo, "c 0")  # in cell.py's sleep: the cell is being computed
    subprocess.run(["scontrol", "requeue", task], env={**os.environ, **slurm.env()}, check=True, timeout=60)
    _release(slurm, task)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    assert "was requeued" in out and "cell@c: done" in out and "attempt 2" in out, out + err
    assert _cell_log(repo) == ["a 0", "b 0", "b 0", "c 0", "c 0", "c 1"]
    assert (repo / "out" / "c.txt").read_text() == "sc1"

    # Ctrl-C while a task runs: the array is cancelled (scancel) and the command says so; nothing is left queued.
    _params(repo, a={"v": 1, "sleep": 600})
    _commit(repo, "a slow")
    proc = _run(repo, cmd, slurm, popen=True, **env)
    _wait_running(slurm, repo, "a 0")
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # say where it hangs
        proc.send_signal(signal.SIGUSR1)  # cluster.main's faulthandler: every thread's stack to stderr
        time.sleep(5)
        procs = subprocess.run(["ps", "-o", "pid,ppid,stat,etime,cmd", "--ppid", str(proc.pid)], capture_output=True,
                               text=True).stdout
        proc.kill()
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"Ctrl-C did not end the cluster run in 300 s; its children:\n{procs}\nstdout:\n{out[-2000:]}"
                    f"\nstderr (with the stacks):\n{err[-6000:]}")
    assert proc.returncode == 130, out + err
    assert "interrupted: cancelled SLURM job array" in err and "(scancel " in err
    deadline = time.time() + 60
    while _squeue(slurm).strip() and time.time() < deadline:
        time.sleep(1)
    assert _squeue(slurm).strip() == ""


def _wait_running(slurm: LocalSlurm, repo: Path, line: str, timeout: float = 300) -> str:
    """The array task running the cell whose log line appeared once more (the only running task)."""
    before = _cell_log(repo).count(line)
    deadline = time.time() + timeout
    while time.time() < deadline:
        running = [r.split("|")[0] for r in _squeue(slurm).split() if r.endswith("|RUNNING")]
        if _cell_log(repo).count(line) > before and len(running) == 1:
            return running[0]
        time.sleep(0.5)
    raise AssertionError(f"no running task with {line!r}: {_squeue(slurm)}")


def _release(slurm: LocalSlurm, task: str) -> None:
    """A requeued job waits ~2 minutes (its BeginTime) before SLURM starts it again; start it now."""
    env = {**os.environ, **slurm.env()}
    deadline = time.time() + 60
    while f"{task}|PENDING" not in _squeue(slurm) and time.time() < deadline:
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"jobid={task}", "StartTime=now"], env=env, check=True, timeout=60)


@pytest.mark.slow  # nine commands, each starting Python with DVC and Hydra (~5-10 s here)
def test_bad_input_one_line_before_any_job(slurm: LocalSlurm, tmp_path: Path):
    """Each mistake: exit 2, one `flap-exp: error:` line, and no job reached the queue."""
    repo = _toy(tmp_path)
    env = {"FLAP_TEST_CELL_LOG": str(repo.parent / "cells.log"), "PYTHONPATH": str(ROOT / "src"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo.parent / 'mlflow.db'}"}
    before = _squeue(slurm)

    def refused(cmd: list[str], match: str, with_slurm: bool = True, **extra) -> None:
        p = _run(repo, cmd, slurm if with_slurm else None, check=False, **{**env, **extra})
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("flap-exp: error: "), p.stderr
        assert match in lines[0], lines[0]

    refused(CLUSTER, "no `sbatch` on PATH", with_slurm=False, PATH=str(VENV_BIN))  # (/bin is /usr/bin here)
    refused([*CLUSTER, "cluster.partition=gpu"], "unknown SLURM partition 'gpu'; sinfo lists: debug")
    refused([*CLUSTER, "cluster.mlflow_tracking_uri=http://127.0.0.1:9"], "unreachable")
    refused(CLUSTER, "needs an MLflow tracking server", MLFLOW_TRACKING_URI="")
    refused([*CLUSTER, "cluster.dvc_remote=elsewhere"], "no DVC remote named 'elsewhere'")
    refused([*CLUSTER, "cluster.mem_gb=0"], "cluster.mem_gb must be a number >= 0.1")
    refused([*CLUSTER, "cluster.nodes=3"], "nodes")
    (repo / "cell.py").write_text(CELL_PY + "# edited\n")
    refused(CLUSTER, "changes the cluster's tasks would not see (they clone HEAD): cell.py")
    subprocess.run(["git", "checkout", "cell.py"], cwd=repo, check=True)
    subprocess.run([DVC, "remote", "remove", "shared"], cwd=repo, env=_env(repo), check=True, capture_output=True)
    _commit(repo, "no remote")
    refused(CLUSTER, "needs a DVC remote the tasks share")
    assert _squeue(slurm) == before and _cell_log(repo) == []
