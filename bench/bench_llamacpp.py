"""llama.cpp speed and fidelity of dense and pruned GGUFs, side by side in one process.

Each model (the dense one and every pruned directory given) is written with flap-exp's GGUF exporter, then:
- fidelity (`--windows N`): the first N WikiText-2 test windows (seqlen 128) through PyTorch and through
  llama.cpp (f32 KV cache): top-1 agreement over all positions and both perplexities;
- speed: prompt processing (one `--prompt`-token batch) and generation (`--gen` tokens, one at a time, after
  that prompt) in tokens/s, medians of `--repeats` interleaved rounds (machine load drifts alike for all);
- the FLOP limit of each speedup: dense FLOPs per token / pruned FLOPs per token (the linear layers, the head,
  and the attention scores at the prompt's mean context), i.e. the speedup if time were all FLOPs.
Writes `--out` (JSON) and prints a markdown table.
Usage: python bench/bench_llamacpp.py PRUNED_DIR... [--model smollm2-135m] [--type f32] [--prompt 512]
[--gen 64] [--threads 2] [--repeats 3] [--windows 16] [--out results/bench_llamacpp.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flap_exp.data import Corpus, load_text, tokenize
from flap_exp.export.gguf import write_gguf
from flap_exp.export.widths import Widths
from flap_exp.models import load_model
from flap_exp.persist import load_pruned

GGML_F32 = 0  # llama.cpp's GGML_TYPE_F32 (the KV cache of the fidelity runs; f16 is its default)
SEQLEN = 128  # the project's perplexity protocol


def flops_per_token(w: Widths, hidden: int, vocab: int, context: float) -> float:
    """Multiply-adds x 2 per token of the kept layer widths (not the GGUF's zero padding), the head and the
    attention scores."""
    total, head_dim = 2.0 * hidden * vocab, w.head_dim
    for h, kv, ff in zip(w.heads, w.kv_heads, w.channels, strict=True):
        total += 2.0 * hidden * head_dim * (2 * h + 2 * kv) + 2.0 * 3 * hidden * ff
        total += 2.0 * 2 * h * head_dim * context  # q.k and p.v over the context
    return total


def fidelity(llama_cpp, path: Path, model, ids: torch.Tensor, windows: int, threads: int) -> dict:
    x = ids[: windows * SEQLEN].view(windows, SEQLEN)
    with torch.no_grad():
        want = torch.cat([model(w[None]).logits for w in x]).double()
    llm = llama_cpp.Llama(str(path), n_ctx=SEQLEN, n_batch=SEQLEN, logits_all=True, verbose=False,
                          n_threads=threads, type_k=GGML_F32, type_v=GGML_F32)
    got = []
    for w in x:
        llm.reset()
        llm.eval(w.tolist())
        got.append(torch.from_numpy(np.array(llm.scores[:SEQLEN])))
    llm.close()
    got_t = torch.stack(got).double()

    def ppl(logits: torch.Tensor) -> float:
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        return float(nll.exp())
    return {"top1_agreement": float((got_t.argmax(-1) == want.argmax(-1)).double().mean()),
            "ppl_torch": ppl(want), "ppl_llamacpp": ppl(got_t)}


def speed_round(llama_cpp, path: Path, prompt: list[int], gen: int, threads: int) -> tuple[float, float]:
    llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + gen, n_batch=len(prompt), verbose=False,
                          n_threads=threads, n_threads_batch=threads)
    llm.eval(prompt[:8])  # warm-up: first-call allocations
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for tok in prompt[:gen]:
        llm.eval([tok])
    t2 = time.perf_counter()
    llm.close()
    return len(prompt) / (t1 - t0), gen / (t2 - t1)


def main() -> None:
    import llama_cpp
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pruned", nargs="*", help="pruned directories (flap-exp prune --out)")
    ap.add_argument("--model", default="smollm2-135m", help="the dense model they were pruned from")
    ap.add_argument("--type", default="f32", help="GGUF tensor type: f32, f16, q8_0")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 windows for fidelity (0: skip)")
    ap.add_argument("--data-path", default=None, help="WikiText-2 directory (default: ../shared/data, the Hub)")
    ap.add_argument("--out", default="results/bench_llamacpp.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dense = load_model(a.model)
    text = load_text(Corpus("wikitext2", "test", a.data_path))
    ids = tokenize(dense.tokenizer, text.text)
    prompt = ids[: a.prompt].tolist()
    cfg = dense.model.config
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
        models = {"dense": (dense.model, {"base_model": dense.identity})}
        for d in a.pruned:
            m, _, manifest = load_pruned(d)
            models[Path(d).name] = (m, manifest)
        for name, (m, manifest) in models.items():
            path = Path(tmp) / f"{name}.gguf"
            summary = write_gguf(m, manifest, path, a.type)
            rows[name] = {"arch": summary["arch"], "achieved_ratio": manifest.get("achieved_ratio", 0.0),
                          "gguf_bytes": path.stat().st_size, "path": path,
                          "feed_forward_length": summary["feed_forward_length"],
                          "flops_prefill": flops_per_token(Widths.of(m.config), cfg.hidden_size, cfg.vocab_size,
                                                           (a.prompt + 1) / 2),
                          "flops_gen": flops_per_token(Widths.of(m.config), cfg.hidden_size, cfg.vocab_size,
                                                       a.prompt + a.gen / 2)}
            if a.windows:
                rows[name].update(fidelity(llama_cpp, path, m, ids, a.windows, a.threads))
            print(name, {k: v for k, v in rows[name].items() if k != "path"}, flush=True)
        pp: dict[str, list[float]] = {n: [] for n in rows}
        tg: dict[str, list[float]] = {n: [] for n in rows}
        for _ in range(a.repeats):  # interleaved: load drift hits every model alike
            for name, r in rows.items():
                p, g = speed_round(llama_cpp, r["path"], prompt, a.gen, a.threads)
                pp[name].append(p)
                tg[name].append(g)
    base = rows["dense"]
    for name, r in rows.items():
        r.pop("path")
        r.update(pp_tok_s=statistics.median(pp[name]), tg_tok_s=statistics.median(tg[name]),
                 pp_runs=pp[name], tg_runs=tg[name])
        r["pp_speedup"] = r["pp_tok_s"] / statistics.median(pp["dense"])
        r["tg_speedup"] = r["tg_tok_s"] / statistics.median(tg["dense"])
        r["pp_flop_limit"] = base["flops_prefill"] / r["flops_prefill"]
        r["tg_flop_limit"] = base["flops_gen"] / r["flops_gen"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"settings": vars(a), "llama_cpp_python": llama_cpp.__version__,
                                       "models": rows}, indent=1))
    print(f"\n| model | arch | ratio | pp tok/s | pp speedup | FLOP limit | of limit | tg tok/s | tg speedup | "
          f"FLOP limit | top-1 | ppl torch | ppl llama.cpp |\n|{'---|' * 13}")
    for name, r in rows.items():
        print(f"| {name} | {r['arch']} | {r['achieved_ratio']:.3f} | {r['pp_tok_s']:.0f} | {r['pp_speedup']:.2f} | "
              f"{r['pp_flop_limit']:.2f} | {r['pp_speedup'] / r['pp_flop_limit']:.0%} | {r['tg_tok_s']:.1f} | "
              f"{r['tg_speedup']:.2f} | {r['tg_flop_limit']:.2f} | {r.get('top1_agreement', float('nan')):.4f} | "
              f"{r.get('ppl_torch', float('nan')):.2f} | {r.get('ppl_llamacpp', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
