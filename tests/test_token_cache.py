"""token_cache.cached_tokenize: the ids of data.tokenize, read back from the flap-exp cache on a second call, keyed by
the text and the tokenizer's whole state; an unreadable file is recomputed; a tokenizer without state is not cached."""
import numpy as np
import pytest
import torch

from flap_exp.data import tokenize
from flap_exp.token_cache import cached_tokenize, tokenizer_fingerprint

from helpers.models import word_tokenizer

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog"]
TEXT = "the cat sat on the mat . a dog sat on a cat " * 50


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAP_EXP_CACHE", str(tmp_path))
    return tmp_path / "tokens"


def files(cache) -> list:
    return sorted(cache.glob("*.npy")) if cache.exists() else []


def test_first_call_writes_the_ids_and_the_second_reads_them(cache, monkeypatch):
    tok = word_tokenizer(WORDS)
    want = tokenize(tok, TEXT)
    got = cached_tokenize(tok, TEXT)
    assert torch.equal(got, want) and got.dtype == want.dtype == torch.int64
    assert len(files(cache)) == 1
    assert np.array_equal(np.load(files(cache)[0]), want.numpy())

    def refuse(*a, **k):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(type(tok), "__call__", refuse)
    again = cached_tokenize(tok, TEXT)
    assert torch.equal(again, want) and again.dtype == torch.int64


def test_another_text_or_tokenizer_state_is_another_entry(cache):
    tok = word_tokenizer(WORDS)
    cached_tokenize(tok, TEXT)
    cached_tokenize(tok, TEXT + " dog")
    other = word_tokenizer(WORDS + ["bird"])  # one more word: another vocabulary, other ids possible
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    assert torch.equal(cached_tokenize(other, TEXT), tokenize(other, TEXT))
    assert len(files(cache)) == 3


def test_unreadable_file_is_recomputed_and_rewritten(cache):
    tok = word_tokenizer(WORDS)
    cached_tokenize(tok, TEXT)
    f = files(cache)[0]
    f.write_bytes(b"not a numpy file")
    assert torch.equal(cached_tokenize(tok, TEXT), tokenize(tok, TEXT))
    assert np.array_equal(np.load(f), tokenize(tok, TEXT).numpy())


def test_tokenizer_without_serialized_state_is_not_cached(cache):
    class Slow:  # a pure-Python tokenizer: no backend_tokenizer, so nothing says when its ids would change
        def __call__(self, text, return_tensors=None, verbose=False):
            return type("Enc", (), {"input_ids": torch.tensor([[1, 2, 3]])})()

    assert tokenizer_fingerprint(Slow()) is None
    assert cached_tokenize(Slow(), TEXT).tolist() == [1, 2, 3]
    assert files(cache) == []
