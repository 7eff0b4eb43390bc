"""Float64 first and second moments of a projection's input, accumulated batch by batch.

For a stream of row batches X (tokens x d) we keep the count n, the mean and the centred second
moment M2 = sum_t (x_t - mean)(x_t - mean)^T (d x d). Optionally a second, "target" stream T of the
same tokens (the dense model's input of the same projection, for the drift form) adds its mean and
the centred cross moment sum_t (t_t - mean_T)(x_t - mean)^T (d_T x d).

Each batch is centred on its own float64 mean and its outer-product sum is formed in the batch's
precision (float32 for float32/16 activations: the costly d x d product; float64 if the activations are
float64), then merged in float64 with Chan et al.'s pairwise rule, which is exact up to rounding. The
merge is in place (an add and a rank-1 `addr_`), so an update holds the moments plus one batch product.
Memory: d^2 float64 per matrix, d x c with `cols` (SmolLM2's MLP: 1536^2 x 8 B = 19 MB; LLaMA-7B's:
11008^2 x 8 B = 0.97 GB);
the lsq pass holds the matrices of one projection of one layer at a time, and `finish()` turns the
moments into covariances in place.
"""
from __future__ import annotations

import torch


def _batch_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class CovAccumulator:
    """Moments of a d-dimensional input; with `cols` (a bool mask or indices) only the columns `cols` of the
    second and cross moments are kept ([d, c] instead of [d, d]): all the lsq solve reads (Σ[:, K] holds
    Σ[K, K] in its rows K), at c/d of the cost and memory. The mean always covers all d inputs."""

    def __init__(self, d: int, device=None, target_dim: int | None = None, cols: torch.Tensor | None = None):
        f64 = dict(dtype=torch.float64, device=device)
        self.count, self.finished = 0, False
        if cols is not None and cols.dtype == torch.bool:
            cols = cols.nonzero().squeeze(1)
        self.cols = None if cols is None else cols.to(device)
        c = d if cols is None else len(cols)
        self.mean = torch.zeros(d, **f64)
        self.m2 = torch.zeros(d, c, **f64)
        self.target_mean = torch.zeros(target_dim, **f64) if target_dim is not None else None
        self.cross = torch.zeros(target_dim, c, **f64) if target_dim is not None else None

    @torch.no_grad()
    def update(self, x: torch.Tensor, target: torch.Tensor | None = None) -> CovAccumulator:
        """Add the rows of x [..., d] (and of target [..., d_T], the same tokens, for the drift form)."""
        x = x.reshape(-1, x.shape[-1])
        nb = x.shape[0]
        if nb == 0:
            return self
        if self.finished:
            raise ValueError("update() after finish(): the moments are already covariances")
        if (target is None) != (self.cross is None):
            raise ValueError("a target stream must be given exactly when the accumulator was made with target_dim")
        dt = _batch_dtype(x)
        mb = x.mean(0, dtype=torch.float64)
        xc = x.to(dt) - mb.to(dt)
        n = self.count + nb
        frac = nb / n  # weight of the new batch in the merged mean
        delta = mb - self.mean
        xk, dk = (xc, delta) if self.cols is None else (xc[:, self.cols], delta[self.cols])
        # in place: the batch's d x c product (in its precision) and a rank-1 update, no d x c temporaries
        self.m2.add_(xc.T @ xk).addr_(delta, dk, alpha=self.count * frac)
        if target is not None:
            assert self.cross is not None and self.target_mean is not None  # made with target_dim: checked above
            t = target.reshape(-1, target.shape[-1])
            tb = t.mean(0, dtype=torch.float64)
            tc = t.to(dt) - tb.to(dt)
            tdelta = tb - self.target_mean
            self.cross.add_(tc.T @ xk).addr_(tdelta, dk, alpha=self.count * frac)
            self.target_mean += tdelta * frac
        self.mean += delta * frac
        self.count = n
        return self

    def finish(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(covariance, cross covariance or None), made in place from the moments: no second d x d copy.
        The accumulator is spent afterwards (its moments are now covariances)."""
        if self.finished:
            raise ValueError("CovAccumulator.finish() was already called")
        self.finished = True
        self.m2.div_(max(self.count, 1))
        if self.cross is not None:
            self.cross.div_(max(self.count, 1))
        return self.m2, self.cross

    def variances(self) -> torch.Tensor:
        """n x the variance of each kept column (the diagonal of M2 restricted to `cols`)."""
        return self.m2.diagonal() if self.cols is None else self.m2[self.cols].diagonal()

    @property
    def cov(self) -> torch.Tensor:
        """Population covariance M2 / n (the least-squares normal equations use it unscaled by Bessel).
        A new d x d tensor; the lsq pass uses finish() instead."""
        return self.m2 if self.finished else self.m2 / max(self.count, 1)

    @property
    def cross_cov(self) -> torch.Tensor | None:
        if self.cross is None or self.finished:
            return self.cross
        return self.cross / max(self.count, 1)
