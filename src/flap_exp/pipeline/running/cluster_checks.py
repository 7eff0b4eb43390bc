"""What `cluster=slurm` checks before submitting anything, each a one-line FlapError: the DVC remote the
tasks share, the MLflow tracking store, and a workspace whose changes the tasks would see (they clone HEAD).
"""
from __future__ import annotations

import os
import subprocess
import urllib.parse
from pathlib import Path

from ...errors import FlapError
from ..reporting.mlflow_store import preflight

# Files the tasks never read from git: DVC rewrites dvc.lock after every repro (the tasks restore through
# the run-cache, not through it), and its .gitignore files list outputs.
IGNORED_CHANGES = ("dvc.lock",)


def head(root: str) -> str:
    p = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True, text=True)
    if p.returncode != 0:
        raise FlapError("the cluster's tasks clone the project's HEAD, and this repository has no commit: "
                        "commit once (git add -A && git commit -m init), then rerun")
    return p.stdout.strip()


def dirty(root: str, needed: set[str]) -> list[str]:
    """Tracked files changed since HEAD (staged or not) and untracked files the pipeline reads (`needed`:
    dvc.yaml, its vars files and every stage's dependencies), which a clone of HEAD would not have."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "-z"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    found = []
    for entry in out.split("\0"):
        if len(entry) < 4:
            continue
        code, path = entry[:2], entry[3:]
        if path in IGNORED_CHANGES or path.endswith("/.gitignore") or path == ".gitignore":
            continue
        if code == "??":
            if path in needed or any(path.startswith(n.rstrip("/") + "/") for n in needed):
                found.append(path)
        else:
            found.append(path)
    return found


def check_clean(root: str, needed: set[str]) -> None:
    changed = dirty(root, needed)
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise FlapError(f"the workspace has changes the cluster's tasks would not see (they clone HEAD): {shown}; "
                        "commit them (git add ... && git commit) or stash them, then rerun")


def remote_url(root: str, wanted: str | None) -> str:
    """The URL of the DVC remote the tasks share: `wanted`, which must be the project's default remote
    (`dvc repro --pull` here pulls from the default one), or the default itself when `wanted` is None."""
    from dvc.repo import Repo  # dvc: heavy, only when running
    with Repo(root) as repo:
        conf = repo.config
        remotes = dict(conf.get("remote", {}))
        default = conf.get("core", {}).get("remote")
    if not remotes or (wanted is None and default is None):
        raise FlapError("cluster=slurm needs a DVC remote the tasks share (it carries the run-cache): "
                        "dvc remote add -d shared s3://bucket/flap (or ssh://..., a shared directory), then rerun")
    name = wanted or default
    if name not in remotes:
        raise FlapError(f"no DVC remote named {name!r} (dvc remote list: {', '.join(sorted(remotes))})")
    if name != default:
        raise FlapError(f"cluster.dvc_remote={name} is not the project's default DVC remote "
                        f"({default or 'none'}); make it the default: dvc remote default {name}")
    url = str(remotes[name]["url"])
    if not urllib.parse.urlsplit(url).scheme or len(urllib.parse.urlsplit(url).scheme) == 1:  # a local path
        path = Path(url) if os.path.isabs(url) else Path(root, ".dvc", url)
        if not path.resolve().parent.is_dir():
            raise FlapError(f"DVC remote {name} is a directory whose parent does not exist: {path}")
        url = str(path.resolve())
    return url


def tracking(uri: str | None) -> str:
    """The MLflow store the gathering stage logs to: required (setting or $MLFLOW_TRACKING_URI), reachable."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise FlapError("cluster=slurm needs an MLflow tracking server everyone reads: set "
                        "cluster.mlflow_tracking_uri=http://host:5000 (or MLFLOW_TRACKING_URI)")
    return preflight(uri)
