"""`ul_log`: UL-UM with SlimGPT's log-increasing per-layer ratios (allocation.log_ratios), mean = the ratio
(SlimGPT, NeurIPS 2024)."""
from __future__ import annotations

from ...catalogue import STRUCTURES


@STRUCTURES.register("ul_log", rank=4, obs_allocation=True)
def select(scores, arch, ratio, opts):
    from ...allocation import log_ratios  # deferred on purpose: torch (compose lists structures)
    from ...selection import Selection
    from ...structures import ul_layer
    sel = [ul_layer(a, m, arch, r, opts) for (a, m), r in zip(scores, log_ratios(len(scores), ratio), strict=True)]
    return Selection([g for g, _ in sel], [c for _, c in sel])
