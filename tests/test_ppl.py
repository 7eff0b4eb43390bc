import math

import torch
import torch.nn.functional as F

from flap_exp.ppl import perplexity

from conftest import tiny_model


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
