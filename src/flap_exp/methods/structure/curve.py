"""`curve`: metric obs only: the per-layer counts from the knapsack over the OBS pass's error curves
(allocation.py); it has no selection from scores."""
from __future__ import annotations

from ...catalogue import STRUCTURES
from ...errors import FlapError


@STRUCTURES.register("curve", rank=5, obs_allocation=True,
                    obs_only="allocates from the OBS pass's error curves")
def select(scores, arch, ratio, opts):
    raise FlapError("structure curve allocates from the OBS pass's error curves: use it with metric obs")
