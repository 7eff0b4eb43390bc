"""The grid in parallel on DVC's experiment queue (flap_exp.pipeline.running.parallel) against the serial `dvc repro`.

Two copies of one committed tiny-model repository (the pipeline of test_pipeline.py): one runs
`dvc repro`, the other `python -m flap_exp.pipeline.running.parallel --jobs 2`. Every stage process is counted
independently of DVC's logs by a sitecustomize.py on PYTHONPATH that appends each `python stages/*.py`
command line to a file (celery workers and queued experiments inherit the environment).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from flap_exp.errors import FlapError
from flap_exp.pipeline.running.parallel import ParallelConfig, _check, split

from helpers.pipeline import (
    CELLS,
    DVC,
    GATHER,
    HOOK,
    OVERRIDES,
    ROOT,
    STUDY,
    env_for as _env,
    ran,
    results as _results,
    tiny_project,
)

pytestmark = pytest.mark.pipeline


def run(repo: Path, *cmd: str, check: bool = True, **extra) -> subprocess.CompletedProcess:
    env = _env(repo, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(repo.parent / "hook"), env["PYTHONPATH"]])
    env["FLAP_TEST_STAGE_LOG"] = str(repo.parent / "stages.log")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo.parent / 'mlflow.db'}"
    p = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A committed repository with the tiny model and params.yaml composed; nothing reproduced yet."""
    repo = tmp_path_factory.mktemp("parallel") / "repo"
    tiny_project(repo, STUDY)
    compose = [sys.executable, "-m", "flap_exp.pipeline.study.compose", *OVERRIDES]
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"], compose, ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "pipeline"]):
        subprocess.run(cmd, cwd=repo, env=_env(repo), check=True, capture_output=True)
    return repo


def _copy(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest / "repo")
    (dest / "hook").mkdir()
    (dest / "hook" / "sitecustomize.py").write_text(HOOK)
    return dest / "repo"


def _stage_runs(repo: Path) -> Counter:
    log = repo.parent / "stages.log"
    return Counter(log.read_text().splitlines() if log.exists() else [])


def _mlflow_runs(repo: Path) -> list:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{repo.parent / 'mlflow.db'}")
    exps = client.search_experiments(view_type=ViewType.ALL)
    return [r for e in exps for r in client.search_runs([e.experiment_id], run_view_type=ViewType.ALL)]


@pytest.mark.slow
def test_parallel_grid_equals_serial_each_cell_once(base: Path, tmp_path: Path):
    serial = _copy(base, tmp_path / "serial")
    run(serial, DVC, "repro")
    par = _copy(base, tmp_path / "parallel")
    run(par, DVC, "exp", "run", "-n", "mine", "prepare")  # the user's own experiment: must survive
    p = run(par, sys.executable, "-m", "flap_exp.pipeline.running.parallel", "--jobs", "2")

    # Same numbers and selections as the serial run.
    assert _results(par) == _results(serial)
    assert len([k for k in _results(par) if k.endswith("ppl.json")]) == len(CELLS) + 1  # + dense

    # Every stage process ran exactly once, and the same ones as in the serial run.
    runs, serial_runs = _stage_runs(par), _stage_runs(serial)
    assert runs == serial_runs and set(runs.values()) == {1}, runs
    assert sum(1 for line in runs if line.startswith("stages/evaluate.py")) == len(CELLS) + 1
    # The cells really went through the queue on two workers; the final repro only gathered.
    assert "on 2 worker(s)" in p.stdout
    assert p.stdout.count("parallel: queued ") == len(CELLS) + 1  # + dense
    final = p.stdout.split("parallel: final dvc repro")[1]
    assert set(ran(subprocess.CompletedProcess([], 0, final, ""))) == GATHER
    assert all(f"Stage 'evaluate@{c}' is cached - skipping run" in final for c in CELLS)

    # One MLflow run per cell (+ dense), none deleted or duplicated; the serial store holds the same cells.
    cells = Counter(r.data.tags["flap.cell"] for r in _mlflow_runs(par))
    assert cells == Counter(f"{c}@quick" for c in CELLS + ["dense"])
    assert Counter(r.data.tags["flap.cell"] for r in _mlflow_runs(serial)) == cells
    by_cell = {r.data.tags["flap.cell"]: r.data.metrics["perplexity"] for r in _mlflow_runs(par)}
    assert by_cell == {r.data.tags["flap.cell"]: r.data.metrics["perplexity"] for r in _mlflow_runs(serial)}

    # Only this run's experiments are gone: the queue is empty, the user's experiment is still there.
    refs = [r for r in run(par, "git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
            if not r.startswith("refs/exps/exec/")]  # DVC's own EXEC_* pointers (left by `exp run mine`)
    assert [r.rsplit("/", 1)[1] for r in refs] == ["mine"]
    assert "flap-par-" not in run(par, DVC, "queue", "status").stdout
    assert (par / "reports" / "main.csv").read_bytes() == (serial / "reports" / "main.csv").read_bytes()

    # Nothing to do the second time: nothing queued, nothing run.
    p = run(par, sys.executable, "-m", "flap_exp.pipeline.running.parallel", "--jobs", "2")
    assert "parallel: queued" not in p.stdout and ran(p) == set() and _stage_runs(par) == runs


def test_split_shares_upstream_and_gathers_directories():
    """Pure plan on a hand-made graph: shared upstream, per-cell chains, directory-gathering stages."""
    up = {"prep": set(), "cal": {"prep"}, "score": {"cal", "prep"}, "sel": {"score", "cal", "prep"},
          "comp@a": {"sel", "score", "cal", "prep"}, "comp@b": {"sel", "score", "cal", "prep"},
          "ev@a": {"comp@a", "sel", "score", "cal", "prep"}, "ev@b": {"comp@b", "sel", "score", "cal", "prep"},
          "dense": {"prep"}, "track": {"ev@a", "ev@b", "dense", "prep", "cal", "score", "sel", "comp@a", "comp@b"},
          "report": {"track", "ev@a", "ev@b", "dense", "prep", "cal", "score", "sel", "comp@a", "comp@b"}}
    outs = {"prep": ["r/prep.json"], "cal": ["r/cal/stats"], "score": ["r/score"], "sel": ["r/sel/x.json"],
            "comp@a": ["r/comp/a"], "comp@b": ["r/comp/b"], "ev@a": ["r/ev/a/m.json"], "ev@b": ["r/ev/b/m.json"],
            "dense": ["r/ev/dense/m.json"], "track": ["r/mlflow.json"], "report": ["rep/a.md"]}
    deps = {s: [] for s in up}
    deps.update(track=["r/ev", "src/x.py"], report=["r/mlflow.json"], score=["r/cal/stats", "src/lib"])
    p = split(up, deps, outs)
    assert set(p.gather) == {"track", "report"}  # report gathers through track
    assert set(p.shared) == {"prep", "cal", "score", "sel"}
    assert p.cells == {"ev@a": ("comp@a", "ev@a"), "ev@b": ("comp@b", "ev@b"), "dense": ("dense",)}


def test_refusals_before_any_work(tmp_path: Path):
    repo = tmp_path / "r"
    repo.mkdir()
    with pytest.raises(FlapError, match="no dvc.yaml"):
        _check(ParallelConfig(root=str(repo)))
    (repo / "dvc.yaml").write_text("stages: {}\n")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(FlapError, match="jobs must be a positive integer"):
            _check(ParallelConfig(jobs=bad, root=str(repo)))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    with pytest.raises(FlapError, match="has none: commit once"):
        _check(ParallelConfig(root=str(repo)))
    p = subprocess.run([sys.executable, "-m", "flap_exp.pipeline.running.parallel", "--jobs", "0"], cwd=repo,
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == "parallel: error: jobs must be a positive integer, got 0"


def test_refuses_a_queue_holding_the_users_experiments(tmp_path: Path):
    """`dvc queue start` would run them too: refused, and they are left in the queue."""
    repo = tmp_path / "r"
    repo.mkdir()
    (repo / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hi > out.txt\n    outs: [out.txt]\n")
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "x"],
                [DVC, "exp", "run", "--queue", "-n", "theirs"]):
        subprocess.run(cmd, cwd=repo, env=_env(repo), check=True, capture_output=True)
    with pytest.raises(FlapError, match=r"already holds 1 queued or running experiment\(s\) \(theirs\)"):
        _check(ParallelConfig(root=str(repo)))
    assert "theirs" in subprocess.run([DVC, "queue", "status"], cwd=repo, env=_env(repo), capture_output=True,
                                      text=True, check=True).stdout
    subprocess.run([DVC, "queue", "remove", "theirs"], cwd=repo, env=_env(repo), check=True, capture_output=True)
    _check(ParallelConfig(root=str(repo)))


CELL_PY = """import os, sys, yaml
item = sys.argv[1]
with open(os.environ["FLAP_TEST_CELL_LOG"], "a") as f:
    f.write(item + "\\n")
if yaml.safe_load(open("params.yaml"))["fail"][item]:
    sys.exit(f"cell {item} refuses to run")
os.makedirs("out", exist_ok=True)
open(f"out/{item}.txt", "w").write(open("shared.txt").read() + item)
"""
TOY_DVC = """stages:
  base:
    cmd: python -c "open('shared.txt', 'w').write('s')"
    outs: [shared.txt]
  cell:
    foreach: [a, b, c]
    do:
      cmd: python cell.py ${item}
      deps: [shared.txt, cell.py]
      params:
        - fail.${item}
      outs:
        - out/${item}.txt
  gather:
    cmd: python -c "import glob; open('all.txt', 'w').write(','.join(sorted(glob.glob('*.txt', root_dir='out'))))"
    deps: [out]
    outs: [all.txt]
"""


@pytest.mark.slow  # seconds of work, but the queue's workers and temporary copies take a minute or two here
def test_failed_cell_is_reported_and_the_others_are_kept(tmp_path: Path):
    """A toy pipeline: cell b fails -> exit 2 with its log, nothing left queued; fixed -> only b runs."""
    repo = tmp_path / "r"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(TOY_DVC)
    (repo / "cell.py").write_text(CELL_PY)
    (repo / "params.yaml").write_text("fail: {a: false, b: false, c: false}\n")
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "x"]):
        subprocess.run(cmd, cwd=repo, env=_env(repo), check=True, capture_output=True)
    (repo / "params.yaml").write_text("fail: {a: false, b: true, c: false}\n")  # uncommitted: the queue sees it
    log = tmp_path / "cells.log"
    env = {**_env(repo), "FLAP_TEST_CELL_LOG": str(log), "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "flap_exp.pipeline.running.parallel", "--jobs", "2"]
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.strip().splitlines()[-1] == ("parallel: error: 1 cell(s) failed: cell@b (logs above; finished "
                                                 "cells are in the run-cache and will not rerun)")
    assert "cell b refuses to run" in p.stderr and "Traceback" not in p.stderr.splitlines()[-1]
    assert sorted(log.read_text().split()) == ["a", "b", "c"]
    assert not (repo / "all.txt").exists()  # the final repro never started
    refs = subprocess.run(["git", "for-each-ref", "refs/exps"], cwd=repo, capture_output=True, text=True).stdout
    assert "flap-par-" not in refs
    assert "flap-par-" not in subprocess.run([DVC, "queue", "status"], cwd=repo, env=env, capture_output=True,
                                             text=True).stdout
    plan = json.loads(subprocess.run([*cmd[:3], "--plan"], cwd=repo, env=env, capture_output=True, text=True,
                                     check=True).stdout)
    assert plan == {"shared": ["base"], "cells": {c: [c] for c in ("cell@a", "cell@b", "cell@c")}, "gather": ["gather"]}

    (repo / "params.yaml").write_text("fail: {a: false, b: false, c: false}\n")  # fixed: only b reruns
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (repo / "all.txt").read_text() == "a.txt,b.txt,c.txt"
    assert (repo / "out" / "b.txt").read_text() == "sb"
    assert sorted(log.read_text().split()) == ["a", "b", "b", "c"]  # a and c restored from the run-cache
    assert "parallel: queued cell@b" in p.stdout and "parallel: queued cell@a" in p.stdout  # queued, not rerun
