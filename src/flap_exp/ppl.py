"""Perplexity with FLAP's protocol: non-overlapping windows of `seqlen` tokens, the tail dropped, each
window scored cold; PPL = exp(mean over windows of the mean next-token cross-entropy). The per-window NLLs'
mean and standard deviation come with it, and the 95% interval over windows they give (uncertainty.py)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibrate import layer_inputs
from .errors import FlapError
from .store import LayerStore, as_store
from .uncertainty import nll_stats, ppl_interval


@dataclass
class Perplexity:
    ppl: float
    windows: int
    tokens: int
    seqlen: int
    nll_mean: float | None = None  # mean of the per-window mean NLLs (ppl = exp of it); None where not kept
    nll_std: float | None = None  # their sample standard deviation (ddof=1); None for one window
    window_nll: list[float] | None = field(default=None, repr=False)  # per window, in order (not in to_dict)

    @property
    def interval95(self) -> tuple[float, float] | None:
        """95% interval of the perplexity over windows (uncertainty.ppl_interval); None for one window."""
        return None if self.nll_mean is None else ppl_interval(self.nll_mean, self.nll_std, self.windows)

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["window_nll"]  # up to thousands of numbers: the record of a stage keeps them, a CLI line does not
        ci = self.interval95
        return out | {"ppl_ci95": None if ci is None else list(ci)}


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows of the token stream, the tail dropped (FLAP's protocol)."""
    n = tokens.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1 or seqlen < 2:
        raise FlapError(f"{tokens.numel()} tokens hold no full window of seqlen {seqlen}")
    return tokens[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(source: nn.Module | LayerStore, tokens: torch.Tensor, seqlen: int = 128, batch_size: int = 8,
               max_windows: int | None = None, progress: bool = True) -> Perplexity:
    """Layer-major over chunks of windows (a batch for a resident model, as many windows as the memory budget
    holds for a streamed one, so that its weights are read once per chunk); the head a slice of the
    vocabulary at a time (chunked_nll)."""
    store = as_store(source)
    windows = eval_windows(tokens, seqlen, max_windows)
    n = windows.shape[0]
    # a batch's float32 logits of one vocabulary slice and their exponentials come on top of the states
    extra = 2 * min(batch_size, n) * seqlen * min(VOCAB_CHUNK, store.config.vocab_size) * 4
    chunk = store.chunk_windows(n, batch_size, seqlen, "perplexity", extra)
    softcap = getattr(store.config, "final_logit_softcapping", None)  # the model's own head caps its logits
    total, first, nlls = 0.0, 0, []
    for part in tqdm(windows.split(chunk), desc="perplexity", unit="chunk", disable=not progress):
        hs, kws = layer_inputs(store, part, batch_size)
        for i in range(store.num_layers):
            with store.layer(i) as layer:
                hs = [layer(h, **kw[i]) for h, kw in zip(hs, kws, strict=True)]
        with store.head() as (norm, head):
            for h, batch in zip(hs, part.split(batch_size), strict=True):
                per_window = chunked_nll(norm(h)[:, :-1], head, batch[:, 1:].to(h.device),
                                         softcap).mean(1).double()
                bad = (~torch.isfinite(per_window)).nonzero().flatten()
                if bad.numel():  # a NaN is an error, never a result (and NaN is not valid JSON)
                    raise FlapError(f"non-finite loss (NaN/Inf) in perplexity window {first + int(bad[0])} of {n}: "
                                    "the model's outputs are not finite (check its weights and dtype)")
                total += per_window.sum().item()  # the headline's own sum (the fidelity tests pin it)
                nlls += per_window.tolist()
                first += batch.shape[0]
        del hs
    mean, std = nll_stats(nlls)
    return Perplexity(_finite_exp(total / n), n, n * seqlen, seqlen, mean, std, nlls)


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per position, [B, T]: logsumexp minus the target's logit, on the logits
    as they are (no reshaped copy and no log-softmax tensor of the vocabulary's size, which F.cross_entropy
    writes; equal to it within float32 rounding, tests/test_ppl.py)."""
    return torch.logsumexp(logits, -1) - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


# Vocabulary columns of the LM head that chunked_nll computes at once: [rows, 4096] float32 logits (16 MiB for
# 1024 rows) stay in cache and each slice of the head's weight is read once, where the model's own head
# writes the whole [B, T, vocab] tensor (200 MiB for 8 x 128 x 49,152) and reads it back. On this CPU the
# head + loss this way took 0.60 s against 0.65 s for the head's logits alone (1016 rows, one thread).
VOCAB_CHUNK = 4096


def chunked_nll(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                softcap: float | None = None) -> torch.Tensor:
    """next_token_nll of head(hidden), [B, T], a slice of the vocabulary at a time with a running
    log-sum-exp (max-shifted, float32): the same numbers as the full logits (tests/test_ppl.py) without a
    [B, T, vocab] tensor. A NaN logit propagates to the loss (and perplexity refuses it). `softcap`: the
    logits become cap * tanh(logits / cap) first, as the model's own head does (config.final_logit_softcapping,
    Gemma 2)."""
    b, t, h = hidden.shape
    x, y = hidden.reshape(b * t, h), targets.reshape(b * t)
    top = torch.full((b * t,), -math.inf, device=x.device)
    total = torch.zeros(b * t, device=x.device)
    target = torch.zeros(b * t, device=x.device)
    for j in range(0, head.out_features, VOCAB_CHUNK):
        k = min(j + VOCAB_CHUNK, head.out_features)
        logits = F.linear(x, head.weight[j:k], None if head.bias is None else head.bias[j:k]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        new_top = torch.maximum(top, logits.amax(-1))
        total = total * torch.exp(top - new_top) + torch.exp(logits - new_top[:, None]).sum(-1)
        top = new_top
        inside = ((y >= j) & (y < k)).nonzero().squeeze(-1)
        target[inside] = logits[inside, y[inside] - j]
    return (top + total.log() - target).view(b, t)


def _finite_exp(mean_nll: float) -> float:
    """exp of the mean loss; one that overflows float64 is refused rather than reported as inf."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        raise FlapError(f"perplexity overflows (mean loss {mean_nll:.4g} nats): "
                        "the model's outputs are degenerate") from None
