"""`--to gguf` without llama.cpp: a numpy forward written from llama.cpp's `llama`/`deci` graph (interleaved-pair
RoPE, per-layer head/k-v-head/feed-forward arrays, an attention-free layer passing its input on, optional
biases) reads the exported file back with the gguf package and must give the pruned model's logits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flap_exp import cli
from flap_exp.persist import load_pruned

from helpers.models import save_pruned_dir


def rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_pairs(x: np.ndarray, theta: float) -> np.ndarray:
    """llama.cpp's normal RoPE: consecutive pairs (2i, 2i+1) of each head rotated by pos * theta^(-2i/hd)."""
    t, _, hd = x.shape
    ang = np.arange(t)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)[None]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    return out


def gguf_forward(path: Path, ids: list[int]) -> np.ndarray:
    from gguf import GGUFReader
    r = GGUFReader(path)
    arch = r.fields["general.architecture"].contents()

    def key(k: str, n: int | None = None):
        v = r.fields[f"{arch}.{k}"].contents()
        return [v] * n if n is not None and not isinstance(v, list) else v
    n = key("block_count")
    heads, kvh, ffl = key("attention.head_count", n), key("attention.head_count_kv", n), key("feed_forward_length", n)
    hd, eps, theta = key("attention.key_length"), key("attention.layer_norm_rms_epsilon"), key("rope.freq_base")
    w = {t.name: np.array(t.data, dtype=np.float64) for t in r.tensors}
    x = w["token_embd.weight"][ids]
    causal = np.triu(np.full((len(ids), len(ids)), -np.inf), 1)
    for i in range(n):
        b = {k.removeprefix(f"blk.{i}."): v for k, v in w.items() if k.startswith(f"blk.{i}.")}
        lin = lambda name, h, b=b: h @ b[f"{name}.weight"].T + b.get(f"{name}.bias", 0)  # noqa: E731
        ffn_inp = x
        if heads[i]:
            h = rms(x, b["attn_norm.weight"], eps)
            q = rope_pairs(lin("attn_q", h).reshape(len(ids), heads[i], hd), theta)
            k = rope_pairs(lin("attn_k", h).reshape(len(ids), kvh[i], hd), theta)
            v = lin("attn_v", h).reshape(len(ids), kvh[i], hd)
            g = heads[i] // kvh[i]
            ctx = []
            for j in range(heads[i]):
                s = q[:, j] @ k[:, j // g].T / np.sqrt(hd) + causal
                p = np.exp(s - s.max(-1, keepdims=True))
                ctx.append((p / p.sum(-1, keepdims=True)) @ v[:, j // g])
            ffn_inp = x + lin("attn_output", np.concatenate(ctx, -1))
        if ffl[i] == 0:
            continue
        h = rms(ffn_inp, b["ffn_norm.weight"], eps)
        gate = lin("ffn_gate", h)
        x = ffn_inp + lin("ffn_down", gate / (1 + np.exp(-gate)) * lin("ffn_up", h))
    head = w.get("output.weight", w["token_embd.weight"])
    return rms(x, w["output_norm.weight"], eps) @ head.T


@pytest.mark.parametrize("groups, channels", [
    ([1, 1, 1], [30, 30, 30]),
    ([2, 1, 2], [48, 20, 33]),
    ([2, 1, 0], [40, 0, 20]),
    ([0, 2, 1], [10, 30, 48]),
], ids=["uniform", "adaptive", "empty-blocks", "empty-layer0"])
@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True}],
                         ids=["untied", "tied", "own-biases"])
def test_the_file_computes_the_pruned_model(tmp_path, capsys, groups, channels, kw):
    src = save_pruned_dir(tmp_path / "pruned", groups, channels, **kw)
    out = tmp_path / "model.gguf"
    assert cli.main(["export", str(src), "--to", "gguf", str(out)]) == 0, capsys.readouterr().err
    ids = list(range(2, 34))
    model, _, _ = load_pruned(src)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double().numpy()
    got = gguf_forward(out, ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
