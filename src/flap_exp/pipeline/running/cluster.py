"""The study on a cluster: `python -m flap_exp.pipeline.running.cluster cluster=slurm [cluster.KEY=VALUE ...]`
(`make run-cluster CLUSTER=slurm`). Backends are the `conf/cluster/` group's names:

- `local`: this machine, the cells on DVC's experiment queue (flap_exp.pipeline.running.parallel).
- `slurm`: checked first (sbatch, partition via sinfo, DVC remote, MLflow store, a clean workspace), then
  (a) the stages upstream of two or more cells are reproduced once here and pushed with the run-cache;
  (b) one SLURM job array (submitit) over the cells that are not up to date, each task in its own clone
      (flap_exp.pipeline.running.cluster_task: `dvc fetch --run-cache`, `dvc repro --pull CELL`,
      `dvc push --run-cache`);
  (c) when the array ends, `dvc fetch --run-cache && dvc repro --pull` here: every cell is restored from
      the run-cache and the gathering stages (track -> MLflow, reports) run once, here only.
  A failed task's log tail is shown with its cell; the others finish and are restored here, so a rerun
  submits only the cells still missing. A requeued task (preemption) reruns alone. Ctrl-C cancels the array.
"""
from __future__ import annotations

import faulthandler
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from ...errors import FlapError
from ..artifacts.paths import USAGE_DIR
from ..reporting.mlflow_store import preflight
from . import cluster_checks as checks, slurm
from .cluster_conf import ClusterConfig, compose_cluster
from .cluster_task import CellTask, slug
from .fast_lock import DVC
from .parallel import ParallelConfig, _needed, plan, run_parallel

RAN = re.compile(r"Running stage '([^']+)'")
CACHED = re.compile(r"Stage '([^']+)' is cached - skipping run")
# a task gone from squeue whose outcome file is not there yet (a shared filesystem's lag) is waited for
OUTCOME_GRACE_S = 15


def _stream(root: str, env: dict, *args: str) -> tuple[list[str], list[str]]:
    """A dvc command with its output shown as it comes; -> (stages it ran, stages it restored from the run-cache)."""
    proc = subprocess.Popen([*DVC, *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ran, cached = [], []
    assert proc.stdout is not None  # stdout=PIPE
    for line in proc.stdout:
        print(line, end="", flush=True)
        ran += RAN.findall(line)
        cached += CACHED.findall(line)
    if proc.wait() != 0:
        raise FlapError(f"dvc {' '.join(args[:2])} failed (exit {proc.returncode}); see its output above")
    return ran, cached


def run_local(cfg: ClusterConfig) -> dict:
    if cfg.mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = preflight(cfg.mlflow_tracking_uri)  # the queue's workers inherit it
    return run_parallel(ParallelConfig(jobs=cfg.array_parallelism, root=cfg.root))


def _outcome(run_dir: Path, cell: str) -> dict | None:
    f = run_dir / "cells" / slug(cell) / "outcome.json"
    return json.loads(f.read_text()) if f.exists() else None


def _report(done: dict, cell: str, rec: dict, t0: float, total: int) -> None:
    where = f"{rec.get('host', '?')}, task {rec.get('job', '?')}" + (f", attempt {rec['attempt'] + 1}"
                                                                     if rec.get("attempt") else "")
    if rec.get("status") == "ok":
        print(f"cluster: [{len(done)}/{total}] {cell}: done at {time.monotonic() - t0:.0f} s ({where}; ran: "
              f"{', '.join(rec['ran']) or 'nothing'}; restored: {', '.join(rec['restored']) or 'nothing'})",
              flush=True)
    else:
        tail = "\n".join(rec.get("tail") or [])
        print(f"cluster: [{len(done)}/{total}] {cell}: FAILED at {time.monotonic() - t0:.0f} s ({where}; "
              f"{rec.get('step', 'the task died')}); its log ends:\n{tail}", file=sys.stderr, flush=True)


def wait(cfg: ClusterConfig, array, run_dir: Path) -> tuple[dict[str, dict], int]:
    """Poll squeue until every task has left the queue; -> ({cell: outcome record}, most tasks seen running
    at once). Prints each as it ends."""
    done: dict[str, dict] = {}
    peak = 0
    started: dict[int, str] = {}  # task index -> the start time squeue gave while it ran
    missing: dict[int, float] = {}
    squeue_failures = 0
    t0 = time.monotonic()
    while len(done) < len(array.cells):
        time.sleep(cfg.poll_s)
        states = array.states()
        if states is None:
            squeue_failures += 1
            if squeue_failures * cfg.poll_s > 600:  # slurmctld unreachable for 10 minutes: say so, keep the array
                raise FlapError(f"squeue has failed for 10 minutes; the array {array.array_id} may still run "
                                "(squeue/scancel it); rerun this command later to gather what finished")
            continue
        squeue_failures = 0
        peak = max(peak, sum(state == "RUNNING" for state, _ in states.values()))
        for i, cell in enumerate(array.cells):
            if cell in done:
                continue
            if i in states:
                state, start = states[i]
                requeued = i in started and (state in ("PENDING", "REQUEUED", "REQUEUE_HOLD") or
                                             (state == "RUNNING" and start != started[i]))
                if requeued:
                    print(f"cluster: {cell} (task {array.array_id}_{i}) was requeued (preempted or requeued); "
                          "it reruns alone", flush=True)
                    started.pop(i)
                if state == "RUNNING":
                    started[i] = start
                continue
            rec = _outcome(run_dir, cell)
            if rec is None:
                missing.setdefault(i, time.monotonic())
                if time.monotonic() - missing[i] < OUTCOME_GRACE_S:
                    continue
                rec = {"cell": cell, "status": "died", "step": "the task ended without an outcome "
                       "(killed, out of memory or time?)", "tail": array.log_tail(i).splitlines()}
            done[cell] = rec
            _report(done, cell, rec, t0, len(array.cells))
    return done, peak


def _copy_usage(root: str, run_dir: Path, cells: list[str]) -> None:
    """The usage side files of the stages the tasks computed, into results/usage/ here (track reads them)."""
    dest = Path(root) / USAGE_DIR
    for cell in cells:
        src = run_dir / "cells" / slug(cell) / "usage"
        for f in sorted(src.glob("*.json")) if src.is_dir() else []:
            dest.mkdir(parents=True, exist_ok=True)
            tmp = dest / f".{f.name}.{os.getpid()}"
            tmp.write_bytes(f.read_bytes())
            os.replace(tmp, dest / f.name)


def _stamp() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def run_slurm(cfg: ClusterConfig) -> dict:
    from dvc.repo import Repo  # dvc: heavy, only when running

    root = cfg.root
    if not (Path(root) / "dvc.yaml").is_file():
        raise FlapError(f"no dvc.yaml in {Path(root).resolve()}: run from the project root")
    # Every check before anything runs or is submitted.
    partition = slurm.check_scheduler(cfg)
    commit = checks.head(root)
    url = checks.remote_url(root, cfg.dvc_remote)
    uri = checks.tracking(cfg.mlflow_tracking_uri)
    p = plan(root)
    checks.check_clean(root, _needed(root, p.gather))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    t0 = time.monotonic()
    print(f"cluster: {len(p.cells)} cells; shared upstream: {', '.join(p.shared) or 'none'}; "
          f"gathering: {', '.join(p.gather) or 'none'}; remote {url}; MLflow {uri}", flush=True)

    # (a) the shared stages, once, here; pushed with the run-cache for the tasks to restore.
    shared_ran, shared_cached = _stream(root, env, "repro", *p.shared) if p.shared else ([], [])
    _stream(root, env, "push", "--run-cache")
    with Repo(root) as repo:
        changed = set(repo.status(targets=list(p.cells), with_deps=True))
    todo = [c for c in p.cells if changed & set(p.cells[c])]

    # (b) one job array over the cells that are not up to date.
    outcomes: dict[str, dict] = {}
    array_id, peak = None, 0
    if todo:
        # .dvc/tmp is DVC's own ignored folder, in the project (the nodes see it) and out of git status
        run_dir = Path(root).resolve() / ".dvc" / "tmp" / "cluster" / _stamp()
        task = CellTask(origin=str(Path(root).resolve()), commit=commit, remote_url=url,
                        out_dir=str(run_dir / "cells"), workdir=cfg.workdir, env={"MLFLOW_TRACKING_URI": uri})
        array = slurm.submit(cfg, partition, task, todo, run_dir / "submitit")
        array_id = array.array_id
        print(f"cluster: submitted {len(todo)} cell(s) as SLURM job array {array_id} on partition {partition} "
              f"({cfg.array_parallelism} at a time; logs in {run_dir}); {len(p.cells) - len(todo)} up to date",
              flush=True)
        try:
            outcomes, peak = wait(cfg, array, run_dir)
        except KeyboardInterrupt:
            array.cancel()
            print(f"cluster: interrupted: cancelled SLURM job array {array_id} (scancel {array_id}); cells that "
                  "finished are in the remote's run-cache and will not be computed again", file=sys.stderr,
                  flush=True)
            raise
        ok = [c for c in todo if outcomes[c].get("status") == "ok"]
        _copy_usage(root, run_dir, ok)
        failed = [c for c in todo if c not in ok]
        if failed:
            if ok:  # restore the finished cells here, so that a rerun submits only the failed ones
                _stream(root, env, "fetch", "--run-cache")
                _stream(root, env, "repro", "--pull", *ok)
            raise FlapError(f"{len(failed)} cell(s) failed: {', '.join(failed)} (logs above); the "
                            f"{len(ok)} that finished are restored here, and a rerun submits only the failed ones")

    # (c) every cell restored from the run-cache; the gathering stages run once, here.
    print(f"cluster: final dvc repro (cells restored from the run-cache; gathering stages run here) after "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    _stream(root, env, "fetch", "--run-cache")
    final_ran, final_cached = _stream(root, env, "repro", "--pull")
    recomputed = [s for s in final_ran if s not in p.gather]
    if recomputed:
        print(f"cluster: warning: recomputed here (run-cache miss): {', '.join(recomputed)}", file=sys.stderr,
              flush=True)
    task_ran = [s for r in outcomes.values() for s in r.get("ran", [])]
    task_restored = [s for r in outcomes.values() for s in r.get("restored", [])]
    summary = {"array": array_id, "tasks": len(todo), "peak_running": peak, "shared_ran": shared_ran,
               "task_ran": task_ran, "task_restored": task_restored, "final_ran": final_ran,
               "final_restored": final_cached, "seconds": round(time.monotonic() - t0, 1)}
    print(f"cluster: done in {summary['seconds']:.0f} s: {len(todo)} task(s) (array {array_id or 'none'}, at most "
          f"{peak} running at once); "
          f"computed {len(shared_ran)} shared stage(s) here, {len(task_ran)} in the tasks, {len(final_ran)} "
          f"gathering here; run-cache hits: {len(task_restored)} in the tasks, {len(final_cached)} here", flush=True)
    return summary


BACKENDS = {"local": run_local, "slurm": run_slurm}  # keys: the conf/cluster/ group's option names


def run_cluster(cfg: ClusterConfig) -> dict:
    if cfg.backend not in BACKENDS:
        raise FlapError(f"unknown cluster backend {cfg.backend!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[cfg.backend](cfg)


def main(argv: list[str] | None = None) -> int:
    from dvc.exceptions import DvcException  # dvc: heavy, only when running
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    # `kill -USR1 PID` prints every thread's stack to stderr: a run that seems stuck (a hung squeue, a Ctrl-C
    # that does not take) says where it is without stopping it
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        run_cluster(compose_cluster(args, conf_dir=Path("conf"), root="."))
    except FlapError as err:
        print(f"flap-exp: error: {err}", file=sys.stderr)
        return 2
    except DvcException as err:  # e.g. a malformed dvc.yaml while reading the plan: one line, no traceback
        print(f"flap-exp: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
