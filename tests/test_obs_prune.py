"""Metric obs through the engine: masked == physical == reloaded, streamed == resident, config errors; the
OBS pass's stream is the one its lsq compensation refits, and its own refit is that compensation."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from flap_exp.arch import ArchView
from flap_exp.calibrate import collect_stats
from flap_exp.catalogue import is_obs_refit
from flap_exp.compensation import compensate
from flap_exp.compensation.base import CompensationConfig
from flap_exp.errors import FlapError
from flap_exp.persist import load_pruned, save_pruned, write_streamed
from flap_exp.prune import PruneConfig, prune, select
from flap_exp.streaming import StreamedModel
from flap_exp.structures import StructureOptions
from flap_exp.surgery import mask_model

from helpers.models import tiny_model

LSQ = CompensationConfig("lsq", 0.01, "sequential")


def cfg(structure="ul_um", ratio=0.4, **opts):
    return PruneConfig("obs", structure, ratio, compensation=LSQ, options=StructureOptions(**opts), batch_size=4)


@pytest.mark.parametrize(("structure", "kv"), [("ul_um", 2), ("ul_um", 4), ("ul_log", 2), ("al_am", 2), ("curve", 2)],
                         ids=["ul_um-gqa", "ul_um-mha", "ul_log-gqa", "al_am-gqa", "curve-gqa"])
def test_masked_equals_physical_equals_reloaded(windows, structure, kv, tmp_path):
    model = tiny_model(kv=kv)
    c = cfg(structure)
    _, sel, _, _ = select(model, windows, c, progress=False)
    arch = ArchView.from_config(model.config)
    comps = compensate(model, sel, arch, LSQ, windows=windows, batch_size=4, progress=False)
    masked = tiny_model(heads=model.config.num_attention_heads, kv=model.config.num_key_value_heads)
    mask_model(masked, sel, comps, arch)
    res = prune(model, windows, c, progress=False)
    assert res.selection.to_json() == sel.to_json()
    # FLAP's threshold meets the ratio to within one unit (a group is 1/15 of this tiny model); the others to a channel
    assert abs(res.achieved_ratio - 0.4) < (arch.group_params / arch.total_params if structure == "al_am" else 0.005)
    x = windows[:3]
    with torch.no_grad():
        want, got = masked(x).logits, model(x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # float32 sums in another order
    save_pruned(model, None, {"selection": sel.to_json()}, tmp_path / "p")
    again, _, _ = load_pruned(tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, got, rtol=0, atol=0)


def test_obs_stream_is_what_lsq_refits(windows):
    """The pass refits each layer by lsq before going on, so its statistics are those of the lsq-compensated
    model's own stream: re-running the selection on the masked+refit model's layer inputs gives them again."""
    m = tiny_model()
    arch = ArchView.from_config(m.config)
    stats, sel, _, _ = select(m, windows, cfg(), progress=False)
    comps = compensate(m, sel, arch, LSQ, windows=windows, batch_size=4, progress=False)
    mask_model(m, sel, comps, arch)
    ref = collect_stats(m, windows, batch_size=4, progress=False)
    for i, (a, b) in enumerate(zip(stats, ref, strict=True)):  # masked units are zero in ref, not in the pass
        k, ka = sel.keep_channels[i], sel.channel_mask(i, arch)
        torch.testing.assert_close(a.mlp.mean[k], b.mlp.mean[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.attn.meansq[ka], b.attn.meansq[ka], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("structure", ["ul_um", "curve"])
def test_the_pass_refit_is_the_lsq_compensation(windows, structure):
    """The pass's own refit (select(refit=True)) equals lsq's own pass over the windows on the same selection:
    the same least squares on the same stream, the covariances summed in another float32 order."""
    m = tiny_model()
    arch = ArchView.from_config(m.config)
    _, sel, _, refit = select(m, windows, cfg(structure), progress=False, refit=True)
    comps = compensate(m, sel, arch, LSQ, windows=windows, batch_size=4, progress=False)
    assert refit is not None and len(refit) == len(comps) == arch.num_layers
    for got, want in zip(refit, comps, strict=True):
        for f in ("o_bias", "down_bias", "o_weight", "down_weight"):
            a, b = getattr(got, f), getattr(want, f)
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert select(m, windows, cfg(structure), progress=False)[3] is None  # not asked: not kept


def test_which_compensation_is_the_pass_refit():
    """Only lsq on the pruned stream with the pass's own damping is the pass's refit; prune() reuses it then."""
    lsq = {"method": "lsq", "form": "sequential", "damping": 0.01}
    assert is_obs_refit("obs", lsq, 0.01)
    assert not is_obs_refit("obs", lsq, 0.001)  # another damping: another solution
    assert not is_obs_refit("obs", {**lsq, "form": "dense"}, 0.01)
    assert not is_obs_refit("obs", {"method": "bias"}, 0.01)
    assert not is_obs_refit("wanda_sp", lsq, 0.01)  # no OBS pass


def test_prune_without_reuse_gives_the_same_model(windows, monkeypatch):
    """prune() in memory takes the pass's refit for lsq at the pass's damping (no lsq pass: `begin` is not
    called); with another damping it runs lsq's pass. At a damping that differs by a hair, the two models'
    logits agree to float32 summation order."""
    import flap_exp.prune as engine
    real_begin, calls = engine.begin, []
    monkeypatch.setattr(engine, "begin", lambda *a, **k: calls.append(1) or real_begin(*a, **k))
    x = windows[:3]
    logits = []
    for damping in (0.01, 0.01 * (1 + 1e-12)):
        calls.clear()
        m = tiny_model()
        c = PruneConfig("obs", "ul_um", 0.4, compensation=CompensationConfig("lsq", damping, "sequential"),
                        options=StructureOptions(), batch_size=4)
        prune(m, windows, c, progress=False)
        assert bool(calls) == (damping != 0.01)
        with torch.no_grad():
            logits.append(m(x).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("structure", ["ul_um", "curve"])
def test_streamed_equals_resident(tmp_path, windows, structure):
    m = tiny_model()
    m.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    c = cfg(structure, obs_batch=2)
    ref_model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    ref = prune(ref_model, windows, c, progress=False)
    got = write_streamed(StreamedModel(tmp_path / "base"), windows, c, tmp_path / "s", {}, progress=False)
    assert got.selection.to_json() == ref.selection.to_json()
    b, _, _ = load_pruned(tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(b(windows[:3]).logits, ref_model(windows[:3]).logits, rtol=1e-5, atol=1e-5)


def test_config_errors_are_one_line():
    for bad, msg in ((PruneConfig("obs", "ul_mm", 0.3), "allocation structure"),
                     (PruneConfig("wifv", "curve", 0.3), "metric obs only"),
                     (PruneConfig("wanda_sp", "ul_log", 0.3), "per-layer structure")):
        with pytest.raises(FlapError, match=msg) as e:
            bad.validate()
        assert "\n" not in str(e.value)
    with pytest.raises(FlapError, match="obs_batch"):
        StructureOptions(obs_batch=0)
    with pytest.raises(FlapError, match="obs_damping"):
        StructureOptions(obs_damping=float("nan"))


def test_the_selection_table_composes_into_sequential_obs_cells():
    from pathlib import Path

    import yaml

    from flap_exp.pipeline.study.compose import cells_text, compose
    conf = Path(__file__).resolve().parents[1] / "conf"
    cells = yaml.safe_load(cells_text(compose(["experiment=selection"], conf)))["cells"]
    seq = {k: v for t in ("search_seq", "search_obs", "search_kl") for k, v in cells[t].items() if v["metric"] == "obs"}
    assert {v["structure"] for v in seq.values()} == {"ul_log", "curve", "al_am", "ul_um_ziplm", "ul_log_slimgpt",
                                                      "kl_search"}
    assert {v["ratio"] for v in seq.values()} == {0.2, 0.3, 0.5}
    # each OBS cell's lsq is its search stage's own refit (kl_search's pass is the search_kl stage: its own lsq)
    for key, v in seq.items():
        reuse = v["structure"] != "kl_search"
        assert (key in cells["search_obs"]) == reuse and (f"{key}-lsq" in cells["compensate_lsq"]) != reuse
        if reuse:
            assert cells["evaluate"][f"{key}-lsq"]["comp"] == cells["search_obs"][key]["refit"]
    # another damping for lsq, or a streamed study: every lsq cell runs its own pass
    for override in ("compensations.lsq.damping=0.001", "model.stream=true"):
        other = yaml.safe_load(cells_text(compose(["experiment=selection", override], conf)))["cells"]
        assert not other["search_obs"] and all(f"{key}-lsq" in other["compensate_lsq"] for key in seq)
    with pytest.raises(FlapError, match="allocation structure"):
        cells_text(compose(["experiment=selection", "tables.selection.blocks.obs.structures=[ul_mm]"], conf))


def test_the_pipeline_search_stage_runs_a_recipe(windows, tmp_path):
    """stages/search_seq.py's function on a recipe's conf options (batched SlimGPT-style): the selection record."""
    from flap_exp.pipeline.steps.search import search_sequential
    m = tiny_model()
    cell = {"metric": "obs", "structure": "ul_log_slimgpt", "ratio": 0.3}
    rec, stats, refit = search_sequential(m, windows, cell, {}, {"obs_batch": 16, "obs_damping": 0.01}, 4,
                                          refit=True)
    assert abs(rec["achieved_ratio"] - 0.3) < 0.005 and stats
    assert rec["kept_channels_per_layer"][0] >= rec["kept_channels_per_layer"][-1]  # the log profile
    # the refit, written as search_obs writes it, is a compensate file evaluate accepts for lsq on this selection
    from flap_exp.pipeline.artifacts.io import save_tensors
    from flap_exp.pipeline.steps.compensate import compensation_tensors, load_compensation
    arch = ArchView.from_config(m.config)
    assert refit[0] == LSQ
    tensors, meta = compensation_tensors(*refit, rec, arch, windows)
    save_tensors(tmp_path / "refit.safetensors", tensors, meta)
    comps, crec = load_compensation(tmp_path / "refit.safetensors", rec, arch, "lsq")
    assert crec["damping"] == 0.01 and crec["form"] == "sequential" and len(comps) == arch.num_layers
    with pytest.raises(FlapError, match="another selection"):
        load_compensation(tmp_path / "refit.safetensors", {**rec, "ratio": 0.5}, arch, "lsq")
