"""Shared fixtures: tiny random LLaMA models (MHA and GQA) and paths to ../shared data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flap_exp  # noqa: F401  (registers flap_llama)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WIKITEXT2 = SHARED / "data" / "wikitext-2-raw"

# `make test` runs the files on pytest-xdist workers (one per core, up to 4): each worker takes its share of
# the cores, and so do the stage subprocesses it starts (OMP_NUM_THREADS is inherited), so two workers on
# two cores do not fight over four threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
torch.set_num_threads(_THREADS)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))


def tiny_config(heads: int = 4, kv: int = 2, layers: int = 3, hidden: int = 32, inter: int = 48,
                head_dim: int = 8, vocab: int = 101, **kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                       max_position_embeddings=128, tie_word_embeddings=False, **kw)


def tiny_model(seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**kw)).eval()
    with torch.no_grad():  # default init is tiny (std 0.02); larger weights give non-trivial activations
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(params=[(4, 2), (4, 4)], ids=["gqa", "mha"])
def model(request):
    heads, kv = request.param
    return tiny_model(heads=heads, kv=kv)


@pytest.fixture
def windows():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 101, (10, 16), generator=g)


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    if not (WIKITEXT2 / "wiki.test.raw").exists():
        pytest.fail(f"tests need the WikiText-2 test split at {WIKITEXT2} (../shared/data beside the checkout)")
    return WIKITEXT2


# The longest files first: under xdist (`--dist loadfile`) each starts at once on its own worker and the
# short files fill the other workers meanwhile. The order inside a file is kept (test_pipeline's tests
# run in order on one repository).
_LONG_FIRST = ("test_pipeline.py", "test_parallel.py", "test_real_model.py", "test_zeroshot.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: _LONG_FIRST.index(item.path.name) if item.path.name in _LONG_FIRST
               else len(_LONG_FIRST))
