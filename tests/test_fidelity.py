"""Fidelity to the official FLAP code, held to what it produced on SmolLM2-135M in multi-head form
(../shared/ref/official-flap-smollm2-mha, see its README): kept heads and channels of five runs, the
official per-layer statistics and channel scores of WIFV AL-AM at 0.2, and the exact calibration windows.

(a) The AL-AM search on the official channel scores: head_cost="official" (the truncated integer head
    cost, 85 channel units for head_dim 64) gives the official masks exactly; the exact cost (85.33) keeps
    the same heads and differs in a handful of channels (bound measured below).
(b) Statistics computed by flap_exp on the official calibration windows (all 1024) reproduce the official
    per-layer decisions: AL-AM's standardization is per layer, so each layer's kept units are fixed by its
    own statistics and the official global threshold; UL-UM (official floor rule) decides each layer alone.
    A pass over all 30 layers is estimated at 10+ min on 2 CPU cores, so the test covers the first
    FLAP_EXP_FIDELITY_LAYERS layers (default 2: ~70 s of CPU); set it to 30 for the whole model.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from flap_exp.arch import ArchView
from flap_exp.metrics import channel_scores, get_metric
from flap_exp.selection import Selection
from flap_exp.structures import StructureOptions, get_structure, group_scores, standardize, ul_layer

from helpers.models import SHARED

REF = SHARED / "ref" / "official-flap-smollm2-mha"
STATS = REF / "flap_p0.2_WIFV_AL-AM_real_stats.pt"
# SmolLM2-135M in multi-head form (9 heads of 64 = 9 k/v groups, 1536 MLP channels, 30 layers): the ArchView
# the official runs saw; a test below checks it against the real config.
ARCH = ArchView(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=9, head_dim=64, intermediate_size=1536)
RUNS = {  # run name -> (our metric, our structure, ratio, options under which the official decisions are expected)
    "flap_p0.2_WIFV_AL-AM_real": ("wifv", "al_am", 0.2),
    "flap_p0.5_WIFV_AL-AM_real": ("wifv", "al_am", 0.5),
    "flap_p0.2_IFV_AL-AM_real": ("ifv", "al_am", 0.2),
    "flap_p0.2_WIFN_AL-AM_real": ("wifn", "al_am", 0.2),
    "flap_p0.2_WIFV_UL-UM_real": ("wifv", "ul_um", 0.2),
}
OFFICIAL = StructureOptions(ul_rounding="floor", head_cost="official")
# Measured: exact cost vs official masks on the official scores of WIFV AL-AM 0.2 = 7 channels, 0 heads.
EXACT_COST_MAX_CHANNELS = 10
# Channels whose decision flips between flap_exp's statistics and the official ones (float32 summation order
# near the threshold), per layer. Measured on all 1024 windows, first 2 layers: 1, 1, 1, 0 (AL-AM runs) and
# 4 (UL-UM) in all over the two layers, at most 2 in one layer; no head.
STATS_MAX_CHANNELS_PER_LAYER = 2


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"fidelity fixture missing: {path} (../shared/ref beside the checkout)")
    return path


def _decisions(run: str) -> dict:
    return json.loads(_require(REF / f"{run}_decisions.json").read_text())


def _official_stats() -> dict:
    return torch.load(_require(STATS), weights_only=True)


def _differences(sel: Selection, dec: dict, layers: range | None = None) -> tuple[int, int]:
    """(heads, channels) in the symmetric difference between a selection and official decisions."""
    got = sel.to_json()
    layers = layers if layers is not None else range(len(dec["kept_head_indices"]))
    heads = sum(len(set(got["kept_groups"][i]) ^ set(dec["kept_head_indices"][i])) for i in layers)
    chans = sum(len(set(got["kept_channels"][i]) ^ set(dec["kept_mlp_channel_indices"][i])) for i in layers)
    return heads, chans


# --- (a) the search, from the official statistics -------------------------------------------------------

@pytest.fixture(scope="module")
def official():
    return _official_stats()


def _official_scores(official: dict, dtype=torch.float64):
    return [(layer["attn_metric"].to(dtype), layer["mlp_metric"].to(dtype)) for layer in official["layers"]]


def test_fixture_is_what_the_docstring_says(official):
    dec = _decisions("flap_p0.2_WIFV_AL-AM_real")
    assert dec["head_cost_in_channel_units_used"] == int(4 * ARCH.head_dim / 3) == 85
    assert official["attn_mask"].shape == (ARCH.num_layers, ARCH.num_kv_heads)
    assert official["mlp_mask"].shape == (ARCH.num_layers, ARCH.intermediate_size)
    assert [torch.nonzero(m).flatten().tolist() for m in official["mlp_mask"]] == dec["kept_mlp_channel_indices"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_official_head_cost_reproduces_official_masks_exactly(official, dtype):
    sel = get_structure("al_am")(_official_scores(official, dtype), ARCH, 0.2, OFFICIAL)
    assert torch.equal(torch.stack(sel.keep_groups), official["attn_mask"])
    assert torch.equal(torch.stack(sel.keep_channels), official["mlp_mask"])
    assert _differences(sel, _decisions("flap_p0.2_WIFV_AL-AM_real")) == (0, 0)


def test_standardized_scores_match_official(official):
    scores = _official_scores(official, torch.float32)
    heads = group_scores(standardize(torch.stack([a for a, _ in scores])), ARCH, "mean")
    assert torch.equal(heads, official["attn_metric_std_head"])
    assert torch.equal(standardize(torch.stack([m for _, m in scores])), official["mlp_metric_std"])


def test_exact_head_cost_keeps_official_heads_and_nearly_all_channels(official):
    sel = get_structure("al_am")(_official_scores(official), ARCH, 0.2, StructureOptions(head_cost="exact"))
    heads, chans = _differences(sel, _decisions("flap_p0.2_WIFV_AL-AM_real"))
    assert heads == 0
    assert 0 < chans <= EXACT_COST_MAX_CHANNELS, chans  # > 0: the two costs must differ, or this tests nothing


# --- (a, b) from statistics: flap_exp's metrics on the real model ---------------------------------------

@pytest.fixture(scope="module")
def mha_model():
    from flap_exp.models import load_model
    lm = load_model("smollm2-135m-mha", dtype=torch.float32)  # the fidelity protocol: float32, whatever conf says
    assert ArchView.from_config(lm.model.config) == ARCH
    return lm.model


@pytest.mark.slow
def test_metric_on_official_statistics_reproduces_official_masks(official, mha_model):
    """flap_exp's WIFV on the official fluctuation (`*_fluc`) and the real weights: the official masks."""
    from flap_exp.stats import ChannelStats, LayerStats

    def fake(layer: dict, kind: str) -> ChannelStats:  # a ChannelStats whose var is the official fluctuation
        n = layer[f"{kind}_nsamples"]
        return ChannelStats(n, layer[f"{kind}_baseline"].double(), layer[f"{kind}_fluc"].double() * (n - 1),
                            torch.zeros_like(layer[f"{kind}_baseline"].double()))
    stats = [LayerStats(fake(layer, "attn"), fake(layer, "mlp")) for layer in official["layers"]]
    scores = channel_scores(get_metric("wifv"), mha_model, stats)
    sel = get_structure("al_am")(scores, ARCH, 0.2, OFFICIAL)
    heads, chans = _differences(sel, _decisions("flap_p0.2_WIFV_AL-AM_real"))
    print(f"WIFV from the official statistics: {heads} heads and {chans} channels differ")
    assert (heads, chans) == (0, 0)  # measured: the official masks exactly


@contextmanager
def first_layers(model, k: int):
    """The model truncated to its first k decoder layers (restored on exit)."""
    base = model.model
    full = base.layers
    base.layers = full[:k]
    try:
        yield model
    finally:
        base.layers = full


@pytest.fixture(scope="module")
def our_stats(mha_model):
    from flap_exp.calibrate import collect_stats
    k = int(os.environ.get("FLAP_EXP_FIDELITY_LAYERS", "2"))
    windows = torch.load(_require(REF / "inputs.pt"), weights_only=True)["calib_windows"]
    assert windows.shape == (1024, 128)
    with first_layers(mha_model, k):
        stats = collect_stats(mha_model, windows, batch_size=16, progress=False)
        scores = {m: channel_scores(get_metric(m), mha_model, stats) for m in ("wifv", "ifv", "wifn")}
    return stats, scores


@pytest.mark.slow
def test_statistics_match_official_means(official, our_stats):
    stats, _ = our_stats
    for ours, theirs in zip(stats, official["layers"], strict=False):  # our first k layers
        for kind in ("attn", "mlp"):
            s = getattr(ours, kind)
            assert s.count == theirs[f"{kind}_nsamples"] * 128
            torch.testing.assert_close(s.mean.float(), theirs[f"{kind}_baseline"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_our_statistics_reproduce_official_decisions(run, our_stats):
    metric, structure, ratio = RUNS[run]
    dec = _decisions(run)
    scores = our_stats[1][metric]
    k = len(scores)
    if structure == "al_am":  # per-layer standardization + the official global threshold decide each layer
        attn = standardize(torch.stack([a for a, _ in scores]))
        mlp = standardize(torch.stack([m for _, m in scores]))
        tau = dec["threshold"]
        sel = Selection(list(group_scores(attn, ARCH, "mean") > tau), list(mlp > tau))
    else:  # UL-UM decides each layer alone; the official run used the floor rule
        sel = Selection(*map(list, zip(*(ul_layer(a, m, ARCH, ratio, OFFICIAL) for a, m in scores), strict=True)))
    per_layer = [_differences(sel, dec, range(i, i + 1)) for i in range(k)]
    heads, chans = sum(h for h, _ in per_layer), sum(c for _, c in per_layer)
    print(f"{run}: first {k} layers, {heads} heads and {chans} channels differ "
          f"(at most {max(c for _, c in per_layer)} in one layer)")
    assert heads == 0
    assert max(c for _, c in per_layer) <= STATS_MAX_CHANNELS_PER_LAYER, per_layer
