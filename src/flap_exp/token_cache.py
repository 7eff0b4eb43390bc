"""Token streams cached on disk: a corpus is tokenized once per (text, tokenizer), not once per stage.

Every perplexity and calibration stage tokenizes its whole corpus (WikiText-2's test split: 2.1 s, the Wikipedia
calibration text: 3.1 s with SmolLM2's tokenizer on a 2.0 GHz AVX2 core), though the text and the tokenizer are
the same in all of them; the quick study runs ~75 such stages. The ids are kept under the flap-exp cache
(FLAP_EXP_CACHE, `tokens/`) as int32 .npy, named by the sha256 of the text and of the tokenizer's whole state
(its serialized pipeline: vocabulary, merges, normalizer, pre- and post-processor, which decide the special
tokens added), the tokenizer's class and special-token flags, and the transformers/tokenizers versions. So a
hit returns exactly the ids `data.tokenize` would. A tokenizer without a serialized state (a slow, pure-Python
one) is never cached; a file that cannot be read is recomputed and rewritten; writes are atomic.
The pipeline's stages use it; the CLI does not: a one-off `flap-exp prune` or `ppl` writes nothing but its --out
(tests/test_integrity.py), and it tokenizes once per run anyway.
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch

from .atomic import atomic_file
from .data import tokenize
from .sources import cache_root

log = logging.getLogger(__name__)


def tokenizer_fingerprint(tokenizer) -> str | None:
    """sha256 of everything that decides the ids of `data.tokenize`, or None when it cannot be known."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import tokenizers  # deferred on purpose: only a fast tokenizer has them (transformers depends on it)
    import transformers
    h = hashlib.sha256(backend.to_str().encode("utf-8"))
    for extra in (type(tokenizer).__qualname__, getattr(tokenizer, "add_bos_token", None),
                  getattr(tokenizer, "add_eos_token", None), transformers.__version__, tokenizers.__version__):
        h.update(b"\0" + repr(extra).encode("utf-8"))
    return h.hexdigest()


def cached_tokenize(tokenizer, text: str) -> torch.Tensor:
    """`data.tokenize(tokenizer, text)`, read from the cache when this text met this tokenizer before."""
    fp = tokenizer_fingerprint(tokenizer)
    if fp is None:
        return tokenize(tokenizer, text)
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32] + "-" + fp[:32]
    path = cache_root() / "tokens" / f"{key}.npy"
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
        except (OSError, ValueError) as err:  # unreadable: recomputed and rewritten below
            log.warning("token cache %s unreadable (%s); tokenizing again", path, err)
    ids = tokenize(tokenizer, text)
    if ids.numel() and int(ids.max()) < 2**31 and int(ids.min()) >= 0:  # int32 holds every id of a real vocabulary
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.save(f, ids.numpy().astype(np.int32), allow_pickle=False)
    return ids
