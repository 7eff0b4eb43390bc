"""Channel metrics: one module each, registered in flap_exp.catalogue.METRICS (conf/metric/).

A metric's entry is its score function (W [out, in], ChannelStats or None) -> one score per input channel j
of W, where W[:, j] multiplies channel j; its facts say whether it reads calibration statistics, whether the
official code squares the attention score, whether it calibrates sequentially, its default compensation and
how it selects. Score functions use tensor methods only: listing metrics never imports torch.
"""
from __future__ import annotations


def colsq(w):
    """||W[:, j]||^2 per input channel j."""
    return (w * w).sum(0)


def need(s):
    if s is None:  # the callers check needs_data first; this is a bug, not a user mistake
        raise ValueError("this metric needs calibration statistics")
    return s
