import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from flap_exp.arch import ArchView
from flap_exp.calibrate import collect_stats
from flap_exp.compensation.bias import compensation_biases
from flap_exp.errors import FlapError
from flap_exp.metrics import channel_scores, get_metric
from flap_exp.persist import MANIFEST, load_pruned, save_pruned
from flap_exp.prune import PruneConfig, prune
from flap_exp.selection import Selection
from flap_exp.structures import StructureOptions, get_structure
from flap_exp.surgery import mask_model, prune_model

X = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(7))


def select(model, windows, p=0.4):
    arch = ArchView.from_config(model.config)
    stats = collect_stats(model, windows, progress=False)
    sel = get_structure("al_am")(channel_scores(get_metric("wifv"), model, stats), arch, p, StructureOptions())
    return arch, sel, compensation_biases(model, stats, sel, arch)


def logits(model, x=X):
    with torch.no_grad():
        return model(x).logits


def test_masked_equals_physically_pruned(model, windows):
    arch, sel, biases = select(model, windows)
    assert 0 < sel.achieved_ratio(arch) < 1
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    mask_model(masked, sel, biases, arch)
    prune_model(pruned, sel, biases, arch)
    torch.testing.assert_close(logits(pruned), logits(masked), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def zero_group_selection(arch):
    keep_g = [torch.ones(arch.num_kv_heads, dtype=torch.bool) for _ in range(arch.num_layers)]
    keep_c = [torch.ones(arch.intermediate_size, dtype=torch.bool) for _ in range(arch.num_layers)]
    keep_g[1][:] = False  # layer 1 loses all attention
    keep_c[2][:] = False  # layer 2 loses its whole MLP
    return Selection(keep_g, keep_c)


def test_layer_with_zero_heads_and_zero_channels_runs_and_generates(model, windows):
    arch = ArchView.from_config(model.config)
    stats = collect_stats(model, windows, progress=False)
    sel = zero_group_selection(arch)
    biases = compensation_biases(model, stats, sel, arch)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    mask_model(masked, sel, biases, arch)
    prune_model(pruned, sel, biases, arch)
    torch.testing.assert_close(logits(pruned), logits(masked), rtol=1e-5, atol=1e-5)
    # cached decoding equals a full recompute: the empty layer keeps the cache's length right
    with torch.no_grad():
        out = pruned.generate(X[:1, :5], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        full = pruned(out).logits[0, 4:-1].argmax(-1)
    assert torch.equal(out[0, 5:], full)


def test_save_reload_same_logits_and_auto_from_pretrained(model, windows, tmp_path):
    arch, sel, biases = select(model, windows)
    prune_model(model, sel, biases, arch)
    manifest = {"selection": sel.to_json(), "base_model": {"name": "tiny"}}
    save_pruned(model, None, manifest, tmp_path / "m")
    back, _, m = load_pruned(tmp_path / "m")
    torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=0)
    assert m["selection"] == sel.to_json()
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()  # flap_exp imported: registered
    assert type(auto).__name__ == "FlapLlamaForCausalLM"
    torch.testing.assert_close(logits(auto), logits(model), rtol=0, atol=0)
    assert not list(tmp_path.glob(".m.tmp-*"))  # nothing half-written left behind


def test_reload_zero_head_layer(model, windows, tmp_path):
    arch = ArchView.from_config(model.config)
    sel = zero_group_selection(arch)
    prune_model(model, sel, None, arch)
    save_pruned(model, None, {"selection": sel.to_json()}, tmp_path / "z")
    back, _, _ = load_pruned(tmp_path / "z")
    torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=0)


def test_tampered_directory_is_refused(model, windows, tmp_path):
    arch, sel, biases = select(model, windows)
    prune_model(model, sel, biases, arch)
    out = save_pruned(model, None, {"selection": sel.to_json()}, tmp_path / "m")
    man = json.loads((out / MANIFEST).read_text())
    man["selection"]["kept_channels"][0] = man["selection"]["kept_channels"][0][:-1]
    (out / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(FlapError, match="layer 0 has .* the manifest says"):
        load_pruned(out)
    w = next(out.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(FlapError, match="sha256"):
        load_pruned(out)


def test_prune_orchestrator_all_metrics_and_sequential(model, windows):
    for metric in ("wifv", "ifv", "wifn", "weight_magnitude", "wanda_sp"):
        m = copy.deepcopy(model)
        structure = "ul_um" if metric in ("wanda_sp", "weight_magnitude") else "al_am"
        comp = "none" if metric == "wanda_sp" else "bias"
        res = prune(m, windows, PruneConfig(metric, structure, 0.5, compensation=comp), progress=False)
        assert 0 < res.achieved_ratio < 1
        assert torch.isfinite(logits(m)).all()


def test_sequential_wanda_sp_differs_from_dense_statistics():
    """Sequential: layer l+1 is calibrated on layer l's pruned output, so its statistics change."""
    from helpers.models import tiny_model
    base = tiny_model(layers=4)
    w = torch.randint(0, 101, (8, 16), generator=torch.Generator().manual_seed(2))
    seq = prune(copy.deepcopy(base), w, PruneConfig("wanda_sp", "ul_um", 0.5, compensation="bias"), progress=False)
    dense = prune(copy.deepcopy(base), w, PruneConfig("wanda_sp", "ul_um", 0.5, compensation="bias", sequential=False),
                  progress=False)
    torch.testing.assert_close(seq.stats[0].mlp.mean, dense.stats[0].mlp.mean)
    assert not torch.allclose(seq.stats[2].mlp.mean, dense.stats[2].mlp.mean)
    with pytest.raises(FlapError, match="calibrates sequentially and needs a per-layer structure"):
        PruneConfig("wanda_sp", "al_am").validate()
