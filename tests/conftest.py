"""Shared fixtures: tiny random LLaMA models (MHA and GQA, tests/helpers/models.py) and ../shared data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import flap_exp  # noqa: F401  (registers flap_llama)

from helpers.models import WIKITEXT2, tiny_model

# `make test` runs the files on pytest-xdist workers (one per core, up to 4): each worker takes its share of
# the cores, and so do the stage subprocesses it starts (OMP_NUM_THREADS is inherited), so two workers on
# two cores do not fight over four threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
torch.set_num_threads(_THREADS)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))


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


# The longest files first: `make test` runs xdist with `--dist loadfile --no-loadscope-reorder`, so files are
# handed out in this order, each long one starting on its own worker while the short files fill the other workers
# at the end. The order inside a file is kept (test_pipeline's tests run in order on one repository).
_LONG_FIRST = ("test_real_model.py", "test_pipeline.py", "test_parallel.py", "test_cluster.py", "test_zeroshot.py",
               "test_stream_study.py", "test_gemma3_embedded.py", "test_fidelity.py", "test_integrity.py",
               "test_smoke.py", "test_kl_search_pipeline.py", "test_streaming.py")
# ^ by each file's summed test time in the suite of 2026-12-05 (235, 198, 179, 161, 147, 107, 107, 63, 62, 61, 57,
# 38 s), docs/development.md


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: _LONG_FIRST.index(item.path.name) if item.path.name in _LONG_FIRST
               else len(_LONG_FIRST))
