"""`wifn`: sqrt(s_j) * mean_i |W_ij|, FLAP's weighted input feature norm (s_j = mean over tokens of x_j^2)."""
from __future__ import annotations

from ...catalogue import METRICS
from . import need


@METRICS.register("wifn", rank=2, needs_data=True, square_attn=True, compensation="bias")
def score(w, s):
    return need(s).meansq.sqrt() * w.abs().mean(0)
