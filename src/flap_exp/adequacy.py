"""Whether a calibration sample is large enough for a method's result to mean anything: a warning, never an
error (a small N is a legitimate experiment, e.g. the calibration ablation; it must only not pass unnoticed).

The rule for lsq: it refits, for every output row of each `o_proj`/`down_proj`, one coefficient per kept
input column plus the bias, from the N x T calibration tokens. An ordinary least-squares fit of p coefficients
on n samples has an expected held-out excess error of p / (n - p - 1) times the residual variance; with fewer
than 10 tokens per coefficient that excess exceeds ~11% (the usual "ten observations per parameter"), and
with fewer tokens than coefficients the fit is underdetermined: only the damping decides it. (Seen: lsq at
N=8, T=128 came out worse than the plain bias on SmolLM2-135M, whose MLP keeps up to 1,536 columns.)
"""
from __future__ import annotations

#: Calibration tokens wanted per fitted coefficient (the rule above).
LSQ_TOKENS_PER_COEFFICIENT = 10


def lsq_coefficients(kept_groups: list[int], kept_channels: list[int], columns_per_group: int) -> int:
    """Coefficients per output row of the largest refit: the most kept input columns of any o_proj (kept
    k/v groups x query heads per group x head_dim) or down_proj (kept MLP channels), plus the bias."""
    return max([g * columns_per_group for g in kept_groups] + list(kept_channels)) + 1


def lsq_sample_warning(nsamples: int, seqlen: int, coefficients: int) -> str | None:
    """A one-line warning when N x T calibration tokens are fewer than LSQ_TOKENS_PER_COEFFICIENT per
    coefficient, else None."""
    tokens, want = nsamples * seqlen, LSQ_TOKENS_PER_COEFFICIENT * coefficients
    if tokens >= want:
        return None
    state = "underdetermined: only the damping decides the fit" if tokens < coefficients else "a noisy fit"
    return (f"lsq on N x T = {nsamples} x {seqlen} = {tokens:,} calibration tokens for {coefficients:,} "
            f"coefficients per output row ({state}); a meaningful refit wants at least "
            f"{LSQ_TOKENS_PER_COEFFICIENT} tokens per coefficient, N >= {-(-want // seqlen):,} at T={seqlen}")


def lsq_warning_for(selection, arch, nsamples: int, seqlen: int) -> str | None:
    """lsq_sample_warning of an in-memory selection (keep masks per layer) on an ArchView."""
    return lsq_sample_warning(nsamples, seqlen, lsq_coefficients(
        [int(g.sum()) for g in selection.keep_groups], [int(c.sum()) for c in selection.keep_channels],
        arch.group_size * arch.head_dim))
