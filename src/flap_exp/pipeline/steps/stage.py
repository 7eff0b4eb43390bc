"""What every stage script shares: params.yaml, one-line errors, wall time and peak memory, versions."""
from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import resource
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import yaml

from ...errors import FlapError
from ...tempfiles import signals_as_exit
from ..artifacts.io import write_json
from ..artifacts.paths import CELLS, usage as usage_path
from ..study.cells import load_cells
from ..study.params_check import check_params
from ..study.settings import StudySettings

PACKAGES = ("flap-exp", "torch", "transformers", "tokenizers", "safetensors", "numpy", "dvc", "mlflow",
            "hydra-core", "lm-eval")


def load_params(path: str | Path = "params.yaml") -> dict:
    p = Path(path)
    if not p.exists():
        raise FlapError(f"{p} not found: compose it first "
                        "(`make compose`, or python -m flap_exp.pipeline.study.compose)")
    params = yaml.safe_load(p.read_text(encoding="utf-8"))
    if not isinstance(params, dict):
        raise FlapError(f"{p} is not a mapping of parameters: compose it again")
    check_params(params)  # also covers `dvc exp run -S` (DVC composes) and hand edits
    # cells.yaml (the stages DVC runs) must come from these params: a hand edit of params.yaml's tables
    # without recomposing is refused by every stage, not only by the summary
    load_cells(params, str(p.with_name(CELLS)))
    return params


def load_settings(path: str | Path = "params.yaml") -> StudySettings:
    """load_params() as typed frozen settings, validated once (study/settings.py)."""
    return StudySettings.of(load_params(path))


def versions() -> dict:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _process_age() -> float | None:
    """Seconds since this process started (Linux /proc), or None: what the interpreter and the stage's imports
    took before its own clock started."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(uptime - ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return None


class Usage:
    """Wall time and CPU time (all threads) since creation and the process's peak resident memory (MiB). The CPU
    time lets a bench on a shared machine separate a stage's own work from DVC's, whatever the load; the CPU time
    and wall time spent before creation (interpreter start and imports) separate the imports from DVC's share."""

    def __init__(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.startup_s, self.startup_cpu_s = _process_age(), round(self.c0, 3)

    def to_dict(self) -> dict:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return {"seconds": round(time.perf_counter() - self.t0, 3),
                "cpu_seconds": round(time.process_time() - self.c0, 3), "peak_rss_mib": round(peak, 1),
                "startup_seconds": self.startup_s, "startup_cpu_seconds": self.startup_cpu_s}


def write_usage(name: str, usage: Usage) -> None:
    """Wall time / peak memory of one stage run: a side file, not a DVC output (it differs on every run,
    and would dirty dvc.lock); track reads it for the MLflow runs' real durations when it is there."""
    write_json(usage_path(name), {**usage.to_dict(), "finished": round(time.time(), 3)})


@contextlib.contextmanager
def stage(name: str, usage_name: str | None = None) -> Iterator[Usage]:
    """Run a stage body: FlapError becomes one line on stderr and exit status 2; a body that finishes writes its
    usage side file (results/usage/USAGE_NAME.json, USAGE_NAME defaulting to NAME)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    usage = Usage()
    try:
        with signals_as_exit():  # SIGTERM/SIGINT (dvc's Ctrl-C) unwind through the temporaries' cleanups
            yield usage
    except FlapError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    write_usage(usage_name or name, usage)
    if Path(sys.argv[0]).parent.name == "stages":  # a stage script (python stages/X.py), not a caller in-process
        _exit_without_teardown()


def _exit_without_teardown() -> None:
    """End a finished stage's process without the interpreter's teardown of its modules: ~0.4 s after torch's
    import, ~1 s after transformers' (measured here), paid once per stage. Its outputs are written and closed
    by then; the atexit handlers (logging, MLflow, temporaries) still run, and the buffered output is flushed."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cell_args(*options: str, optional: tuple[str, ...] = ()):
    """The command line of a search cell, `KEY METRIC STRUCTURE RATIO [--OPTION VALUE ...]`: (key,
    {metric, structure, ratio}, the options' namespace; an `optional` one absent is None)."""
    ap = argparse.ArgumentParser()
    for name in ("key", "metric", "structure"):
        ap.add_argument(name)
    ap.add_argument("ratio", type=float)
    for o in options:
        ap.add_argument(f"--{o}", required=True)
    for o in optional:
        ap.add_argument(f"--{o}", default=None)
    a = ap.parse_args()
    return a.key, {"metric": a.metric, "structure": a.structure, "ratio": a.ratio}, a
