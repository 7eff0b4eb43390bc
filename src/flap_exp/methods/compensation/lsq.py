"""`lsq`: the kept columns of each o_proj/down_proj refit by damped least squares on the calibration windows
(flap_exp.compensation.lsq); options `damping` and `form` (sequential, dense, drift)."""
from __future__ import annotations

import math

from ...catalogue import COMPENSATIONS
from ...errors import FlapError

FORMS = ("sequential", "dense", "drift")


def check(params: dict) -> None:
    damping, form = params.get("damping", 0.01), params.get("form", FORMS[0])
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) \
            or damping < 0:
        raise FlapError(f"lsq damping must be a finite number >= 0, got {damping!r}")
    if form not in FORMS:
        raise FlapError(f"unknown lsq form {form!r}; known forms: {', '.join(FORMS)}")


def extra_bytes(arch, windows: int, seqlen: int, elem: int, cfg) -> int:
    from ...compensation.lsq import lsq_extra_bytes  # deferred on purpose: torch
    return lsq_extra_bytes(arch, windows, seqlen, elem, cfg.form, store=False)


@COMPENSATIONS.register("lsq", rank=2, needs="windows", options=("damping", "form"), check=check,
                       extra_bytes=extra_bytes)
def begin(inp):
    from ...compensation.lsq import begin_lsq  # deferred on purpose: torch
    return begin_lsq(inp)
