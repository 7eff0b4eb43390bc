"""Perplexity with FLAP's protocol: non-overlapping windows of `seqlen` tokens, the tail dropped, each
window scored cold; PPL = exp(mean over windows of the mean next-token cross-entropy)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .errors import FlapError


@dataclass
class Perplexity:
    ppl: float
    windows: int
    tokens: int
    seqlen: int

    def to_dict(self) -> dict:
        return asdict(self)


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows of the token stream, the tail dropped (FLAP's protocol)."""
    n = tokens.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1 or seqlen < 2:
        raise FlapError(f"{tokens.numel()} tokens hold no full window of seqlen {seqlen}")
    return tokens[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int = 128, batch_size: int = 8,
               max_windows: int | None = None, progress: bool = True) -> Perplexity:
    windows = eval_windows(tokens, seqlen, max_windows)
    n = windows.shape[0]
    device = next(model.parameters()).device
    total, first = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # a view for float32 models
        per_window = next_token_nll(logits, batch[:, 1:]).mean(1).double()
        bad = (~torch.isfinite(per_window)).nonzero().flatten()
        if bad.numel():  # a NaN is an error, never a result (and NaN is not valid JSON)
            raise FlapError(f"non-finite loss (NaN/Inf) in perplexity window {first + int(bad[0])} of {n}: the "
                            "model's outputs are not finite (check its weights and dtype)")
        total += per_window.sum().item()
        first += batch.shape[0]
    return Perplexity(_finite_exp(total / n), n, n * seqlen, seqlen)


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per position, [B, T]: logsumexp minus the target's logit, on the logits
    as they are (no reshaped copy and no log-softmax tensor of the vocabulary's size, which F.cross_entropy
    writes; equal to it within float32 rounding, tests/test_ppl.py)."""
    return torch.logsumexp(logits, -1) - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _finite_exp(mean_nll: float) -> float:
    """exp of the mean loss; one that overflows float64 is refused rather than reported as inf."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        raise FlapError(f"perplexity overflows (mean loss {mean_nll:.4g} nats): "
                        "the model's outputs are degenerate") from None
