import math

import numpy as np
import pytest
import torch

from flap_exp.arch import ArchView
from flap_exp.errors import FlapError
from flap_exp.structures import STRUCTURES, StructureOptions, check_ratio, get_structure, standardize

from conftest import tiny_config
from reference import zscore_rows


def random_scores(arch: ArchView, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(arch.attn_channels, generator=g, dtype=torch.float64),
             torch.rand(arch.intermediate_size, generator=g, dtype=torch.float64)) for _ in range(arch.num_layers)]


ARCHS = {"mha": ArchView.from_config(tiny_config(heads=8, kv=8, layers=6, hidden=64, inter=96, head_dim=8)),
         "gqa": ArchView.from_config(tiny_config(heads=8, kv=2, layers=6, hidden=64, inter=96, head_dim=8))}


def test_standardize_matches_numpy():
    m = torch.rand(5, 40, dtype=torch.float64)
    np.testing.assert_allclose(standardize(m).numpy(), zscore_rows(m.numpy()), rtol=1e-12)
    assert torch.equal(standardize(torch.ones(2, 4, dtype=torch.float64)), torch.zeros(2, 4, dtype=torch.float64))


def al_am_reference(scores, arch, p):
    """FLAP's AL-AM search re-derived in numpy, with the exact (non-truncated) group cost."""
    attn = zscore_rows(np.stack([a.numpy() for a, _ in scores]))
    mlp = zscore_rows(np.stack([m.numpy() for _, m in scores]))
    heads = attn.reshape(arch.num_layers, arch.num_kv_heads, -1).mean(-1)
    units = np.concatenate([heads.ravel(), mlp.ravel()])
    cost = np.concatenate([np.full(heads.size, arch.group_params / arch.channel_params), np.ones(mlp.size)])
    order = np.argsort(-units, kind="stable")
    cum = np.cumsum(cost[order])
    tau = units[order[np.argmin(np.abs(cum - (1 - p) * cum[-1]))]]
    return heads > tau, mlp > tau


@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.7])
def test_al_am_matches_reference_and_hits_ratio(kind, p):
    arch = ARCHS[kind]
    scores = random_scores(arch)
    sel = get_structure("al_am")(scores, arch, p, StructureOptions())
    ref_g, ref_c = al_am_reference(scores, arch, p)
    assert np.array_equal(torch.stack(sel.keep_groups).numpy(), ref_g)
    assert np.array_equal(torch.stack(sel.keep_channels).numpy(), ref_c)
    # within one unit's cost of the target
    assert abs(sel.achieved_ratio(arch) - p) * arch.total_params <= arch.group_params


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_ul_um_removes_floor_fraction_per_layer(kind):
    arch, p = ARCHS[kind], 0.3
    sel = get_structure("ul_um")(random_scores(arch), arch, p, StructureOptions())
    for g, c in zip(sel.keep_groups, sel.keep_channels):
        assert int((~g).sum()) == math.floor(p * arch.num_kv_heads)
        assert int((~c).sum()) == math.floor(p * arch.intermediate_size)


def test_ul_um_group_score_is_sum_of_channels():
    arch = ARCHS["gqa"]
    scores = random_scores(arch)
    a, m = scores[0]
    a = torch.zeros_like(a)
    a[: arch.attn_channels // 2] = 1.0  # group 0 high in sum, group 1 zero
    scores[0] = (a, m)
    sel = get_structure("ul_um")(scores, arch, 0.5, StructureOptions())
    assert sel.keep_groups[0].tolist() == [True, False]


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_mm_structures_budget(kind):
    arch, p = ARCHS[kind], 0.4
    for name in ("ul_mm", "al_mm"):
        opts = StructureOptions(remove_groups=arch.num_layers)  # one group per layer / that many globally
        sel = get_structure(name)(random_scores(arch), arch, p, opts)
        assert sum(int((~g).sum()) for g in sel.keep_groups) == arch.num_layers
        assert abs(sel.achieved_ratio(arch) - p) * arch.total_params <= arch.num_layers * arch.channel_params


def test_minimum_units_per_layer():
    arch = ARCHS["mha"]
    scores = random_scores(arch)
    a, m = torch.zeros_like(scores[0][0]), torch.zeros_like(scores[0][1])
    a[-1], m[-1] = 1e6, 1e6  # one outlier: every other unit of layer 0 standardizes just below 0
    scores[0] = (a, m)
    bare = get_structure("al_am")(scores, arch, 0.5, StructureOptions())
    assert int(bare.keep_groups[0].sum()) < 2 and int(bare.keep_channels[0].sum()) < 5
    kept = get_structure("al_am")(scores, arch, 0.5, StructureOptions(min_groups=2, min_channels=5))
    assert all(int(g.sum()) >= 2 for g in kept.keep_groups) and all(int(c.sum()) >= 5 for c in kept.keep_channels)


def test_ratio_zero_keeps_everything():
    arch = ARCHS["gqa"]
    for name in STRUCTURES:
        sel = get_structure(name)(random_scores(arch), arch, 0.0, StructureOptions(remove_groups=0))
        assert sel.achieved_ratio(arch) == 0


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_ratio(bad):
    with pytest.raises(FlapError, match=r"in \[0, 1\)"):
        check_ratio(bad)


def test_unknown_structure_lists_known():
    with pytest.raises(FlapError, match="ul_um, ul_mm, al_mm, al_am"):
        get_structure("al")
