"""Run the grid's cells in parallel on DVC's experiment queue (DVC schedules; this only queues and waits).

1. The stages upstream of two or more cells (prepare, calibrate, shared scores and selections) are
   reproduced once, serially, in the workspace (`dvc repro <shared>`).
2. One `dvc exp run --queue <cell>` per cell whose outputs are not up to date. A cell is a stage no
   other per-cell stage depends on (every `evaluate@...`, `evaluate_dense`, ...); its experiment
   reproduces the cell with the stages only it needs. The shared stages are restored there from DVC's
   run-cache, never recomputed.
3. `dvc queue start --jobs N`, then poll `dvc queue status` until every queued cell is done.
4. A plain `dvc repro` in the workspace: every cell is restored from the shared run-cache (the queued
   experiments wrote it) and the gathering stages (track -> MLflow, report) run once, here only, so no
   MLflow run is duplicated.
5. The experiments this run queued are removed (`dvc exp remove <names>`); other experiments are untouched.

The stages come from DVC's own index (`dvc.repo.Repo(...).index.graph`), never from params.yaml, so the
layout of the cell tables does not matter. A "gathering" stage reads a directory other stages write
into (track reads results/evaluate/); it and everything downstream of it run in step 4 only.
`python -m flap_exp.pipeline.running.parallel --jobs 2` (or `make run-parallel JOBS=2`); `--plan` prints the plan
as JSON and runs nothing (e.g. to submit the cells as cluster jobs).
"""
from __future__ import annotations

import argparse
import json
import re
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import yaml

from ...errors import FlapError
from .fast_lock import DVC

RAN = re.compile(r"Running stage '([^']+)'")
PENDING = ("Queued", "Running")


@dataclass(frozen=True)
class ParallelConfig:
    jobs: int = 2
    root: str = "."
    poll_seconds: float = 2.0  # `dvc queue status` costs ~1 s (it asks the workers); 2 s keeps it light
    worker_grace_seconds: float = 60.0  # workers take a few seconds to register after `dvc queue start`
    keep: bool = False  # keep the queued experiments (`dvc exp show`) instead of removing them


@dataclass(frozen=True)
class Plan:
    shared: tuple[str, ...]  # upstream of two or more cells: reproduced once in the workspace
    cells: dict  # cell stage -> the stages only it needs (itself included), reproduced in its experiment
    gather: tuple[str, ...]  # read other stages' output directories (track, report): the final repro only


def _inside(path: str, folder: str) -> bool:
    return PurePosixPath(path) != PurePosixPath(folder) and PurePosixPath(folder) in PurePosixPath(path).parents


def split(upstream: dict[str, set[str]], deps: dict[str, list[str]], outs: dict[str, list[str]]) -> Plan:
    """Pure: stage -> its transitive upstream stages, dependency paths and output paths -> the plan."""
    writers: dict[str, set[str]] = {}  # folder -> the stages with an output strictly inside it
    for s, paths in outs.items():
        for o in paths:
            for folder in PurePosixPath(o).parents:
                writers.setdefault(folder.as_posix(), set()).add(s)
    gather = {s for s, ds in deps.items() if any(writers.get(PurePosixPath(d).as_posix(), set()) - {s} for d in ds)}
    gather |= {s for s, up in upstream.items() if up & gather}
    per_cell = [s for s in upstream if s not in gather]
    cells = [s for s in per_cell if not any(s in upstream[t] for t in per_cell)]
    users = {s: [c for c in cells if s in upstream[c]] for s in per_cell}
    shared = tuple(s for s in per_cell if len(users[s]) > 1)
    own = {c: tuple(s for s in per_cell if users[s] == [c]) + (c,) for c in cells}
    return Plan(shared=shared, cells=own, gather=tuple(s for s in upstream if s in gather))


def plan(root: str | Path = ".") -> Plan:
    """The plan of the DVC pipeline in `root`, from DVC's index (edges point from a stage to its upstream)."""
    # networkx, dvc: heavy, only when planning a run (the tests import this module for its config checks)
    import networkx as nx
    from dvc.repo import Repo
    with Repo(str(root)) as repo:
        graph = repo.index.graph
        base = Path(repo.root_dir).resolve()

        def rel(path: str) -> str:
            return Path(path).resolve().relative_to(base).as_posix()

        order = list(reversed(list(nx.topological_sort(graph))))  # upstream first
        name = {s: s.addressing for s in order}
        upstream = {name[s]: {name[u] for u in nx.descendants(graph, s)} for s in order}
        deps = {name[s]: [rel(d.fs_path) for d in s.deps if d.is_in_repo] for s in order}
        outs = {name[s]: [rel(o.fs_path) for o in s.outs] for s in order}
    return split(upstream, deps, outs)


def _dvc(root: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    if check and p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FlapError(f"dvc {' '.join(args[:3])} failed: {tail[0]}")
    return p


def _start_workers(root: str, jobs: int) -> None:
    """`dvc queue start`: output to a file, not a pipe, since the detached workers inherit it and a pipe
    would keep this call waiting until they exit (i.e. until the whole queue is done)."""
    with tempfile.TemporaryFile(mode="w+") as out:
        rc = subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "--jobs", str(jobs)], cwd=root,
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        out.seek(0)
        text = out.read().strip().splitlines()
    if rc != 0:
        raise FlapError(f"dvc queue start failed: {(text or ['no output'])[-1]}")


def _stream(root: str, *args: str) -> list[str]:
    """Run a dvc command with its output shown as it comes; return the stages it ran."""
    proc = subprocess.Popen([*DVC, *args], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ran = []
    assert proc.stdout is not None  # stdout=PIPE
    for line in proc.stdout:
        print(line, end="", flush=True)
        ran += RAN.findall(line)
    if proc.wait() != 0:
        raise FlapError(f"dvc {' '.join(args[:2])} failed (exit {proc.returncode}); see its output above")
    return ran


def queue_status(root: str) -> tuple[dict[str, str], int]:
    """`dvc queue status` -> ({experiment name: Queued|Running|Success|Failed}, live workers)."""
    out = _dvc(root, "queue", "status").stdout
    tasks, workers = {}, 0
    for line in out.splitlines():
        m = re.match(r"Worker status: (\d+) active, (\d+) idle", line)
        if m:
            workers = int(m.group(1)) + int(m.group(2))
        elif line.strip() and not line.startswith(("Task ", "No experiment")):
            cols = line.split()
            if len(cols) >= 3:
                tasks[cols[1]] = cols[-1]  # Task, Name, Created (two words), Status
    return tasks, workers


def _check(cfg: ParallelConfig) -> None:
    if not isinstance(cfg.jobs, int) or isinstance(cfg.jobs, bool) or cfg.jobs < 1:
        raise FlapError(f"jobs must be a positive integer, got {cfg.jobs!r}")
    if cfg.poll_seconds <= 0:
        raise FlapError(f"poll_seconds must be > 0, got {cfg.poll_seconds!r}")
    if not (Path(cfg.root) / "dvc.yaml").is_file():
        raise FlapError(f"no dvc.yaml in {Path(cfg.root).resolve()}: run from the project root")
    head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=cfg.root, capture_output=True)
    if head.returncode != 0:
        raise FlapError("DVC's experiment queue runs each cell from a git commit, and this repository has none: "
                        "commit once (git add -A && git commit -m init), then rerun")
    busy = {n: s for n, s in queue_status(cfg.root)[0].items() if s in PENDING}
    if busy:
        raise FlapError(f"DVC's experiment queue already holds {len(busy)} queued or running experiment(s) "
                        f"({', '.join(sorted(busy))}); `dvc queue start` would run them too: let them finish "
                        "or `dvc queue remove` them first")


def _copy_paths(root: str, needed: set[str]) -> list[str]:
    """Untracked (not ignored) files a queued experiment needs: git would leave them out of its snapshot."""
    out = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--full-name"], cwd=root,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return [f for f in out if f in needed or any(_inside(f, n) for n in needed)]


def _needed(root: str, skip: tuple[str, ...]) -> set[str]:
    """dvc.yaml, dvc.lock, the files its `vars` name and the dependencies (params files included) of every
    stage but those in `skip` (the gathering stages, which never run in a queued experiment)."""
    from dvc.repo import Repo  # dvc: heavy, only when running
    needed = {"dvc.yaml", "dvc.lock"}
    doc = yaml.safe_load((Path(root) / "dvc.yaml").read_text(encoding="utf-8")) or {}
    needed |= {v.split(":")[0] for v in doc.get("vars") or [] if isinstance(v, str)}
    with Repo(root) as repo:
        base = Path(repo.root_dir).resolve()
        for stage in repo.index.stages:
            if stage.addressing in skip:
                continue
            needed |= {Path(d.fs_path).resolve().relative_to(base).as_posix() for d in stage.deps if d.is_in_repo}
    return needed


def _log_tail(root: str, name: str, lines: int = 30) -> str:
    p = _dvc(root, "queue", "logs", name, check=False)
    return "\n".join((p.stdout + p.stderr).strip().splitlines()[-lines:])


def _wait(cfg: ParallelConfig, queued: dict[str, str]) -> dict[str, str]:
    """Poll `dvc queue status`, printing a line as each cell finishes; -> {name: final status}."""
    done: dict[str, str] = {}
    t0, no_worker_since = time.monotonic(), None
    while len(done) < len(queued):
        time.sleep(cfg.poll_seconds)
        tasks, workers = queue_status(cfg.root)
        for name, cell in queued.items():
            status = tasks.get(name, "Missing")
            if name not in done and status not in PENDING:
                done[name] = status
                ran = RAN.findall(_dvc(cfg.root, "queue", "logs", name, check=False).stdout)
                print(f"parallel: [{len(done)}/{len(queued)}] {cell}: {status} at {time.monotonic() - t0:.0f} s"
                      f" (ran: {', '.join(ran) or 'nothing, all restored from the run-cache'})", flush=True)
        if len(done) < len(queued) and workers == 0:
            no_worker_since = no_worker_since or time.monotonic()
            if time.monotonic() - no_worker_since > cfg.worker_grace_seconds:
                raise FlapError(f"DVC's queue workers are gone with {len(queued) - len(done)} cell(s) unfinished; "
                                "see .dvc/tmp/exps/celery/*.out")
        else:
            no_worker_since = None
    return done


def _cleanup(cfg: ParallelConfig, names: list[str]) -> None:
    """Remove only the experiments this run queued (running ones are killed first)."""
    if cfg.keep or not names:
        return
    try:
        tasks, _ = queue_status(cfg.root)
    except FlapError:  # never hide the error that brought us here; still try to remove them
        tasks = {}
    running = [n for n in names if tasks.get(n) == "Running"]
    if running:
        _dvc(cfg.root, "queue", "kill", *running, check=False)
    if _dvc(cfg.root, "exp", "remove", *names, check=False).returncode != 0:
        if _dvc(cfg.root, "queue", "remove", *names, check=False).returncode != 0:
            print(f"parallel: warning: could not remove experiments {', '.join(names)} (dvc exp remove them)",
                  file=sys.stderr, flush=True)


def run_parallel(cfg: ParallelConfig) -> dict[str, list[str]]:
    """The whole run (steps 1-5 above); -> {'shared': stages run serially, 'final': stages the final repro ran}."""
    _check(cfg)
    t0 = time.monotonic()
    p = plan(cfg.root)
    print(f"parallel: {len(p.cells)} cells; shared upstream: {', '.join(p.shared) or 'none'}; "
          f"final: {', '.join(p.gather) or 'none'}", flush=True)
    shared_ran = _stream(cfg.root, "repro", *p.shared) if p.shared else []
    from dvc.repo import Repo  # dvc: heavy, only when running
    with Repo(cfg.root) as repo:
        changed = set(repo.status(targets=list(p.cells), with_deps=True))
    todo = [c for c in p.cells if changed & set(p.cells[c])]
    copies = _copy_paths(cfg.root, _needed(cfg.root, p.gather))
    token = secrets.token_hex(3)  # experiment names unique to this run: only these are removed afterwards
    queued: dict[str, str] = {}
    try:
        for i, cell in enumerate(todo):
            name = f"flap-par-{token}-{i}"
            _dvc(cfg.root, "exp", "run", "--queue", "-n", name, *[a for c in copies for a in ("-C", c)], cell)
            queued[name] = cell
            print(f"parallel: queued {cell} as experiment {name}", flush=True)
        if queued:
            _start_workers(cfg.root, cfg.jobs)
            print(f"parallel: {len(queued)} cell(s) on {cfg.jobs} worker(s) (times from now); "
                  f"{len(p.cells) - len(queued)} already up to date", flush=True)
            done = _wait(cfg, queued)
            failed = [n for n, s in done.items() if s != "Success"]
            for name in failed:
                print(f"parallel: {queued[name]} ({name}) {done[name]}; its log ends:\n{_log_tail(cfg.root, name)}",
                      file=sys.stderr, flush=True)
            if failed:
                raise FlapError(f"{len(failed)} cell(s) failed: {', '.join(queued[n] for n in failed)} "
                                "(logs above; finished cells are in the run-cache and will not rerun)")
    finally:
        _cleanup(cfg, list(queued))
    print(f"parallel: final dvc repro (cells restored from the run-cache; gathering stages run here) after "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    final = _stream(cfg.root, "repro")
    recomputed = [s for s in final if s not in p.gather]
    if recomputed:
        print(f"parallel: warning: recomputed in the workspace (run-cache miss): {', '.join(recomputed)}",
              file=sys.stderr, flush=True)
    print(f"parallel: done in {time.monotonic() - t0:.0f} s", flush=True)
    return {"shared": shared_ran, "queued": [queued[n] for n in queued], "final": final}


def main(argv: list[str] | None = None) -> int:
    from dvc.exceptions import DvcException  # dvc: heavy, only when running
    ap = argparse.ArgumentParser(prog="python -m flap_exp.pipeline.running.parallel",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=ParallelConfig.jobs, help="queue workers (default 2)")
    ap.add_argument("--keep", action="store_true", help="keep the queued experiments (dvc exp show)")
    ap.add_argument("--plan", action="store_true",
                    help="print the plan as JSON (shared stages, cells, gathering stages) and run nothing")
    a = ap.parse_args(argv)
    try:
        if a.plan:
            if not Path("dvc.yaml").is_file():
                raise FlapError(f"no dvc.yaml in {Path.cwd()}: run from the project root")
            print(json.dumps(asdict(plan(".")), indent=1))
            return 0
        run_parallel(ParallelConfig(jobs=a.jobs, keep=a.keep))
    except FlapError as err:
        print(f"parallel: error: {err}", file=sys.stderr)
        return 2
    except DvcException as err:  # e.g. a malformed dvc.yaml while reading the plan: one line, no traceback
        print(f"parallel: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
