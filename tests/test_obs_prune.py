"""Metric obs through the engine: masked == physical == reloaded, streamed == resident, config errors; the
OBS pass's stream is the one its lsq compensation refits."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from flap_exp.arch import ArchView
from flap_exp.calibrate import collect_stats
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
    _, sel, _ = select(model, windows, c, progress=False)
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
    stats, sel, _ = select(m, windows, cfg(), progress=False)
    comps = compensate(m, sel, arch, LSQ, windows=windows, batch_size=4, progress=False)
    mask_model(m, sel, comps, arch)
    ref = collect_stats(m, windows, batch_size=4, progress=False)
    for i, (a, b) in enumerate(zip(stats, ref, strict=True)):  # masked units are zero in ref, not in the pass
        k, ka = sel.keep_channels[i], sel.channel_mask(i, arch)
        torch.testing.assert_close(a.mlp.mean[k], b.mlp.mean[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.attn.meansq[ka], b.attn.meansq[ka], rtol=1e-4, atol=1e-5)


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
    seq = {k: v for k, v in cells["search_seq"].items() if v["metric"] == "obs"}
    assert {v["structure"] for v in seq.values()} == {"ul_um", "ul_log", "curve", "al_am", "ul_um_ziplm",
                                                      "ul_log_slimgpt"}
    assert {v["ratio"] for v in seq.values()} == {0.2, 0.3, 0.5}
    assert all(k in cells["compensate_lsq"] for k in (f"{key}-lsq" for key in seq))
    with pytest.raises(FlapError, match="allocation structure"):
        cells_text(compose(["experiment=selection", "tables.selection.blocks.obs.structures=[ul_mm]"], conf))


def test_the_pipeline_search_stage_runs_a_recipe(windows):
    """stages/search_seq.py's function on a recipe's conf options (batched SlimGPT-style): the selection record."""
    from flap_exp.pipeline.steps.search import search_sequential
    m = tiny_model()
    rec, stats = search_sequential(m, windows, {"metric": "obs", "structure": "ul_log_slimgpt", "ratio": 0.3},
                                   {}, {"obs_batch": 16, "obs_damping": 0.01}, 4)
    assert abs(rec["achieved_ratio"] - 0.3) < 0.005 and stats
    assert rec["kept_channels_per_layer"][0] >= rec["kept_channels_per_layer"][-1]  # the log profile
