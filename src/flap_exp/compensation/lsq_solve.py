"""The damped least-squares reconstruction of one output projection from its kept inputs (pure math).

A projection y = W x (+ its own bias) loses the input channels outside K. Over the calibration tokens,
with Σ the input covariance and μ its mean, the fit of the dense output on the kept inputs,

    min_{W', b}  mean_t ||W x_t - W' x_t[K] - b||^2  +  λ ||W' - W[:, K]||_F^2,

has the closed form

    W'_K = (W Σ[:, K] + λ W[:, K]) (Σ[K, K] + λ I)^-1,      b = W μ - W'_K μ[K].

λ = damping * mean(diag Σ[K, K]) (relative, so one damping value suits every layer's scale). damping = 0
is the plain fit; damping → ∞ gives W'_K → W[:, K] and b → W[:, ~K] μ[~K], FLAP's bias. In the drift
form the target is the dense model's projection on its own input t: Σ[:, K] becomes the cross
covariance Cov(t, x[K]) and W μ becomes W μ_t. Everything runs in float64 with a Cholesky factorisation;
a singular system or a non-finite covariance is a FlapError naming the projection, never a NaN result.
"""
from __future__ import annotations

import math

import torch

from ..errors import FlapError

# A Cholesky pivot this small relative to the largest diagonal entry means the kept inputs are linearly
# dependent to working precision: the fit is then not unique and its weights would be noise.
_RCOND = 1e-12


def lsq_solve(w: torch.Tensor, cov: torch.Tensor, mean: torch.Tensor, keep: torch.Tensor, damping: float, *,
              cross: torch.Tensor | None = None, target_mean: torch.Tensor | None = None,
              name: str = "projection") -> tuple[torch.Tensor, torch.Tensor]:
    """(W'_K [d_out, |K|], b [d_out]) in float64, on `w`'s device.

    w: [d_out, d_in] dense weight; cov: [d_in, d_in] covariance of the regressors' input, or only its
    columns K [d_in, |K|] (what `CovAccumulator(cols=keep)` keeps); mean: [d_in]; keep: bool [d_in];
    cross/target_mean (drift form): Cov(target input, input) [d_in, d_in] or its columns K [d_in, |K|], and
    the target input's mean [d_in]. `name` (e.g. "layer 3 down_proj") goes into every error message.
    """
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
        raise FlapError(f"{name}: lsq damping must be a finite number >= 0, got {damping!r}")
    if (cross is None) != (target_mean is None):
        raise FlapError(f"{name}: the drift form needs both the cross covariance and the target mean")
    dev = w.device
    f64 = lambda t: t.detach().to(dev, torch.float64)  # noqa: E731
    W, S, mu = f64(w), f64(cov), f64(mean)
    C, mu_t = (S, mu) if cross is None else (f64(cross), f64(target_mean))
    for label, t in (("covariance", S), ("mean", mu), ("cross covariance", C), ("target mean", mu_t)):
        if not torch.isfinite(t).all():
            raise FlapError(f"{name}: the input {label} holds NaN/Inf; check the model's dtype and activations")
    k = keep.to(dev, torch.bool)
    n_keep = int(k.sum())
    if n_keep == 0:  # nothing left to regress on: the best constant is the mean output
        return W.new_zeros(W.shape[0], 0), W @ mu_t
    d_in = W.shape[1]
    for label, t in (("covariance", S), ("cross covariance", C)):
        if t.ndim != 2 or t.shape[0] != d_in or t.shape[1] not in (d_in, n_keep):
            raise FlapError(f"{name}: the {label} is {tuple(t.shape)}; expected [{d_in}, {d_in}] or its kept "
                            f"columns [{d_in}, {n_keep}]")
    cols = lambda t: t if t.shape[1] == n_keep else t[:, k]  # noqa: E731  (Σ[:, K] from either layout)
    S_K = cols(S)
    M = S_K[k]  # Σ[K, K] (a copy: the caller's matrix is never changed)
    lam = damping * M.diagonal().mean()
    M.diagonal().add_(lam)  # + λ I, in place
    L, info = torch.linalg.cholesky_ex(M)
    piv = L.diagonal() ** 2 if int(info) == 0 else None
    if piv is None or not bool(piv.min() > _RCOND * M.diagonal().max().clamp_min(torch.finfo(torch.float64).tiny)):
        hint = "use a damping > 0" if damping == 0 else "its kept inputs are constant or dependent"
        raise FlapError(f"{name}: the covariance of the {n_keep} kept inputs is singular (Cholesky failed"
                        f"{'' if piv is not None else f' at pivot {int(info)}'}); {hint}")
    rhs = W @ (S_K if cross is None else cols(C)) + lam * W[:, k]  # [d_out, |K|]
    w_kept = torch.cholesky_solve(rhs.T.contiguous(), L).T  # M is symmetric: W' M = rhs
    bias = W @ mu_t - w_kept @ mu[k]
    if not (torch.isfinite(w_kept).all() and torch.isfinite(bias).all()):
        raise FlapError(f"{name}: the least-squares solve gave NaN/Inf; increase the damping")
    return w_kept.contiguous(), bias
