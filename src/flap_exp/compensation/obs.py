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


def _block_errors(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor, name: str) -> torch.Tensor:
    """E of removing each unit alone: tr(W_u (H^-1)_uu^-1 W_u^T) for cols [n, s] (column indices per unit)."""
    blocks = hinv[cols[:, :, None], cols[:, None, :]]  # [n, s, s]
    wt = w[:, cols].permute(1, 2, 0)  # [n, s, d_out]
    z = torch.cholesky_solve(wt, _chol(blocks, name, "a unit's block of H^-1"))
    return (wt * z).sum((1, 2))


def _remove(W: torch.Tensor, hinv: torch.Tensor, q: torch.Tensor, name: str) -> float:
    """Remove the columns q jointly, in place: W -= W_Q (H^-1)_QQ^-1 (H^-1)_Q: and the same downdate of H^-1;
    returns the step's error tr(W_Q (H^-1)_QQ^-1 W_Q^T)."""
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
    greedy = _greedy_columns if unit_size == 1 else _greedy_blocks
    W, removed, counts, loss = greedy(W, hinv, unit_size, n_remove, batch, name)
    if not torch.isfinite(W).all():
        raise FlapError(f"{name}: the OBS update gave NaN/Inf; increase the damping")
    rem = torch.cat(removed) if removed else torch.zeros(0, dtype=torch.long)
    return ObsResult(rem.cpu(), torch.tensor(counts), torch.tensor(loss, dtype=torch.float64), W)


def _survivors(W: torch.Tensor, units: torch.Tensor, n_units: int, unit_size: int) -> torch.Tensor:
    """The surviving columns back at their global places in a full-width matrix (the removed ones zero)."""
    out = W.new_zeros(W.shape[0], n_units * unit_size)
    if len(units):
        out.view(-1, n_units, unit_size)[:, units] = W.view(-1, len(units), unit_size)
    return out


def _greedy_blocks(W, hinv, unit_size, n_remove, batch, name):
    """Units of several columns (k/v groups): each step scores every unit by block OBS and downdates W and
    H^-1 at once (few steps: a layer has a handful of groups)."""
    n_units = W.shape[1] // unit_size
    units = torch.arange(n_units, device=W.device)  # the global unit of each unit still in the matrices
    alive = torch.ones(n_units, dtype=torch.bool, device=W.device)
    removed: list[torch.Tensor] = []
    counts, loss = [0], [0.0]
    while counts[-1] < n_remove:
        b = min(batch, n_remove - counts[-1])
        cols = torch.arange(W.shape[1], device=W.device).view(-1, unit_size)
        live = alive.nonzero().squeeze(1)
        err = _block_errors(W, hinv, cols[live], name)
        pick = live[err.topk(b, largest=False).indices.sort().values]
        loss.append(loss[-1] + _remove(W, hinv, cols[pick].flatten(), name))
        alive[pick] = False
        removed.append(units[pick])
        counts.append(counts[-1] + b)
        if int((~alive).sum()) * 4 > len(alive):  # a quarter of the matrices is dead: drop it (cost ~ width^2)
            keep_cols = cols[alive].flatten()
            W, hinv = W[:, keep_cols].contiguous(), hinv[keep_cols][:, keep_cols].contiguous()
            units, alive = units[alive], alive[alive]
    return _survivors(W, units, n_units, unit_size), removed, counts, loss


#: Steps of single-column removal held as low-rank factors (H^-1 - U U^T, W - V U^T) before they are applied in
#: one matrix product. A step then reads W once (one matrix-vector product for the column norms) instead of
#: rewriting W and H^-1 by rank-1 updates, which are memory bound: SmolLM2's down_proj greedy 4-5x faster.
LAZY_RANK = 64


def _greedy_columns(W, hinv, unit_size, n_remove, batch, name):
    """Units of one column (MLP channels): the same greedy as _greedy_blocks, its removals kept as factors.
    A unit's error is ||W[:, j]||^2 / (H^-1)_jj; both are tracked through the factors: (H^-1)_jj -= u_j^2 and
    ||W_j - v u_j||^2 = ||W_j||^2 - 2 u_j (v^T W_j) + u_j^2 ||v||^2 (the batch's block the same way), recomputed
    exactly at every flush."""
    n_units = W.shape[1]
    units = torch.arange(n_units, device=W.device)
    alive = torch.ones(n_units, dtype=torch.bool, device=W.device)
    removed: list[torch.Tensor] = []
    counts, loss = [0], [0.0]
    U = V = None
    r = 0
    while counts[-1] < n_remove:
        if U is None:  # after a flush: exact norms and pivots of the current matrices
            norms, diag = (W * W).sum(0), hinv.diagonal().clone()
            U = W.new_zeros(W.shape[1], LAZY_RANK + batch)
            V = W.new_zeros(W.shape[0], LAZY_RANK + batch)
        b = min(batch, n_remove - counts[-1])
        err = (norms / diag).masked_fill(~alive, float("inf"))
        pick = err.topk(b, largest=False).indices.sort().values
        Ur, Vr = U[:, :r], V[:, :r]
        hq = hinv[pick] - Ur[pick] @ Ur.T  # the picked rows of the current H^-1  [b, d]
        wq = W[:, pick] - Vr @ Ur[pick].T  # the picked columns of the current W  [d_out, b]
        lq = _chol(hq[:, pick], name, "the removed block of H^-1")
        un = torch.linalg.solve_triangular(lq, hq, upper=False).T  # H^-1 -= un un^T
        vn = torch.linalg.solve_triangular(lq, wq.T, upper=False).T  # W -= vn un^T
        g = vn.T @ W - (vn.T @ Vr) @ Ur.T  # vn^T (current W)  [b, d]
        norms = norms - 2 * (un.T * g).sum(0) + ((un @ (vn.T @ vn)) * un).sum(1)
        diag = diag - (un * un).sum(1)
        U[:, r:r + b], V[:, r:r + b] = un, vn
        r += b
        loss.append(loss[-1] + float((vn * vn).sum()))  # tr(W_Q (H^-1)_QQ^-1 W_Q^T)
        alive[pick] = False
        removed.append(units[pick])
        counts.append(counts[-1] + b)
        if r >= LAZY_RANK or counts[-1] == n_remove:  # flush: apply the factors, zero the dead, maybe compact
            W.addmm_(V[:, :r], U[:, :r].T, alpha=-1)
            hinv.addmm_(U[:, :r], U[:, :r].T, alpha=-1)
            dead = ~alive
            W[:, dead], hinv[dead], hinv[:, dead] = 0, 0, 0  # exact in theory; removes the rounding residue
            if int(dead.sum()) * 4 > len(alive):  # a quarter of the matrices is dead: drop it (cost ~ width^2)
                W, hinv = W[:, alive].contiguous(), hinv[alive][:, alive].contiguous()
                units, alive = units[alive], alive[alive]
            U = V = None
            r = 0
    return _survivors(W, units, n_units, 1), removed, counts, loss
