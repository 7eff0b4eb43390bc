"""Query heads as attention units (attn_unit "query"): a model with one k/v head loses attention weights, every
kept group of a layer keeps the same number of heads, the achieved ratio is the weights actually removed, and
masked == physically pruned == saved/reloaded logits (bias and lsq; a Gemma 3 model too)."""
from __future__ import annotations

import copy

import pytest
import torch

from flap_exp.arch import ArchView
from flap_exp.errors import FlapError
from flap_exp.persist import load_pruned, save_pruned
from flap_exp.prune import PruneConfig, prune
from flap_exp.selection import Selection
from flap_exp.structures import StructureOptions
from flap_exp.surgery import mask_model

from helpers.models import tiny_model

X = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(7))
QUERY = StructureOptions(attn_unit="query")


def logits(model):
    with torch.no_grad():
        return model(X).logits


def unit_weights(model) -> int:
    """Attention + MLP weight entries of the decoder layers, counted on the modules themselves."""
    return sum(getattr(part, n).weight.numel() for layer in model.model.layers
               for part, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                   (layer.mlp, ("gate_proj", "up_proj", "down_proj")))
               for n in names)


@pytest.mark.parametrize("structure", ["al_am", "ul_um"])
@pytest.mark.parametrize("comp", ["bias", "lsq"])
@pytest.mark.parametrize("shape", [dict(heads=4, kv=1), dict(heads=4, kv=2), dict(heads=4, kv=1, family="gemma3_text")],
                         ids=["one-kv", "gqa", "gemma3-one-kv"])
def test_query_units_exact_ratio_and_equivalences(shape, structure, comp, windows, tmp_path):
    dense = tiny_model(**shape)
    arch = ArchView.from_config(dense.config)
    pruned = copy.deepcopy(dense)
    ratio = 0.5 if structure == "ul_um" else 0.3  # UL: floor(p * G) slots per layer, 1 at G = 2 and p = 0.5
    res = prune(pruned, windows, PruneConfig("wifv", structure, ratio, compensation=comp, options=QUERY, batch_size=4),
                progress=False)
    sel = res.selection
    assert sel.keep_heads is not None
    partial = [i for i, h in enumerate(sel.keep_heads) if 0 < int(h.sum()) < arch.num_heads]
    assert partial  # some layer lost query heads but kept attention: finer than whole k/v groups
    for h, g in zip(sel.keep_heads, sel.keep_groups, strict=True):  # one G' per layer
        per_group = h.view(arch.num_kv_heads, arch.group_size).sum(1)
        assert torch.equal(g, per_group > 0) and per_group[g].unique().numel() <= 1
    # the ratio is the weights the cut model lost, counted on its modules
    assert res.achieved_ratio == pytest.approx(1 - unit_weights(pruned) / unit_weights(dense), abs=1e-12)
    slack = arch.num_layers * max(4 * arch.num_kv_heads * arch.hidden_size * arch.head_dim, arch.channel_params)
    assert abs(res.achieved_ratio - ratio) <= slack / arch.total_params

    masked = copy.deepcopy(dense)
    mask_model(masked, sel, res.comps, arch)
    torch.testing.assert_close(logits(masked), logits(pruned), rtol=1e-5, atol=1e-5)
    save_pruned(pruned, None, {"selection": sel.to_json()}, tmp_path / "m")
    back, _, manifest = load_pruned(tmp_path / "m")
    torch.testing.assert_close(logits(back), logits(pruned), rtol=0, atol=0)
    assert Selection.from_json(manifest["selection"], arch).to_json() == sel.to_json()


def test_group_units_cannot_touch_a_single_kv_head_model_below_a_whole_layer(windows):
    """The case query units exist for: with one k/v group per layer, group units remove whole attention blocks."""
    dense = tiny_model(heads=4, kv=1)
    res = prune(copy.deepcopy(dense), windows, PruneConfig("wifv", "ul_um", 0.3, batch_size=4), progress=False)
    assert all(bool(g.all()) for g in res.selection.keep_groups)  # floor(0.3 * 1) = 0 groups: no attention pruned


def test_unequal_heads_per_group_and_unsupported_combinations_are_refused():
    arch = ArchView.from_config(tiny_model(heads=4, kv=2).config)
    heads = [torch.tensor([True, True, True, False])] * arch.num_layers
    with pytest.raises(FlapError, match="same number"):
        Selection.from_heads(heads, [torch.ones(arch.intermediate_size, dtype=torch.bool)] * arch.num_layers, arch)
    for cfg in (PruneConfig("wifv", "al_mm", 0.3, options=QUERY), PruneConfig("wanda_sp", "ul_um", 0.3, options=QUERY)):
        with pytest.raises(FlapError) as e:
            cfg.validate()
        assert "\n" not in str(e.value) and "query" in str(e.value)
    with pytest.raises(FlapError, match="attn_unit must be one of"):
        StructureOptions(attn_unit="head")


def test_manifest_query_heads_must_match_the_weights(windows, tmp_path):
    import json

    from flap_exp.persist import MANIFEST
    pruned = tiny_model(heads=4, kv=1)
    res = prune(pruned, windows, PruneConfig("wifv", "ul_um", 0.5, options=QUERY, batch_size=4), progress=False)
    out = save_pruned(pruned, None, {"selection": res.selection.to_json()}, tmp_path / "m")
    man = json.loads((out / MANIFEST).read_text())
    man["selection"]["kept_heads"][0] = man["selection"]["kept_heads"][0][:-1]
    (out / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(FlapError, match="layer 0 has 2 query heads, the manifest says 1"):
        load_pruned(out)
