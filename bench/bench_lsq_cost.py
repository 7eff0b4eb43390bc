"""What lsq's pass costs next to one plain forward over the same calibration tokens (SmolLM2-135M).

Times, in one process and in this order, repeated: a plain batched forward (decoder + last-token logits),
the calibration pass (`collect_stats`) and the lsq pass (sequential form) for FLAP (wifv, al_am) at
`--ratio`; the solves are timed inside the pass. Prints the medians as ratios to the plain forward and
writes reports/bench_lsq_cost.json. It also counts the pass's multiply-adds per token against a dense
decoder layer's (`macs`): any exact least-squares fit from every calibration token must form the kept
columns of the second moments, Σ[:, K] (d_in x |K| per token and projection), which a calibration pass of
per-channel statistics does not; the count shows how much of the pass that arithmetic is.

    python bench/bench_lsq_cost.py --n 32 --ratio 0.5 --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_compensation import plain_forward  # the same reference forward as the compensation benchmark

import flap_exp.compensation.lsq as lsq_module
from flap_exp.arch import ArchView
from flap_exp.calibrate import collect_stats
from flap_exp.compensation.base import CompensationConfig
from flap_exp.compensation.lsq import lsq_compensation
from flap_exp.data import Corpus, calibration_windows, load_text, tokenize
from flap_exp.metrics import channel_scores, get_metric
from flap_exp.models import load_model
from flap_exp.structures import StructureOptions, get_structure

ROOT = Path(__file__).resolve().parents[1]


def macs(arch: ArchView, sel) -> dict[str, float]:
    """Multiply-adds per token, averaged over layers, as multiples of one dense layer's linear layers.

    dense:     q, k, v, o, gate, up, down (what a plain forward and the calibration pass compute)
    lsq pass:  q, k, v, gate, up for every unit (a pruned unit's input is a row of Σ[:, K]), the refitted
               o/down on the kept inputs (the stream to the next layer) and the moments Σ[:, K] of o and down
    """
    d, f, da = arch.hidden_size, arch.intermediate_size, arch.attn_channels
    kv = arch.num_kv_heads * arch.head_dim
    dense = d * da + 2 * d * kv + da * d + 3 * d * f
    kept = [(int(sel.channel_mask(i, arch).sum()), int(sel.keep_channels[i].sum())) for i in range(arch.num_layers)]
    n = len(kept)
    units = d * da + 2 * d * kv + 2 * d * f
    stream = sum(d * ka + d * km for ka, km in kept) / n
    moments = sum(da * ka + f * km for ka, km in kept) / n
    return {"dense_layer": 1.0, "lsq_units": units / dense, "lsq_kept_projections": stream / dense,
            "lsq_moments": moments / dense, "lsq_pass": (units + stream + moments) / dense}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32, help="calibration windows of 128 tokens")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench_lsq_cost.json"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    lm = load_model("smollm2-135m")
    model, arch = lm.model, ArchView.from_config(lm.model.config)
    windows = calibration_windows(tokenize(lm.tokenizer, load_text(Corpus("wiki"), join=" ").text), a.n, 128, seed=0)
    stats = collect_stats(model, windows, 8, progress=False)
    sel = get_structure("al_am")(channel_scores(get_metric("wifv"), model, stats), arch, a.ratio, StructureOptions())
    solve_s = [0.0]
    real_solve = lsq_module.lsq_solve

    def timed_solve(*args, **kw):
        t = time.perf_counter()
        out = real_solve(*args, **kw)
        solve_s[0] += time.perf_counter() - t
        return out

    lsq_module.lsq_solve = timed_solve  # type: ignore[assignment]  # time the solves inside the pass
    plain_forward(model, windows[:8])  # warm-up
    runs: dict[str, list[float]] = {"plain_forward": [], "calibration": [], "lsq": [], "lsq_solves": []}
    for _ in range(a.repeats):
        for name, fn in (("plain_forward", lambda: plain_forward(model, windows)),
                         ("calibration", lambda: collect_stats(model, windows, 8, progress=False)),
                         ("lsq", lambda: lsq_compensation(model, sel, arch, windows,
                                                          CompensationConfig("lsq", 0.01, "sequential"),
                                                          progress=False))):
            solve_s[0] = 0.0
            t = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t)
            if name == "lsq":
                runs["lsq_solves"].append(solve_s[0])
    med = {k: statistics.median(v) for k, v in runs.items()}
    res = {"macs_over_dense_layer": macs(arch, sel),
           "n": a.n, "ratio": a.ratio, "achieved_ratio": sel.achieved_ratio(arch), "threads": torch.get_num_threads(),
           "repeats": a.repeats, "seconds": runs,
           "over_plain_forward": {k: v / med["plain_forward"] for k, v in med.items()}}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"SmolLM2-135M, {a.n} x 128 tokens, FLAP {a.ratio}, {res['threads']} thread(s), median of {a.repeats}")
    for k, v in res["over_plain_forward"].items():
        print(f"  {k:<14}{med[k]:>8.2f} s  {v:>5.2f}x the plain forward")
    print("multiply-adds per token, x a dense layer's: "
          + ", ".join(f"{k} {v:.2f}" for k, v in res["macs_over_dense_layer"].items()))


if __name__ == "__main__":
    main()
