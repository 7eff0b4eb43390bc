"""Structure kl_search: the evolutionary search over per-layer levels with the KL fitness (allocation_search.py)."""
import pytest
import torch

from flap_exp.allocation import layer_counts, removed_ratio
from flap_exp.allocation_search import KLFitness, Variants, search_allocation
from flap_exp.arch import ArchView
from flap_exp.errors import FlapError
from flap_exp.kl_search import evolve, level_bounds, mutate
from flap_exp.prune import PruneConfig, select
from flap_exp.store import ResidentStore
from flap_exp.structures import StructureOptions

from helpers.models import tiny_model

# a model of 4 layers, 2 k/v groups of 2 query heads, 48 MLP channels; ratios on the 0.05 grid
LAYERS = 4


def cfg(ratio=0.4, **opts):
    return PruneConfig("obs", "kl_search", ratio, options=StructureOptions(**{"search_candidates": 9, **opts}),
                       batch_size=4)


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=LAYERS)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 101, (8, 16), generator=torch.Generator().manual_seed(0))


def test_deterministic_for_a_seed(model, windows):
    store = ResidentStore(model)
    a, _ = search_allocation(store, windows, cfg(search_seed=1), progress=False)
    b, _ = search_allocation(store, windows, cfg(search_seed=1), progress=False)
    assert a.levels == b.levels and a.history == b.history and a.kl == b.kl
    assert a.candidates == 9 and a.kl <= a.uniform_kl
    c = cfg()
    db = Variants(store, windows, c, [0.4 + 0.05 * d for d in range(-8, 11)], progress=False)
    fit = KLFitness(store, windows[:8], 4, db, 0.4, 0.05)
    lo, hi = level_bounds(store.arch, 0.4, 0.05)
    walks = [evolve(fit, lo, hi, 5, s, progress=False)[4] for s in (2, 3, 4)]
    assert len({str(w) for w in walks}) > 1  # another seed walks elsewhere


def test_levels_mean_is_the_ratio_and_the_pruned_model_meets_it(model, windows):
    arch = ArchView.from_config(model.config)
    res, _ = search_allocation(ResidentStore(model), windows, cfg(0.4), progress=False)
    assert sum(res.levels) / LAYERS == pytest.approx(0.4)
    assert len(set(res.levels)) > 1  # the search moved away from uniform
    assert abs(removed_ratio(arch, layer_counts(arch, res.levels)) - 0.4) <= 0.005
    _, sel, _, _ = select(model, windows, cfg(0.4, levels=tuple(res.levels)), progress=False)
    assert abs(sel.achieved_ratio(arch) - 0.4) <= 0.005


def test_one_candidate_is_uniform(model, windows):
    res, _ = search_allocation(ResidentStore(model), windows, cfg(0.3, search_candidates=1), progress=False)
    assert res.levels == pytest.approx([0.3] * LAYERS) and res.candidates == 1 and res.kl == res.uniform_kl
    gen = torch.Generator().manual_seed(0)
    assert mutate((0,) * 3, [0] * 3, [0] * 3, 5, gen) == (0, 0, 0)  # no room to move: no move


def test_fitness_of_the_unpruned_model_is_zero(model, windows):
    store = ResidentStore(model)
    c = cfg(0.0)
    fit = KLFitness(store, windows[:4], 4, Variants(store, windows, c, [0.0], progress=False), 0.0, 0.05)
    assert fit((0,) * LAYERS, None)[0] == 0.0
    c = cfg(0.4)
    fit = KLFitness(store, windows[:4], 4, Variants(store, windows, c, [0.4, 0.5, 0.6], progress=False), 0.4, 0.05)
    kl, states = fit((0,) * LAYERS, None)
    assert kl > 0
    # a child reusing its parent's layer inputs scores as one computed from scratch
    child = (0, 0, 2, -2)
    assert fit(child, ((0,) * LAYERS, states))[0] == pytest.approx(fit(child, None)[0], rel=1e-6)


def test_the_database_covers_every_level(model, windows):
    """A whole group more at 0.5 than at 0.45 leaves fewer channels to remove: the greedy orders run to the most
    units of any level, not to the highest level's."""
    arch = ArchView.from_config(model.config)
    (g45, c45), (g50, c50) = layer_counts(arch, [0.45, 0.5])
    assert g50 > g45 and c45 > c50
    store = ResidentStore(model)
    db = Variants(store, windows, cfg(), [0.45, 0.5], progress=False)
    w_o, _, w_d, _ = db.get(1, store.model.model.layers[1], 0.45)
    assert int((w_d.abs().sum(0) == 0).sum()) == c45 and int((w_o.abs().sum(0) == 0).sum()) == 0


def test_floors_and_cap_bound_the_levels(model):
    arch = ArchView.from_config(model.config)
    lo, hi = level_bounds(arch, 0.4, 0.05)
    assert lo == [-8] * LAYERS and 0.4 + hi[0] * 0.05 <= 0.9 + 1e-9
    lo, hi = level_bounds(arch, 0.4, 0.05, min_channels=12)
    (g, c), = layer_counts(arch, [0.4 + hi[0] * 0.05])
    assert c <= 48 - 12 and hi[0] < 10
    with pytest.raises(FlapError, match="floors"):
        level_bounds(arch, 0.4, 0.05, min_groups=2, min_channels=47)


@pytest.mark.parametrize(("opts", "msg"), [({"search_step": 0}, "search_step"),
                                          ({"search_candidates": 0}, "search_candidates"),
                                          ({"search_windows": 1.5}, "search_windows"),
                                          ({"search_seed": -1}, "search_seed"), ({"levels": (0.2, 1.2)}, "levels")])
def test_bad_options_are_one_line_errors(opts, msg):
    with pytest.raises(FlapError, match=msg) as err:
        StructureOptions(**opts)
    assert "\n" not in str(err.value)


def test_kl_search_needs_metric_obs():
    with pytest.raises(FlapError, match="metric obs only"):
        PruneConfig("wifv", "kl_search", 0.3).validate()


def test_the_allocate_stage_feeds_the_obs_pass(model, windows, tmp_path):
    """stages/allocate.py's function writes the levels; stages/search_seq.py's with --levels selects with them."""
    from flap_exp.pipeline.reporting.plots import levels_per_layer
    from flap_exp.pipeline.steps.search import allocate, search_sequential
    cell = {"metric": "obs", "structure": "kl_search", "ratio": 0.4}
    opts = {"search_candidates": 5, "search_windows": 4, "obs_damping": 0.01}
    rec = allocate(model, windows, cell, opts, 4)
    assert rec["candidates"] == 5 and rec["search_windows"] == 4 and len(rec["levels"]) == LAYERS
    assert rec["history"][0] == {"generation": 0, "candidates": 1, "best_kl": rec["uniform_kl"]}
    levels_per_layer(rec, "cell", tmp_path / "levels.png")
    assert (tmp_path / "levels.png").stat().st_size > 0
    sel, _, _ = search_sequential(model, windows, cell, {}, opts, 4, rec["levels"])
    arch = ArchView.from_config(model.config)
    want = layer_counts(arch, rec["levels"])
    assert [(2 - g, 48 - c) for g, c in zip(sel["kept_groups_per_layer"], sel["kept_channels_per_layer"],
                                                       strict=True)] == want


def test_kl_search_cells_get_their_own_allocate_stage():
    from pathlib import Path

    import yaml

    from flap_exp.pipeline.artifacts import paths
    from flap_exp.pipeline.study.compose import cells_text, compose
    conf = Path(__file__).resolve().parents[1] / "conf"
    cells = yaml.safe_load(cells_text(compose(["experiment=smoke", "protocol=smoke"], conf)))["cells"]
    key = "obs-kl_search-0.5-wiki-8"
    assert set(cells["allocate"]) == set(cells["search_kl"]) == {key}
    assert cells["search_kl"][key]["levels"] == cells["allocate"][key]["levels"] == paths.allocation(key)
    assert key not in cells["search_seq"] and f"{key}-lsq" in cells["compensate_lsq"]
    with pytest.raises(FlapError, match=r"^structures.kl_search: search_windows must be an integer >= 1; got 0$"):
        compose(["experiment=smoke", "structures.kl_search.search_windows=0"], conf)
