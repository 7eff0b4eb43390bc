"""`wifv`: F_j * ||W[:, j]||^2, FLAP's weighted input feature variance (the default metric)."""
from __future__ import annotations

from ...catalogue import METRICS
from . import colsq, need


@METRICS.register("wifv", rank=1, needs_data=True, square_attn=True, compensation="bias")
def score(w, s):
    return need(s).var * colsq(w)
