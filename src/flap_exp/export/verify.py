"""The exported model computes what the pruned one does: checked on a short random sequence before writing."""
from __future__ import annotations

import torch

from ..errors import FlapError

#: a few positions are enough to catch a wrong layout (a permuted head, a missing bias); cheap for any size
PROBE_TOKENS = 16


@torch.no_grad()
def check_same_logits(ref, other, vocab_size: int, seed: int = 0) -> float:
    """Max |logit difference| of `other` against `ref` on one probe sequence; FlapError if they disagree beyond
    float rounding (relative to the logits' scale) or if either is not finite."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (1, PROBE_TOKENS), generator=g)
    device = next(ref.parameters()).device
    a = ref(ids.to(device)).logits.float().cpu()
    b = other(ids.to(device)).logits.float().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise FlapError("the pruned model's logits are not finite on a probe sequence; nothing exported")
    diff = float((a - b).abs().max())
    scale = float(a.abs().max()) or 1.0
    # float32 sums in another order differ by ~1e-6 of the scale; half precision by ~1e-3
    tol = 1e-5 if next(ref.parameters()).dtype == torch.float32 else 1e-2
    if diff > tol * scale:
        raise FlapError(f"the exported model's logits differ from the pruned model's by {diff:.3g} "
                        f"(scale {scale:.3g}); nothing written")
    return diff
