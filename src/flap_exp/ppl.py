"""Perplexity with FLAP's protocol: non-overlapping windows of `seqlen` tokens, the tail dropped, each
window scored cold; PPL = exp(mean over windows of the mean next-token cross-entropy)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
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


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int = 128, batch_size: int = 8,
               max_windows: int | None = None, progress: bool = True) -> Perplexity:
    n = tokens.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1 or seqlen < 2:
        raise FlapError(f"{tokens.numel()} tokens hold no full window of seqlen {seqlen}")
    windows = tokens[: n * seqlen].view(n, seqlen)
    device = next(model.parameters()).device
    total = 0.0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        total += nll.view(batch.shape[0], -1).mean(1).double().sum().item()
    return Perplexity(math.exp(total / n), n, n * seqlen, seqlen)
