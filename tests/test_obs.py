"""Greedy structured OBS (compensation/obs.py) against independent numpy derivations."""
import numpy as np
import pytest
import torch

from flap_exp.compensation import obs
from flap_exp.compensation.obs import damped, greedy_obs
from flap_exp.errors import FlapError


def data(n=400, d=12, d_out=5, seed=0):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, d)) @ g.standard_normal((d, d)) + g.standard_normal(d)
    return x, g.standard_normal((d_out, d))


def centred_cov(x):
    xc = x - x.mean(0)
    return xc.T @ xc / len(x)


def refit_loss(x, w, keep_cols, lam):
    """min over W' on the kept columns of mean ||W x - W' x_K||^2 (centred) + λ ||W'||_H-terms, by lstsq on the
    augmented system, plus λ ||W_R||^2: the objective ||W - W'||_H^2 with H = Σ + λI, derived from the data."""
    xc = (x - x.mean(0)) / np.sqrt(len(x))
    k = np.asarray(keep_cols, dtype=int)
    a = np.vstack([xc[:, k], np.sqrt(lam) * np.eye(len(k))])
    b = np.vstack([xc @ w.T, np.sqrt(lam) * w[:, k].T])
    sol = np.linalg.lstsq(a, b, rcond=None)[0]
    res = ((a @ sol - b) ** 2).sum()
    r = np.setdiff1d(np.arange(w.shape[1]), k)
    return res + lam * (w[:, r] ** 2).sum(), sol.T


def h_of(x, damping):
    s = centred_cov(x)
    lam = damping * np.diag(s).mean()
    return torch.from_numpy(damped(torch.from_numpy(s), damping).numpy()), lam


def cols_of(units, size):
    return [c for u in units for c in range(u * size, (u + 1) * size)]


@pytest.mark.parametrize("size", [1, 3])
def test_one_unit_error_is_the_refit_increase(size):
    x, w = data()
    h, lam = h_of(x, 0.05)
    n_units = w.shape[1] // size
    res = greedy_obs(torch.from_numpy(w), h, size, 1)
    base, _ = refit_loss(x, w, range(w.shape[1]), lam)
    brute = [refit_loss(x, w, [c for c in range(w.shape[1]) if c // size != u], lam)[0] - base for u in range(n_units)]
    assert int(res.removed[0]) == int(np.argmin(brute))
    np.testing.assert_allclose(float(res.loss[1]), min(brute), rtol=1e-9)


@pytest.mark.parametrize("size", [1, 3])
def test_greedy_batch1_equals_brute_force_greedy(size):
    """batch=1: the removal order and the whole error curve equal a brute-force greedy (each step refits every
    candidate's kept set by least squares)."""
    x, w = data(seed=1)
    h, lam = h_of(x, 0.02)
    n_units = w.shape[1] // size
    n_remove = n_units - 1
    res = greedy_obs(torch.from_numpy(w), h, size, n_remove, batch=1)
    base, _ = refit_loss(x, w, range(w.shape[1]), lam)
    alive, order, curve = list(range(n_units)), [], [0.0]
    for _ in range(n_remove):
        losses = [refit_loss(x, w, cols_of([v for v in alive if v != u], size), lam)[0] - base for u in alive]
        j = int(np.argmin(losses))
        order.append(alive.pop(j))
        curve.append(losses[j])
    assert res.removed.tolist() == order
    np.testing.assert_allclose(res.loss.numpy(), curve, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_final_weights_are_lsq_on_the_kept_set(batch):
    x, w = data(d=16, seed=2)
    h, lam = h_of(x, 0.01)
    res = greedy_obs(torch.from_numpy(w), h, 1, 9, batch=batch)
    keep = res.keep(16).numpy()
    loss, sol = refit_loss(x, w, np.flatnonzero(keep), lam)
    base, _ = refit_loss(x, w, range(16), lam)
    np.testing.assert_allclose(res.weight.numpy()[:, keep], sol, rtol=1e-8, atol=1e-8)
    assert np.abs(res.weight.numpy()[:, ~keep]).max() == 0
    np.testing.assert_allclose(float(res.loss[-1]), loss - base, rtol=1e-8)  # the curve's end: the exact increase
    assert res.counts.tolist() == sorted({*range(0, 9, batch), 9})


def test_exactly_dependent_inputs_go_first_at_zero_error():
    g = np.random.default_rng(3)
    base = g.standard_normal((300, 6))
    # column 6 duplicates column 0; column 7 = column 1 + column 2: one of each dependent set is free to remove
    x = np.hstack([base, base[:, :1], base[:, 1:2] + base[:, 2:3]])
    w = g.standard_normal((4, 8))
    h, _ = h_of(x, 1e-12)
    res = greedy_obs(torch.from_numpy(w), h, 1, 3)
    first = set(res.removed[:2].tolist())
    assert len(first & {0, 6}) == 1 and len(first & {1, 2, 7}) == 1
    assert float(res.loss[2]) < 1e-8 * float(res.loss[3])  # zero error, next to the first real removal


def test_batched_equals_one_at_a_time_when_units_are_independent():
    """Uncorrelated inputs: a unit's error does not depend on the others, so removing 3 at a time removes the
    same units with the same total error as one at a time."""
    g = np.random.default_rng(4)
    x = g.standard_normal((5000, 9)) * np.arange(1, 10)
    x = x - x.mean(0)
    s = np.diag(np.diag(centred_cov(x)))  # exactly diagonal H
    w = g.standard_normal((3, 9))
    h = damped(torch.from_numpy(s), 0.01)
    one = greedy_obs(torch.from_numpy(w), h, 1, 6, batch=1)
    three = greedy_obs(torch.from_numpy(w), h, 1, 6, batch=3)
    assert set(one.removed.tolist()) == set(three.removed.tolist())
    np.testing.assert_allclose(float(one.loss[-1]), float(three.loss[-1]), rtol=1e-10)
    np.testing.assert_allclose(one.weight.numpy(), three.weight.numpy(), atol=1e-12)


def test_failed_factorisation_names_the_projection():
    x, w = data()
    s = torch.from_numpy(centred_cov(x))
    s[0, 0] = -1.0
    with pytest.raises(FlapError, match=r"^layer 4 down_proj: the Cholesky") as e:
        greedy_obs(torch.from_numpy(w), s, 1, 2, name="layer 4 down_proj")
    assert "\n" not in str(e.value)
    with pytest.raises(FlapError, match="NaN"):
        greedy_obs(torch.from_numpy(w) * float("nan"), damped(s.abs(), 0.1), 1, 2)



def test_removing_every_unit_leaves_zero_weights_and_the_whole_objective():
    x, w = data(seed=6)
    h, lam = h_of(x, 0.05)
    res = greedy_obs(torch.from_numpy(w), h, 3, 4, batch=1)
    assert res.weight.abs().max() == 0
    # nothing left to compensate: the loss is ||W||_H^2
    np.testing.assert_allclose(float(res.loss[-1]), float(np.trace(w @ h.numpy() @ w.T)), rtol=1e-9)


@pytest.mark.parametrize("lazy_rank", [1, 3])
def test_flushing_the_lazy_factors_changes_nothing(monkeypatch, lazy_rank):
    """Single-column units keep their removals as low-rank factors, applied every LAZY_RANK columns (and the
    matrices compacted once a quarter is dead): flushing after every step or every third gives the brute-force
    greedy's order and curve, and lsq's weights, as the unflushed run does (the tests above never flush)."""
    monkeypatch.setattr(obs, "LAZY_RANK", lazy_rank)
    test_greedy_batch1_equals_brute_force_greedy(1)
    for batch in (1, 2, 4):
        test_final_weights_are_lsq_on_the_kept_set(batch)
