"""Byte sizes as a person writes them (`--memory-budget 768MiB`, conf's model.memory_budget); torch-free."""
from __future__ import annotations

import re

from .errors import FlapError

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_bytes(spec: str | int | None) -> int | None:
    """'768MiB', '2GB', '1.5g', '123456' -> bytes; None stays None (no budget)."""
    if spec is None or isinstance(spec, int):
        return spec
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(spec))
    if not m or m.group(2).lower() not in _UNITS:
        raise FlapError(f"cannot read memory budget {spec!r}; write e.g. 768MiB, 2GB or 1.5GiB")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise FlapError(f"memory budget must be positive, got {spec!r}")
    return n


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
