"""SLURM through submitit: submit one job array, watch it with `squeue`, cancel it with `scancel`.

Why plain submitit and not hydra-submitit-launcher: the launcher submits a Hydra *multirun* (one job per
composed config, running a Hydra task function); our cells are DVC stages of one composed params.yaml, and
each task must run `dvc repro` in its own clone so DVC's run-cache, not a second description of the grid,
decides what is computed. submitit's `map_array` submits exactly that: one array, one task per cell.
Task states come from `squeue` (what slurmctld knows now), not from submitit's `sacct` watcher, which needs
SLURM's accounting database (absent on many small clusters and on the one-node test cluster).
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import FlapError
from .cluster_conf import ClusterConfig


def partitions() -> tuple[list[str], str | None]:
    """`sinfo`'s partitions and the default one (marked `*`)."""
    p = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        why = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise FlapError(f"sinfo failed, so SLURM cannot be asked about partitions: {why}")
    names = [n.strip() for n in p.stdout.split() if n.strip()]
    default = next((n[:-1] for n in names if n.endswith("*")), None)
    return [n.rstrip("*") for n in names], default


def check_scheduler(cfg: ClusterConfig) -> str:
    """sbatch on PATH and the partition known to `sinfo`; -> the partition the array will use."""
    if shutil.which("sbatch") is None:
        raise FlapError("cluster=slurm but there is no `sbatch` on PATH: run on a SLURM login node "
                        "(or cluster=local on this machine)")
    names, default = partitions()
    if cfg.partition is None:
        if default is None:
            raise FlapError(f"SLURM has no default partition: set cluster.partition (sinfo lists {', '.join(names)})")
        return default
    if cfg.partition not in names:
        raise FlapError(f"unknown SLURM partition {cfg.partition!r}; sinfo lists: {', '.join(names) or 'none'}")
    return cfg.partition


def task_indices(job: str) -> list[int]:
    """The array task indices of a squeue job id: `12_3` -> [3]; a pending group `12_[0-2,5%2]` -> [0, 1, 2, 5]."""
    if "_" not in job:
        return []
    spec = job.split("_", 1)[1].strip("[]").split("%")[0]
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out += range(int(lo), int(hi or lo) + 1)
    return out


@dataclass
class SlurmArray:
    """One submitted array: its id, the cell of each task index, and submitit's jobs (log paths)."""
    array_id: str
    cells: list[str]
    jobs: list = field(default_factory=list)

    def states(self) -> dict[int, tuple[str, str]] | None:
        """{task index: (PENDING|RUNNING|..., start time)} of the tasks still in the queue; None when squeue
        failed. A requeued task gets a new start time when it runs again (its PENDING spell can be too short
        to be seen between two polls)."""
        p = subprocess.run(["squeue", "-h", "-r", "-j", self.array_id, "-o", "%i|%T|%S"], capture_output=True,
                           text=True, timeout=60)
        if p.returncode != 0:
            if "Invalid job id" in p.stderr:  # the whole array left the queue (and slurmctld forgot it)
                return {}
            return None
        out = {}
        for line in p.stdout.split():
            job, state, start = (line.split("|") + ["", ""])[:3]
            # a one-cell array is a plain job (submitit), and a whole pending array may show with no index
            for i in task_indices(job) if job != self.array_id else range(len(self.cells)):
                out[i] = (state, start)
        return out

    def cancel(self) -> None:
        subprocess.run(["scancel", self.array_id], capture_output=True, timeout=60)

    def log_tail(self, index: int, lines: int = 30) -> str:
        """The end of a task's stderr and stdout (submitit's log files), e.g. when it died with no outcome."""
        paths = self.jobs[index].paths if index < len(self.jobs) else None
        text = []
        for f in (paths.stderr, paths.stdout) if paths else ():
            if Path(f).exists():
                text += Path(f).read_text(errors="replace").strip().splitlines()[-lines:]
        return "\n".join(text) or "(no log)"


def submit(cfg: ClusterConfig, partition: str, task, cells: list[str], folder: Path) -> SlurmArray:
    """One job array over `cells` (`task(cell)` each), `cfg.array_parallelism` tasks at a time."""
    import submitit  # submitit: only when submitting to SLURM (make run-cluster)
    ex = submitit.SlurmExecutor(folder=str(folder / "%j"))
    params: dict = dict(partition=partition, cpus_per_task=cfg.cpus_per_task, mem=f"{int(cfg.mem_gb * 1024)}M",
                        time=cfg.time_min, array_parallelism=cfg.array_parallelism, job_name="flap-cell",
                        additional_parameters={"requeue": True})  # node failure/preemption: back in the queue
    if cfg.gpus_per_task:
        params["gpus_per_task"] = cfg.gpus_per_task
    ex.update_parameters(**params)
    try:
        jobs = ex.map_array(task, cells)
    except Exception as err:  # sbatch refused (bad memory, time, gres): one line, nothing was queued
        raise FlapError(f"sbatch refused the array: {' '.join(str(err).split())[:300]}") from None
    return SlurmArray(array_id=str(jobs[0].job_id).split("_")[0], cells=list(cells), jobs=list(jobs))
