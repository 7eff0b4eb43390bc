"""What one SLURM array task runs (pickled by submitit, called on the node): one cell in its own clone.

1. `git clone` the project and check out the submitted commit into a fresh directory on the node
   (DVC locks a workspace, so two tasks never share one); the DVC remote is set there as its default.
2. `dvc fetch --run-cache`, `dvc repro --pull CELL`: the shared stages and anything another task or an
   earlier run already computed are restored from the remote's run-cache, never recomputed.
3. `dvc push --run-cache`: the cell's outputs and run records go to the remote for the final gathering.
4. The stages' usage side files (results/usage/*.json, wall time and memory; not DVC outputs) and an
   outcome record (`outcome.json`: ran/restored stages, attempt, host, the output's tail) are written to
   the run's folder, which the command that submitted the array reads.

A requeue (preemption, node failure, `scontrol requeue`) reruns the task from step 1 in a new clone:
whatever it had pushed is restored, the rest recomputed. `checkpoint` is submitit's preemption/timeout
hook: it asks submitit to requeue this same task.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .fast_lock import DVC

RAN = re.compile(r"Running stage '([^']+)'")
RESTORED = re.compile(r"Stage '([^']+)' is cached - skipping run, checking out outputs")
REMOTE = "flap-cluster"  # the name the task's clone gives the remote (a clone has no .dvc/config.local)
TAIL_LINES = 40  # of a failed command's output: enough for a stage's traceback and DVC's own error


def slug(cell: str) -> str:
    """A cell's name as a file name (`evaluate@wifv-al_am-0.5` -> `evaluate_wifv-al_am-0.5`)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", cell)


@dataclass(frozen=True)
class CellTask:
    origin: str  # the project directory (git clones it; on a filesystem the nodes see)
    commit: str  # the submitted HEAD: later commits in the origin never change what a task sees
    remote_url: str  # the DVC remote (with the run-cache) every task shares
    out_dir: str  # this run's folder: outcome and usage files per cell
    workdir: str | None = None  # parent of the task's clone; None: the node's $TMPDIR
    env: dict | None = None  # set in the task's environment (the MLflow tracking URI the stages check)

    def __call__(self, cell: str) -> dict:
        out = Path(self.out_dir) / slug(cell)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        record = {"cell": cell, "attempt": attempt, "host": socket.gethostname(), "job": _job_id()}
        ws = Path(tempfile.mkdtemp(prefix=f"flap-{slug(cell)[:40]}-", dir=self.workdir))
        log: list[str] = []
        try:
            env = {**_env(ws), **(self.env or {})}
            steps = [["git", "clone", "-q", "--no-checkout", self.origin, str(ws)],
                     ["git", "-c", "advice.detachedHead=false", "checkout", "-q", self.commit],
                     [*_dvc(), "remote", "add", "--local", "-f", "-d", REMOTE, self.remote_url],
                     [*_dvc(), "fetch", "--run-cache"],
                     [*_dvc(), "repro", "--pull", cell],
                     [*_dvc(), "push", "--run-cache"]]
            for i, cmd in enumerate(steps):
                p = subprocess.run(cmd, cwd=ws if i else None, env=env, capture_output=True, text=True)
                text = p.stdout + p.stderr
                print(f"$ {' '.join(cmd)}\n{text}", flush=True)  # the task's log (submitit's .out file)
                log += text.splitlines()
                if p.returncode != 0:
                    record.update(status="failed", step=" ".join(cmd[:4]), tail=log[-TAIL_LINES:])
                    return _finish(out, record, t0)
            joined = "\n".join(log)
            usage = ws / "results" / "usage"
            if usage.is_dir():
                shutil.copytree(usage, out / "usage", dirs_exist_ok=True)
            record.update(status="ok", ran=RAN.findall(joined), restored=RESTORED.findall(joined))
            return _finish(out, record, t0)
        finally:
            shutil.rmtree(ws, ignore_errors=True)  # the clone this task made, nothing else

    def checkpoint(self, cell: str):
        """submitit's preemption/timeout hook: requeue this task with the same cell (it starts over)."""
        import submitit  # submitit: only inside a SLURM job
        return submitit.helpers.DelayedSubmission(self, cell)


def _job_id() -> str:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")


def _dvc() -> list[str]:
    return list(DVC)


def _env(ws: Path) -> dict[str, str]:
    """The submitting shell's environment (sbatch exports it), with the venv's `python` first on PATH (stages
    run `python stages/...`) and the clone's src/ first on PYTHONPATH (its code, not the origin's)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ws / "src"), env.get("PYTHONPATH", "")] if p)
    env.pop("DVC_ROOT", None)
    return env


def _finish(out: Path, record: dict, t0: float) -> dict:
    record["seconds"] = round(time.monotonic() - t0, 1)
    tmp = out / f".outcome.{os.getpid()}.json"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out / "outcome.json")  # atomic: the waiting command never reads half a record
    if record["status"] != "ok":
        raise RuntimeError(f"{record['cell']}: {record['step']} failed")  # the task's exit status says so too
    return record
