"""Every supported family (flap_exp.families) on a tiny random model of its own transformers config: masked ==
physically pruned == saved/reloaded == layer-streamed logits, for FLAP with bias and with lsq; the engine's
perplexity equals one computed from the model's own logits (per-layer masks and rotary bases, Gemma's logit
soft-capping); any other model type is refused in one line."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config

from flap_exp.arch import ArchView
from flap_exp.errors import FlapError
from flap_exp.persist import load_pruned, save_pruned, write_streamed
from flap_exp.ppl import perplexity
from flap_exp.prune import PruneConfig, prune
from flap_exp.streaming import StreamedModel
from flap_exp.surgery import mask_model

from helpers.models import FAMILIES, tiny_model

X = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(7))
CFGS = {"bias": PruneConfig("wifv", "al_am", 0.4, compensation="bias", batch_size=3),
        "lsq": PruneConfig("wifv", "al_am", 0.4, compensation="lsq", batch_size=3)}


def logits(model, x=X):
    with torch.no_grad():
        return model(x).logits


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def dense(family):
    return tiny_model(family=family)


@pytest.fixture(scope="module")
def dense_dir(dense, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    dense.save_pretrained(folder, max_shard_size="40KB")  # several shards: streamed layer by layer
    return folder


@pytest.mark.parametrize("comp", ["bias", "lsq"])
def test_masked_pruned_reloaded_streamed_agree(family, dense, dense_dir, windows, comp, tmp_path):
    cfg, arch = CFGS[comp], ArchView.from_config(dense.config)
    assert arch.family == family
    pruned = copy.deepcopy(dense)
    res = prune(pruned, windows, cfg, progress=False)
    sel = res.selection
    assert any(not bool(g.all()) for g in sel.keep_groups) and any(not bool(c.all()) for c in sel.keep_channels)
    assert pruned.config.model_type.startswith("flap_")
    masked = copy.deepcopy(dense)
    mask_model(masked, sel, res.comps, arch)
    ref = logits(pruned)
    assert not torch.allclose(ref, logits(dense), atol=1e-3)  # pruning changed the model
    torch.testing.assert_close(logits(masked), ref, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in dense.parameters())

    save_pruned(pruned, None, {"selection": sel.to_json()}, tmp_path / "mem")
    back, _, _ = load_pruned(tmp_path / "mem")
    torch.testing.assert_close(logits(back), ref, rtol=0, atol=0)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").eval()
    assert type(auto) is type(back) and type(back).__name__.startswith("Flap")  # a per-layer-width class

    got = write_streamed(StreamedModel(dense_dir), windows, cfg, tmp_path / "stream", {}, progress=False)
    assert got.selection.to_json() == sel.to_json() and got.achieved_ratio == res.achieved_ratio
    streamed, _, _ = load_pruned(tmp_path / "stream")
    torch.testing.assert_close(logits(streamed), ref, rtol=1e-5, atol=1e-5)


def own_logits_ppl(model, tokens: torch.Tensor, seqlen: int) -> float:
    """FLAP's protocol from the model's own forward and F.cross_entropy (an independent derivation)."""
    w = tokens[: tokens.numel() // seqlen * seqlen].view(-1, seqlen)
    lg = logits(model, w)
    nll = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), w[:, 1:].reshape(-1), reduction="none")
    return math.exp(nll.view(w.shape[0], -1).mean(1).mean().item())


def test_engine_perplexity_resident_and_streamed_equal_the_models_own(family, dense, dense_dir):
    tokens = torch.randint(0, 101, (96,), generator=torch.Generator().manual_seed(3))
    want = own_logits_ppl(dense, tokens, 24)
    resident = perplexity(dense, tokens, 24, batch_size=2, progress=False).ppl
    streamed = perplexity(StreamedModel(dense_dir), tokens, 24, batch_size=2, progress=False).ppl
    assert resident == pytest.approx(want, rel=1e-5) and streamed == pytest.approx(want, rel=1e-5)


def test_other_model_types_are_refused_in_one_line():
    with pytest.raises(FlapError) as e:
        ArchView.from_config(GPT2Config())
    msg = str(e.value)
    assert "\n" not in msg and "'gpt2'" in msg
    for fam in FAMILIES:
        assert fam in msg


def test_layers_without_attention_or_mlp(family, dense, tmp_path):
    """A layer that lost every group (its attention outputs o_proj's bias, through Gemma's post-norm) and one
    that lost every channel: masked == pruned == reloaded."""
    from flap_exp.selection import Selection
    from flap_exp.surgery import prune_model
    arch = ArchView.from_config(dense.config)
    keep_g = [torch.ones(arch.num_kv_heads, dtype=torch.bool) for _ in range(arch.num_layers)]
    keep_c = [torch.ones(arch.intermediate_size, dtype=torch.bool) for _ in range(arch.num_layers)]
    keep_g[1][:] = False
    keep_c[2][:] = False
    sel = Selection(keep_g, keep_c)
    biases = [(torch.randn(arch.hidden_size, generator=torch.Generator().manual_seed(i)), torch.zeros(arch.hidden_size))
              for i in range(arch.num_layers)]
    masked, pruned = copy.deepcopy(dense), copy.deepcopy(dense)
    mask_model(masked, sel, biases, arch)
    prune_model(pruned, sel, biases, arch)
    torch.testing.assert_close(logits(pruned), logits(masked), rtol=1e-5, atol=1e-5)
    save_pruned(pruned, None, {"selection": sel.to_json()}, tmp_path / "z")
    torch.testing.assert_close(logits(load_pruned(tmp_path / "z")[0]), logits(pruned), rtol=0, atol=0)
