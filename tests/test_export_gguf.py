"""`flap-exp export DIR --to gguf OUT`: run in llama.cpp (llama-cpp-python), the GGUF gives the pruned model's
logits: top-1 agreement >= 99% and perplexity within 1% on WikiText-2 windows, for uniform and per-layer widths,
layers without attention or MLP included; the per-layer arrays in the file are the kept widths."""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch

from flap_exp import cli
from flap_exp.persist import load_pruned

from helpers.models import WIKITEXT2, save_pruned_dir

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[gguf]')")

WINDOWS, SEQLEN = 4, 64
GGML_F32 = 0  # llama.cpp's GGML_TYPE_F32, for the KV cache (its default, f16, rounds keys and values)


def wiki_words_and_windows(n_words: int = 300) -> tuple[list[str], list[list[int]]]:
    """The commonest WikiText-2 test words as a vocabulary (the word tokenizer's ids: <unk> 0, </s> 1, words
    from 2), and the first windows of the text as those ids."""
    words = (WIKITEXT2 / "wiki.test.raw").read_text(encoding="utf-8")[:200_000].split()
    vocab = [w for w, _ in collections.Counter(words).most_common(n_words)]
    ids = {w: i + 2 for i, w in enumerate(vocab)}
    return vocab, [[ids.get(w, 0) for w in words[i * SEQLEN:(i + 1) * SEQLEN]] for i in range(WINDOWS)]


@pytest.fixture(scope="module")
def wiki(wikitext_dir):
    return wiki_words_and_windows()


def torch_logits(src: Path, windows: list[list[int]]) -> np.ndarray:
    model, _, _ = load_pruned(src)
    with torch.no_grad():
        return model(torch.tensor(windows)).logits.numpy()


def llama_logits(path: Path, windows: list[list[int]], gguf_kv_f32: bool = True) -> np.ndarray:
    kv = {"type_k": GGML_F32, "type_v": GGML_F32} if gguf_kv_f32 else {}
    llm = llama_cpp.Llama(str(path), n_ctx=SEQLEN, n_batch=SEQLEN, logits_all=True, verbose=False, n_threads=1, **kv)
    out = []
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[:len(ids)]))
    return np.stack(out)


def ppl(logits: np.ndarray, windows: list[list[int]]) -> float:
    x = logits[:, :-1].astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    tgt = np.take_along_axis(x, np.array(windows)[:, 1:, None], -1)[..., 0]
    return float(np.exp((lse - tgt).mean()))


def export(src: Path, out: Path, capsys, *extra: str) -> None:
    rc = cli.main(["export", str(src), "--to", "gguf", str(out), *extra])
    assert rc == 0, capsys.readouterr().err


@pytest.mark.parametrize("groups, channels, arch", [
    ([1, 1, 1], [30, 30, 30], "llama"),  # feed-forward padded with 2 zero channels
    ([2, 1, 2], [48, 20, 33], "deci"),
    ([2, 1, 0], [40, 0, 20], "deci"),  # layer 2 without attention (bias folded), layer 1 without MLP
    ([0, 2, 1], [10, 30, 48], "deci"),  # layer 0 without attention: one zero group
], ids=["uniform", "adaptive", "empty-blocks", "empty-layer0"])
def test_llama_cpp_runs_the_pruned_model(tmp_path, capsys, wiki, groups, channels, arch):
    from gguf import GGUFReader
    vocab, windows = wiki
    src = save_pruned_dir(tmp_path / "pruned", groups, channels, words=vocab)
    out = tmp_path / "model.gguf"
    export(src, out, capsys)
    fields = GGUFReader(out).fields
    assert fields["general.architecture"].contents() == arch
    if arch == "deci":  # the kept widths, as per-layer arrays (an attention-less layer 0 keeps one zero group)
        assert fields["deci.attention.head_count_kv"].contents() == [g or (i == 0) for i, g in enumerate(groups)]
        assert fields["deci.feed_forward_length"].contents() == [max(32, -(-c // 32) * 32) for c in channels]
    want, got = torch_logits(src, windows), llama_logits(out, windows)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.99
    assert abs(ppl(got, windows) / ppl(want, windows) - 1) <= 0.01


@pytest.mark.parametrize("gtype, agree", [("f16", 0.95), ("q8_0", 0.9)])
def test_smaller_types_load_and_agree(tmp_path, capsys, wiki, gtype, agree):
    vocab, windows = wiki
    src = save_pruned_dir(tmp_path / "pruned", [2, 1, 2], [48, 20, 32], words=vocab)
    out = tmp_path / "model.gguf"
    export(src, out, capsys, "--gguf-type", gtype)
    f32 = tmp_path / "f32.gguf"
    export(src, f32, capsys)
    assert out.stat().st_size < f32.stat().st_size
    got, want = llama_logits(out, windows, gguf_kv_f32=False), torch_logits(src, windows)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= agree


def test_existing_gguf_path_is_refused(tmp_path, capsys):
    src = save_pruned_dir(tmp_path / "pruned", [1, 1], [20, 20])
    out = tmp_path / "model.gguf"
    out.write_bytes(b"keep me")
    assert cli.main(["export", str(src), "--to", "gguf", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is an existing file; refusing to replace it" in err and "Traceback" not in err
    assert out.read_bytes() == b"keep me"
