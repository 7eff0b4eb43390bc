"""`ifv`: F_j, the unbiased variance of input channel j over all calibration tokens (FLAP's fluctuation alone)."""
from __future__ import annotations

from ...catalogue import METRICS
from . import need


@METRICS.register("ifv", rank=0, needs_data=True, square_attn=True, compensation="bias")
def score(w, s):
    return need(s).var
