import math

import torch
import torch.nn.functional as F

from flap_exp.ppl import perplexity

from helpers.models import tiny_model


def test_batched_perplexity_matches_window_by_window_loop():
    model = tiny_model()
    tokens = torch.randint(0, 101, (16 * 7 + 5,), generator=torch.Generator().manual_seed(0))
    got = perplexity(model, tokens, seqlen=16, batch_size=3, progress=False)
    losses = []
    with torch.no_grad():
        for i in range(7):  # 7 full windows; the 5-token tail is dropped
            w = tokens[16 * i:16 * (i + 1)][None]
            logits = model(w).logits[0, :-1]
            losses.append(F.cross_entropy(logits, w[0, 1:]).item())
    assert got.windows == 7 and got.tokens == 112
    assert math.isclose(got.ppl, math.exp(sum(losses) / 7), rel_tol=1e-5)
    assert perplexity(model, tokens, 16, 4, max_windows=2, progress=False).windows == 2


def test_next_token_nll_equals_cross_entropy():
    import torch.nn.functional as F

    from flap_exp.ppl import next_token_nll
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g) * 4
    y = torch.randint(0, 50, (3, 7), generator=g)
    want = F.cross_entropy(logits.reshape(-1, 50), y.reshape(-1), reduction="none").view(3, 7)
    torch.testing.assert_close(next_token_nll(logits, y), want, rtol=1e-6, atol=1e-5)
    # on a non-contiguous view (the [:, :-1] slice perplexity passes), no copy needed
    shifted = F.cross_entropy(logits[:, :-1].reshape(-1, 50), y[:, 1:].reshape(-1), reduction="none").view(3, 6)
    torch.testing.assert_close(next_token_nll(logits[:, :-1], y[:, 1:]), shifted, rtol=1e-6, atol=1e-5)


def test_chunked_head_equals_the_models_own_logits(monkeypatch):
    """perplexity runs the store's layers and scores a slice of the vocabulary at a time; the numbers are those
    of the model's own full logits."""
    import flap_exp.ppl as ppl
    model = tiny_model()
    tokens = torch.randint(0, 101, (16 * 9,), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(ppl, "VOCAB_CHUNK", 7)  # 15 slices of the 101-token vocabulary, the last one short
    fused = perplexity(model, tokens, 16, 4, progress=False).ppl
    with torch.no_grad():
        w = tokens.view(9, 16)
        logits = model(w).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, 101), w[:, 1:].reshape(-1), reduction="none").view(9, 15)
    assert math.isclose(fused, math.exp(nll.mean(1).double().mean().item()), rel_tol=1e-6)
