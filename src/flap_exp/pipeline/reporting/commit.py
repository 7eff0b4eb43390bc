"""The commit a study's results come from, for reports/README.md and each MLflow run.

`make run` records git's HEAD when it starts in FLAP_EXP_RUN_COMMIT, so commits made while a long study runs are
not named for it; a plain `dvc repro` has no such record, and gets HEAD when the asking stage runs.
"""
from __future__ import annotations

import os
import subprocess

#: Set by `make run` to the commit it started from (Makefile).
RUN_COMMIT = "FLAP_EXP_RUN_COMMIT"


def run_commit() -> tuple[str | None, bool]:
    """(the full commit hash or None outside a git checkout, whether it is the one the run started from)."""
    started = os.environ.get(RUN_COMMIT, "").strip()
    if started:
        return started, True
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None, False
    return (out.stdout.strip() or None if out.returncode == 0 else None), False
