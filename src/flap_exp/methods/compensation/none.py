"""`none`: the surviving projections stay as they are (the Wanda-sp and magnitude baselines, officially)."""
from __future__ import annotations

from ...catalogue import COMPENSATIONS


@COMPENSATIONS.register("none", rank=0, needs="nothing")
def begin(inp):
    return lambda i, layer: None
