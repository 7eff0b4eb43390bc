"""Allocations (allocation.py): equal budgets to 0.005 at SmolLM2's shape, the log profile, the knapsack against
an exhaustive search."""
import itertools
import math

import pytest
import torch

from flap_exp.allocation import counts_of, curve_counts, layer_counts, log_ratios, relative_curves, removed_ratio
from flap_exp.arch import ArchView
from flap_exp.structures import StructureOptions, al_am_units

SMOL = ArchView(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536)


def convex_curve(n: int, scale: float, step: int = 1):
    units = torch.tensor(sorted({*range(0, n + 1, step), n}))
    return units, scale * (units.double() / n) ** 2


def random_curves(arch, seed=0, step=1):
    g = torch.Generator().manual_seed(seed)
    return [(convex_curve(arch.num_kv_heads, float(torch.rand(1, generator=g)) * 10),
             convex_curve(arch.intermediate_size, float(torch.rand(1, generator=g)) * 10, step))
            for _ in range(arch.num_layers)]


@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5])
def test_every_allocation_removes_the_ratio(ratio):
    g = torch.Generator().manual_seed(1)
    flap = al_am_units(torch.randn(30, 3, generator=g), torch.randn(30, 1536, generator=g), SMOL, ratio,
                       StructureOptions())
    allocations = {"uniform": layer_counts(SMOL, [ratio] * 30), "log": layer_counts(SMOL, log_ratios(30, ratio)),
                   "al_am": counts_of(flap), "curve": curve_counts(SMOL, ratio, random_curves(SMOL, step=16), 8)}
    for name, counts in allocations.items():
        assert abs(removed_ratio(SMOL, counts) - ratio) < 0.005, name
        assert all(0 <= gr <= 3 and 0 <= c <= 1536 for gr, c in counts), name


def test_log_profile():
    for ratio in (0.2, 0.5, 0.85):
        r = log_ratios(30, ratio)
        assert abs(sum(r) / 30 - ratio) < 1e-9
        assert all(a <= b + 1e-12 for a, b in zip(r, r[1:], strict=False)) and max(r) <= 0.9 + 1e-12
    r = log_ratios(30, 0.5)
    assert r[-1] / r[0] == pytest.approx(math.log(31) / math.log(2))  # uncapped: proportional to ln(l + 2)


def test_curve_knapsack_is_the_exhaustive_optimum():
    # hd=3, G=1: a group costs exactly 4 channels, so the budget grid is exact with step 1
    arch = ArchView(num_layers=3, hidden_size=4, num_heads=2, num_kv_heads=2, head_dim=3, intermediate_size=5)
    assert arch.group_params == 4 * arch.channel_params
    g = torch.Generator().manual_seed(3)
    curves = []
    for _ in range(3):  # arbitrary increasing (non-convex) curves
        a = torch.cat([torch.zeros(1), torch.rand(2, generator=g).cumsum(0)]).double()
        m = torch.cat([torch.zeros(1), torch.rand(5, generator=g).cumsum(0)]).double()
        curves.append(((torch.arange(3), a), (torch.arange(6), m)))
    for ratio in (0.2, 0.5, 0.7):
        target = round(ratio * arch.total_params / arch.channel_params)
        best = min((sum(float(curves[i][0][1][gc[0]] + curves[i][1][1][gc[1]]) for i, gc in enumerate(combo)), combo)
                   for combo in itertools.product(itertools.product(range(3), range(6)), repeat=3)
                   if sum(4 * gr + c for gr, c in combo) == target)
        got = curve_counts(arch, ratio, curves, step=1)
        loss = sum(float(curves[i][0][1][gr] + curves[i][1][1][c]) for i, (gr, c) in enumerate(got))
        assert loss == pytest.approx(best[0], abs=1e-12)
        assert sum(4 * gr + c for gr, c in got) == target


def test_floors_bound_the_knapsack():
    got = curve_counts(SMOL, 0.5, random_curves(SMOL, step=16), 8, min_groups=1, min_channels=400)
    assert all(gr <= 2 and c <= 1136 for gr, c in got)
    assert abs(removed_ratio(SMOL, got) - 0.5) < 0.005


def test_relative_curves_make_the_knapsack_blind_to_each_layers_scale():
    curves = random_curves(SMOL, step=16)
    rel = relative_curves(curves)
    for (ga, ma), (ra, rm) in zip(curves, rel, strict=True):
        assert torch.equal(ra[0], ga[0]) and torch.equal(rm[0], ma[0])
        assert float(ra[1][-1]) == pytest.approx(1.0) and float(rm[1][-1]) == pytest.approx(1.0)
        torch.testing.assert_close(rm[1] * float(ma[1][-1]), ma[1])
    # a layer's curves scaled by 1000 (a deeper layer's larger stream): absolute curves steer the budget away
    # from it, the relative ones allocate exactly as before
    scaled = [((a[0], a[1] * 1000), (m[0], m[1] * 1000)) if i == 7 else (a, m) for i, (a, m) in enumerate(curves)]
    assert curve_counts(SMOL, 0.5, relative_curves(scaled), 8) == curve_counts(SMOL, 0.5, rel, 8)
    assert curve_counts(SMOL, 0.5, scaled, 8)[7] != curve_counts(SMOL, 0.5, curves, 8)[7]
    dead = ((torch.arange(4), torch.zeros(4, dtype=torch.float64)), curves[0][1])
    assert torch.equal(relative_curves([dead])[0][0][1], dead[0][1])  # a projection with no output: no NaN
