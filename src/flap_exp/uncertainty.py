"""Sampling uncertainty of the reported numbers: perplexity over evaluation windows, zero-shot accuracy over
documents, and whether a gap between two numbers is within that noise. Pure functions of plain numbers.

Perplexity: PPL = exp(m) with m the mean of the per-window mean NLLs. The 95% interval is exp(m -/+ z s/sqrt(n))
with s the sample standard deviation (ddof=1) of the n per-window NLLs: a normal approximation on the mean NLL
(the central limit theorem; no seed, and derivable from (mean, std, n) alone, so a record needs no list). It is
the uncertainty of the subset's perplexity as an estimate of the perplexity of the text the windows come from.
Adjacent windows are contiguous text (often the same article), so their NLLs are positively correlated and
the interval treats them as independent: read it as a lower bound on the noise, not an upper one.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from .errors import FlapError

#: The two-sided 95% quantile of the standard normal, Phi^-1(0.975).
Z95 = 1.959963984540054


def _finite(name: str, x: float) -> float:
    if not math.isfinite(x):  # a NaN is an error, never a result
        raise FlapError(f"{name} is not finite ({x})")
    return float(x)


def nll_stats(per_window: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation) of per-window mean NLLs; the std is None for a single window."""
    values = [_finite("a per-window NLL", float(v)) for v in per_window]
    if not values:
        raise FlapError("no per-window NLL to summarize")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def ppl_interval(nll_mean: float, nll_std: float | None, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The (low, high) interval of exp(nll_mean) over n windows (see the module doc); None for n < 2."""
    if nll_std is None or n < 2:
        return None
    half = z * _finite("the NLL standard deviation", nll_std) / math.sqrt(n)
    m = _finite("the mean NLL", nll_mean)
    try:
        return math.exp(m - half), math.exp(m + half)
    except OverflowError:
        raise FlapError(f"perplexity interval overflows (mean loss {m:.4g} nats)") from None


def average_stderr(stderrs: Sequence[float | None]) -> float | None:
    """Standard error of the unweighted average of k task scores whose standard errors are `stderrs`:
    sqrt(sum se^2) / k (the tasks' documents are disjoint, so their errors are independent). None when a
    task has none (one document)."""
    if not stderrs or any(s is None for s in stderrs):
        return None
    return math.sqrt(sum(_finite("a standard error", s) ** 2 for s in stderrs if s is not None)) / len(stderrs)


def gap_within_noise(a: float, se_a: float | None, b: float, se_b: float | None, z: float = Z95) -> bool | None:
    """True when |a - b| <= z sqrt(se_a^2 + se_b^2): the gap is not distinguishable from sampling noise at 95%
    (the two estimates taken as independent; on the same documents a paired test would be sharper, but the
    per-document scores are not kept). None when either standard error is unknown."""
    if se_a is None or se_b is None:
        return None
    return abs(a - b) <= z * math.hypot(_finite("a standard error", se_a), _finite("a standard error", se_b))


def paired_ratio_interval(nll_a: Sequence[float], nll_b: Sequence[float],
                          z: float = Z95) -> tuple[float, float, float] | None:
    """(ratio, low, high): PPL_a / PPL_b = exp(mean(d)), d the per-window NLL differences of two models scored
    on the same windows, with its 95% interval exp(mean(d) -/+ z sd(d)/sqrt(n)). Pairing removes what the
    windows share (how hard the text is), so this is far tighter than two perplexities' own intervals; None
    when the windows differ in number or there is only one."""
    if len(nll_a) != len(nll_b) or len(nll_a) < 2:
        return None
    mean, std = nll_stats([float(a) - float(b) for a, b in zip(nll_a, nll_b, strict=True)])
    ci = ppl_interval(mean, std, len(nll_a), z)
    return None if ci is None else (math.exp(mean), *ci)
