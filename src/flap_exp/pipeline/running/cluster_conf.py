"""The `conf/cluster/` group (`local`, `slurm`) composed on its own into a typed `ClusterConfig`.

Where the cells run is not a study parameter (it changes no result), so the group is not in conf/config.yaml
and never reaches params.yaml: `python -m flap_exp.pipeline.running.cluster cluster=slurm cluster.partition=gpu`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from ...errors import FlapError
from ..study.compose import _one_line


@dataclass(frozen=True)
class ClusterConfig:
    backend: str = "local"
    array_parallelism: int = 2
    dvc_remote: str | None = None
    mlflow_tracking_uri: str | None = None
    partition: str | None = None
    gpus_per_task: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 8
    time_min: int = 120
    workdir: str | None = None
    poll_s: float = 10
    root: str = "."  # the project (not a conf key: where the command runs)


def _positive(name: str, value, minimum: float = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise FlapError(f"cluster.{name} must be a number >= {minimum:g}, got {value!r}")


def check(cfg: ClusterConfig) -> ClusterConfig:
    for name in ("array_parallelism", "cpus_per_task", "time_min"):
        _positive(name, getattr(cfg, name))
        if not isinstance(getattr(cfg, name), int):
            raise FlapError(f"cluster.{name} must be an integer, got {getattr(cfg, name)!r}")
    _positive("gpus_per_task", cfg.gpus_per_task, 0)
    _positive("mem_gb", cfg.mem_gb, 0.1)
    _positive("poll_s", cfg.poll_s, 0.1)
    return cfg


def _group_override(arg: str) -> str:
    """`cluster=slurm` selects the group (it has no default in a primary config, so Hydra wants `+cluster=`)."""
    return "+" + arg if arg.startswith("cluster=") else arg


def compose_cluster(overrides: list[str], conf_dir: str | Path = "conf", root: str = ".") -> ClusterConfig:
    """`cluster=NAME` (default local) and `cluster.KEY=VALUE` overrides -> a checked ClusterConfig."""
    # hydra, omegaconf: slow to import, only when the cluster config is composed
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = Path(conf_dir).resolve()
    if not (conf / "cluster").is_dir():
        raise FlapError(f"no cluster group in {conf} (conf/cluster/local.yaml, slurm.yaml)")
    bad = [o for o in overrides if not o.lstrip("+").startswith("cluster")]
    if bad:
        raise FlapError(f"only cluster=NAME and cluster.KEY=VALUE here, got {bad[0]!r} "
                        "(study options go to compose: make run-cluster OVERRIDES=...)")
    args = [_group_override(o) for o in overrides]
    if not any(a.lstrip("+").startswith("cluster=") for a in args):
        args.insert(0, "+cluster=local")
    try:
        with initialize_config_dir(str(conf), version_base=None):
            cfg = hydra_compose(overrides=args)
        values = OmegaConf.to_container(cfg.cluster, resolve=True)
    except Exception as err:  # Hydra/OmegaConf: unknown group option or key, one line
        raise FlapError(_one_line(err)) from None
    assert isinstance(values, dict)
    known = {f.name for f in fields(ClusterConfig)} - {"root"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FlapError(f"unknown key(s) in conf/cluster: {', '.join(map(str, unknown))}")
    return check(ClusterConfig(**{str(k): v for k, v in values.items()}, root=root))
