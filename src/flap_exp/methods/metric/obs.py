"""`obs`: reconstruction-aware selection (ZipLM / SlimGPT / Týr-the-Pruner's local pruner): a unit's cost is the
output error left after the other columns compensate, chosen by greedy structured OBS in its own sequential pass
(the structure is then only the allocation); the survivors end on lsq, its natural compensation."""
from __future__ import annotations

from ...catalogue import METRICS
from ...errors import FlapError


@METRICS.register("obs", rank=5, needs_data=True, square_attn=False, sequential=True, compensation="lsq",
                  selector="obs")
def score(w, s):
    raise FlapError("metric obs has no channel score: it selects in its own pass (prune.select)")
