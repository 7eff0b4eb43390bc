"""`weight_magnitude`: ||W[:, j]||_2, no data; the baseline of the FLAP repository, with no bias compensation
(flap-spec.md §6.2)."""
from __future__ import annotations

from ...catalogue import METRICS
from . import colsq


@METRICS.register("weight_magnitude", rank=3, needs_data=False, square_attn=False, compensation="none")
def score(w, s):
    return colsq(w).sqrt()
