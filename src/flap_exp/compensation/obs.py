"""Greedy structured OBS removal for one output projection (pure math: tensors in, tensors out).

A projection y = W x loses whole units of its input: a unit is a block of `unit_size` consecutive input
columns (an MLP channel: one column of down_proj; a k/v group: the G * head_dim columns of o_proj its query
heads feed). With H = Σ + λI the damped second moment of the (centred) input, removing the set R and letting
the remaining columns K compensate optimally costs

    E(R) = min_{W'}  ||W - W'||_H^2  (W'[:, R] = 0)  =  tr(W_R (H^-1)_RR^-1 W_R^T)           (block OBS)

where H^-1 is the inverse of H restricted to the units still alive; the optimal survivors are
W' = W - W_R (H^-1)_RR^-1 (H^-1)_R: and ||W - W'||_H^2 is exactly lsq's objective (the fit of W x on the kept
inputs plus λ ||W'_K - W_K||^2; the constant λ ||W_R||^2 aside), so the survivors ARE the damped least-squares
solution of the kept set (ZipLM, Kurtic et al. NeurIPS 2023; SlimGPT, Ling et al. NeurIPS 2024).

Greedy: each step removes the `batch` alive units of lowest E (each unit's error alone, the others
compensating), jointly, then downdates H^-1 and W. Everything is float64; H is factorised by Cholesky and a
failure is one FlapError naming the projection. The running sum of step errors is the projection's error
curve (exact increase of the objective after each step), which the curve allocation reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FlapError


@dataclass
class ObsResult:
    removed: torch.Tensor  # long [n_remove]: unit indices in removal order
    counts: torch.Tensor  # long [steps + 1]: units removed after each step (0 first)
    loss: torch.Tensor  # float64 [steps + 1]: the objective's increase after each step (0 first)
    weight: torch.Tensor  # float64 [d_out, d_in]: compensated survivors, removed columns zero

    def keep(self, n_units: int) -> torch.Tensor:
        """Bool keep-mask over the units."""
        keep = torch.ones(n_units, dtype=torch.bool)
        keep[self.removed] = False
        return keep


def damped(cov: torch.Tensor, damping: float) -> torch.Tensor:
    """H = Σ + λI with λ = damping x the mean diagonal of Σ (relative, as lsq's damping), float64, a copy."""
    h = cov.detach().to(torch.float64).clone()
    h.diagonal().add_(damping * h.diagonal().mean())
    return h


def _chol(m: torch.Tensor, name: str, what: str) -> torch.Tensor:
    lo, info = torch.linalg.cholesky_ex(m)
    if bool((info != 0).any()):
        raise FlapError(f"{name}: the Cholesky factorisation of {what} failed (not positive definite); "
                        "use a damping > 0 or check the activations")
    return lo


def unit_errors(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor, name: str = "projection") -> torch.Tensor:
    """E of removing each unit alone: tr(W_u (H^-1)_uu^-1 W_u^T) for cols [n, s] (column indices per unit)."""
    if cols.shape[1] == 1:  # one column per unit: ||W[:, j]||^2 / (H^-1)_jj
        j = cols[:, 0]
        return torch.linalg.vector_norm(w, dim=0)[j] ** 2 / hinv.diagonal()[j]
    blocks = hinv[cols[:, :, None], cols[:, None, :]]  # [n, s, s]
    wt = w[:, cols].permute(1, 2, 0)  # [n, s, d_out]
    z = torch.cholesky_solve(wt, _chol(blocks, name, "a unit's block of H^-1"))
    return (wt * z).sum((1, 2))


def _remove(W: torch.Tensor, hinv: torch.Tensor, q: torch.Tensor, name: str) -> float:
    """Remove the columns q jointly, in place: W -= W_Q (H^-1)_QQ^-1 (H^-1)_Q: and the same downdate of H^-1;
    returns the step's error tr(W_Q (H^-1)_QQ^-1 W_Q^T)."""
    if len(q) == 1:  # one column: rank-1 updates in place, no d x d temporary
        j = int(q[0])
        piv = float(hinv[j, j])
        if not piv > 0:
            raise FlapError(f"{name}: H^-1 lost positive definiteness (pivot {piv:.3g}); increase the damping")
        wq, hq = W[:, j].clone(), hinv[j].clone()
        W.addr_(wq, hq, alpha=-1 / piv)
        hinv.addr_(hq, hq, alpha=-1 / piv)
        W[:, j], hinv[j], hinv[:, j] = 0, 0, 0
        return float((wq * wq).sum()) / piv
    lq = _chol(hinv[q][:, q], name, "the removed block of H^-1")
    wq = W[:, q]
    x = torch.cholesky_solve(wq.T.contiguous(), lq)  # (H^-1)_QQ^-1 W_Q^T  [|Q|, d_out]
    step = float((wq.T * x).sum())
    W -= x.T @ hinv[q]
    hinv -= hinv[:, q] @ torch.cholesky_solve(hinv[q].contiguous(), lq)
    W[:, q], hinv[q], hinv[:, q] = 0, 0, 0  # exact in theory; removes the rounding residue
    return step


def greedy_obs(w: torch.Tensor, h: torch.Tensor, unit_size: int, n_remove: int, batch: int = 1,
               name: str = "projection") -> ObsResult:
    """Remove `n_remove` units of `unit_size` consecutive input columns from W [d_out, d_in] greedily by OBS
    error under H [d_in, d_in] (already damped), `batch` units per step. `name` goes into every error."""
    d_in = w.shape[1]
    if h.shape != (d_in, d_in) or unit_size < 1 or d_in % unit_size:
        raise FlapError(f"{name}: H is {tuple(h.shape)} for {d_in} inputs in units of {unit_size}")
    n_units = d_in // unit_size
    if not 0 <= n_remove <= n_units or batch < 1:
        raise FlapError(f"{name}: cannot remove {n_remove} of {n_units} units {batch} at a time")
    W = w.detach().to(torch.float64).clone()
    H = h.detach().to(torch.float64)
    if not (torch.isfinite(W).all() and torch.isfinite(H).all()):
        raise FlapError(f"{name}: the weights or the input second moment hold NaN/Inf")
    hinv = torch.cholesky_inverse(_chol(H, name, "H = Σ + λI"))
    units = torch.arange(n_units, device=W.device)  # the global unit of each unit still in the matrices
    alive = torch.ones(n_units, dtype=torch.bool, device=W.device)
    removed: list[torch.Tensor] = []
    counts, loss = [0], [0.0]
    out = torch.zeros_like(W)
    while counts[-1] < n_remove:
        b = min(batch, n_remove - counts[-1])
        cols = torch.arange(W.shape[1], device=W.device).view(-1, unit_size)
        live = alive.nonzero().squeeze(1)
        err = unit_errors(W, hinv, cols[live], name)
        pick = live[err.topk(b, largest=False).indices.sort().values]
        q = cols[pick].flatten()
        loss.append(loss[-1] + _remove(W, hinv, q, name))
        alive[pick] = False
        removed.append(units[pick])
        counts.append(counts[-1] + b)
        if int((~alive).sum()) * 4 > len(alive):  # a quarter of the matrices is dead: drop it (cost ~ width^2)
            keep_cols = cols[alive].flatten()
            W, hinv = W[:, keep_cols].contiguous(), hinv[keep_cols][:, keep_cols].contiguous()
            units, alive = units[alive], alive[alive]
    if len(units):  # the survivors back in their global columns (the removed ones stay zero)
        out.view(-1, n_units, unit_size)[:, units] = W.view(-1, len(units), unit_size)
    W = out
    if not torch.isfinite(W).all():
        raise FlapError(f"{name}: the OBS update gave NaN/Inf; increase the damping")
    rem = torch.cat(removed) if removed else torch.zeros(0, dtype=torch.long)
    return ObsResult(rem.cpu(), torch.tensor(counts), torch.tensor(loss, dtype=torch.float64), W)
