"""`wanda_sp`: sqrt(s_j) * mean_i |W_ij|, the Wanda-sp baseline as in the FLAP repository: layer l is pruned
before layer l+1 is calibrated (sequential), no bias compensation (flap-spec.md §6.1)."""
from __future__ import annotations

from ...catalogue import METRICS
from . import need


@METRICS.register("wanda_sp", rank=4, needs_data=True, square_attn=False, sequential=True, compensation="none")
def score(w, s):
    return need(s).meansq.sqrt() * w.abs().mean(0)
