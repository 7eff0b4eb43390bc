"""The tiny study's project: a temporary git + DVC repository around the project's pipeline (dvc.yaml, conf/,
stages/, src/), a tiny model with a word-level tokenizer and a generated corpus; and running commands in it."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from flap_exp.pipeline.running.warm_client import install, stop_servers

from .models import save_model_dir

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DVC = str(VENV_BIN / "dvc")

TINY_STUDY = """# @package _global_
tables:
  main:
    title: Main
    blocks:
      flap: {metrics: [wifv], structures: [al_am], ratios: [0.5]}
      baselines: {metrics: [wanda_sp, weight_magnitude], structures: [ul_um], ratios: [0.5]}
  compensation:
    title: Compensation
    blocks:
      flap: {metrics: [wifv], structures: [al_am], ratios: [0.5], compensation: [none, bias, lsq]}
  calibration:
    title: Calibration
    blocks:
      n: {metrics: [wifv], structures: [al_am], ratios: [0.5], calibration: ["text:8", default]}
  zeroshot:
    title: Zero-shot
    measure: [zeroshot]
    blocks:
      flap: {metrics: [wifv], structures: [al_am], ratios: [0.5]}
  speed:
    title: Speed
    measure: [speed]
    blocks:
      flap: {metrics: [wifv], structures: [al_am], ratios: [0.5]}
"""
OVERRIDES = ["experiment=tiny", "model=local", "model.name=models/tiny", "data=text",
             "data.calib.path=data/corpus.txt", "data.eval.path=data/corpus.txt", "data.calib.nsamples=16",
             "data.calib.seqlen=32", "eval.seqlen=32", "eval.max_windows=8", "eval.zeroshot.tasks=[piqa,arc_easy]",
             "eval.zeroshot.limit=4", "eval.throughput.prefill_shapes=[[1,16]]",
             "eval.throughput.decode_batches=[1]", "eval.throughput.prompt_len=4", "eval.throughput.new_tokens=3"]
def env_for(repo: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(repo / "src"),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com", TOKENIZERS_PARALLELISM="false")
    warm = repo.parent / "warm"
    if (warm / "bin" / "python").exists():  # a repository made by tiny_repo(warm=True): stages start warm
        env.update(PATH=f"{warm / 'bin'}{os.pathsep}{env['PATH']}", FLAP_WARM_DIR=str(warm / "sock"))
    env.update(extra)
    return env


def sh(repo: Path, *cmd: str, check: bool = True, **env) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), cwd=repo, env=env_for(repo, **env), capture_output=True, text=True, timeout=1200)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def ran(p: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", p.stdout))


def corpus_text(words: int = 12000, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(150)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    return " ".join(rng.choices(vocab, weights, k=words)) + "\n"


def corpus_model(path: Path, text: str) -> None:
    """A tiny LLaMA whose word-level vocabulary is `text`'s words, with the identity prepare records."""
    save_model_dir(path, sorted(set(text.split())), identity=True)


def tiny_project(repo: Path, study: str) -> None:
    """The project's pipeline (dvc.yaml, conf/, stages/, src/) around a tiny model, a text corpus and `study`
    as conf/experiment/tiny.yaml (no git, no DVC yet); test_parallel.py builds its repository the same way."""
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", "conf", "stages"):  # .dvcignore: __pycache__ is not code
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    shutil.copytree(ROOT / "src" / "flap_exp", repo / "src" / "flap_exp",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "conf" / "experiment" / "tiny.yaml").write_text(study)
    text = corpus_text()
    (repo / "data").mkdir()
    (repo / "data" / "corpus.txt").write_text(text)
    corpus_model(repo / "models" / "tiny", text)
    (repo / ".gitignore").write_text("mlflow.db\nmlruns/\n__pycache__/\n")


def tiny_repo(tmp_path_factory, warm: bool = False) -> Path:
    """The tiny study's git + DVC repository with a local DVC remote and params.yaml composed (not reproduced);
    `warm`: its stages start warm as under `make run` (every command run by sh/env_for; stop_warm(repo.parent))."""
    base = tmp_path_factory.mktemp("pipeline")
    repo = base / "repo"
    tiny_project(repo, TINY_STUDY)
    if warm:
        warm_env(base, repo / "src")
    sh(repo, "git", "init", "-q")
    sh(repo, DVC, "init", "-q")
    sh(repo, DVC, "remote", "add", "-d", "local", str(base / "remote"))
    sh(repo, sys.executable, "-m", "flap_exp.pipeline.study.compose", *OVERRIDES)
    return repo


# A two-cell grid (FLAP and Wanda-sp: a per-layer and a sequential search) for test_parallel and test_cluster
STUDY = """# @package _global_
tables:
  main:
    title: Main
    blocks:
      flap: {metrics: [wifv], structures: [al_am], ratios: [0.5]}
      baselines: {metrics: [wanda_sp], structures: [ul_um], ratios: [0.5]}
"""
CELLS = ["wifv-al_am-0.5-text-16-bias", "wanda_sp-ul_um-0.5-text-16-none"]
GATHER = {"track", "report@main", "report_index"}

HOOK = """import os, sys
if len(sys.argv) > 0 and os.path.basename(os.path.dirname(sys.argv[0])) == "stages":
    with open(os.environ["FLAP_TEST_STAGE_LOG"], "a") as f:
        f.write(" ".join(sys.argv) + "\\n")
"""


def results(repo: Path) -> dict:
    """Every perplexity record and every selection.json."""
    def load(f: Path) -> dict:  # a local corpus is recorded by its absolute path: the copies' paths differ
        return json.loads(f.read_text().replace(str(repo), "<repo>"))
    out = {}
    for f in sorted((repo / "results" / "evaluate").rglob("ppl.json")):
        out[f.relative_to(repo).as_posix()] = load(f)
    for f in sorted((repo / "results" / "search").rglob("selection.json")):
        out[f.relative_to(repo).as_posix()] = load(f)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest(url: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def warm_env(folder: Path, src: Path = ROOT / "src") -> dict:
    """The environment of `make run`'s warm stages: `python` (warm_client.install, the Makefile's WARM_SHIM, with
    the client of `src`) first on PATH, its servers' sockets in `folder`/warm/sock. Pass to env_for/sh as extra
    variables; stop the servers with stop_warm(folder)."""
    shim = install(folder / "warm" / "bin", sys.executable,
                   src / "flap_exp" / "pipeline" / "running" / "warm_client.py")
    return {"PATH": f"{shim.parent}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLAP_WARM_DIR": str(folder / "warm" / "sock")}


def stop_warm(folder: Path) -> None:
    """End the warm servers started under warm_env(folder)."""
    stop_servers(folder / "warm" / "sock")
