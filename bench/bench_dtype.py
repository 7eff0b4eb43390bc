"""float32 against bfloat16 forward passes on SmolLM2-135M: what bf16 changes and what it saves.

Per dtype, in its own process (so that the peak RSS is that dtype's): dense perplexity on WikiText-2 test
(64 windows of 128 tokens), calibration on N=64 windows of the Wikipedia text (the CLI's default corpus,
T=128, seed 0), FLAP (wifv, al_am, bias) at 0.2 and 0.5 from that one calibration, and the pruned models'
perplexity in their own dtype; the bf16 process also evaluates its selections and biases on the float32
model. Statistics are float64 in both (stats.py). Wall times are medians of `--repeats` runs; the CPU is
shared, so the load average before and after is printed with them. Prints measured ratios, asserts nothing.

WikiText-2 from FLAP_EXP_WIKITEXT2 or ../shared/data/wikitext-2-raw.
Usage: python bench/bench_dtype.py [--repeats 3] [--json reports/bench_dtype.json]
       python bench/bench_dtype.py --interleaved 5   (timing only: the dtypes alternating under the same load)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from flap_exp.arch import ArchView
from flap_exp.calibrate import collect_stats
from flap_exp.compensation.bias import compensation_biases
from flap_exp.data import Corpus, calibration_windows, load_text, tokenize
from flap_exp.metrics import channel_scores, get_metric
from flap_exp.models import load_model
from flap_exp.ppl import perplexity
from flap_exp.runtime import native_bf16, resolve_dtype
from flap_exp.selection import Selection
from flap_exp.structures import StructureOptions, get_structure
from flap_exp.surgery import prune_model

MODEL, N, T, EVAL_WINDOWS, RATIOS = "smollm2-135m", 64, 128, 64, (0.2, 0.5)
WIKITEXT2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw"  # ../shared
if WIKITEXT2.is_dir():
    os.environ.setdefault("FLAP_EXP_WIKITEXT2", str(WIKITEXT2))


def median_time(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times), times


def pruned(base, stats, sel: Selection):
    m, arch = copy.deepcopy(base), ArchView.from_config(base.config)
    prune_model(m, sel, compensation_biases(base, stats, sel, arch), arch)
    return m


def one_dtype(name: str, repeats: int) -> dict:
    """Everything measured in one dtype (run in a child process)."""
    dtype = getattr(torch, name)
    lm = load_model(MODEL, dtype=dtype)
    base, tok = lm.model, lm.tokenizer
    windows = calibration_windows(tokenize(tok, load_text(Corpus("wiki"), join=" ").text), N, T, seed=0)
    evals = tokenize(tok, load_text(Corpus("wikitext2", "test")).text)

    def ppl(m):
        return perplexity(m, evals, T, 8, EVAL_WINDOWS, progress=False).ppl

    dense, t_ppl, ppl_runs = median_time(lambda: ppl(base), repeats)
    stats, t_cal, cal_runs = median_time(lambda: collect_stats(base, windows, 8, progress=False), repeats)
    assert all(s.attn.mean.dtype == torch.float64 and s.mlp.m2.dtype == torch.float64 for s in stats)
    out = {"dtype": name, "dense_ppl": dense, "ppl_seconds": t_ppl, "ppl_runs": ppl_runs,
           "calib_seconds": t_cal, "calib_runs": cal_runs, "pruned": {}}
    arch = ArchView.from_config(base.config)
    for ratio in RATIOS:
        sel = get_structure("al_am")(channel_scores(get_metric("wifv"), base, stats), arch, ratio,
                                     StructureOptions())
        out["pruned"][str(ratio)] = {"ppl": ppl(pruned(base, stats, sel)), "selection": sel.to_json(),
                                     "achieved_ratio": sel.achieved_ratio(arch)}
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dtype != torch.float32:  # this dtype's selections and biases, run in float32
        del base
        f32 = load_model(MODEL, dtype=torch.float32).model
        for ratio in RATIOS:
            sel = Selection.from_json(out["pruned"][str(ratio)]["selection"], arch)
            out["pruned"][str(ratio)]["ppl_in_float32"] = ppl(pruned(f32, stats, sel))
    return out


def matmul_gflops(dtype: torch.dtype, repeats: int) -> float:
    """A 7B-shaped matmul ([256, 4096] @ [4096, 11008], LLaMA-7B's MLP up projection), median GFLOP/s."""
    x, w = torch.randn(256, 4096, dtype=dtype), torch.randn(4096, 11008, dtype=dtype)
    x @ w  # warm-up (oneDNN builds its kernel on the first call)
    return 2 * 256 * 4096 * 11008 / median_time(lambda: x @ w, repeats)[1] / 1e9


def interleaved(rounds: int, windows_n: int = 16) -> dict:
    """Calibration and perplexity of `windows_n` windows, float32 and bf16 alternating in one process for
    `rounds` rounds: on a shared CPU the load drifts over minutes, and alternating puts both dtypes under
    the same drift. Per-round ratios bf16/f32 and their median."""
    models = {name: load_model(MODEL, dtype=getattr(torch, name)) for name in ("float32", "bfloat16")}
    tok = models["float32"].tokenizer
    windows = calibration_windows(tokenize(tok, load_text(Corpus("wiki"), join=" ").text), windows_n, T, seed=0)
    evals = tokenize(tok, load_text(Corpus("wikitext2", "test")).text)
    jobs = {"calib": lambda m: collect_stats(m, windows, 8, progress=False),
            "ppl": lambda m: perplexity(m, evals, T, 8, windows_n, progress=False)}
    times = {(job, name): [] for job in jobs for name in models}
    for _ in range(rounds):
        for job, fn in jobs.items():
            for name, lm in models.items():
                times[(job, name)].append(median_time(lambda fn=fn, lm=lm: fn(lm.model), 1)[1])
    return {job: {"float32": times[(job, "float32")], "bfloat16": times[(job, "bfloat16")],
                  "ratios": [b / f for f, b in zip(times[(job, "float32")], times[(job, "bfloat16")], strict=True)]}
            for job in jobs}


def jaccard(a: dict, b: dict, key: str) -> float:
    """|A ∩ B| / |A ∪ B| over (layer, unit) pairs kept in two selections."""
    sa = {(i, u) for i, units in enumerate(a[key]) for u in units}
    sb = {(i, u) for i, units in enumerate(b[key]) for u in units}
    return len(sa & sb) / max(len(sa | sb), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--interleaved", type=int, default=0, metavar="ROUNDS",
                    help="only the interleaved timing (16 windows, float32 and bf16 alternating), ROUNDS rounds")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one_dtype(a.child, a.repeats)))
        return
    if a.interleaved:
        load0, res = os.getloadavg(), interleaved(a.interleaved)
        load1 = os.getloadavg()
        print(f"interleaved, 16 windows x {T} tokens, {a.interleaved} rounds, {torch.get_num_threads()} threads; "
              f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
              f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
        for job, r in res.items():
            f32, bf16 = ([round(t, 2) for t in r[k]] for k in ("float32", "bfloat16"))
            print(f"{job:6} f32 s {f32}  bf16 s {bf16}  bf16/f32 per round {[round(x, 3) for x in r['ratios']]}  "
                  f"median {statistics.median(r['ratios']):.3f}")
        if a.json:
            with open(a.json, "w") as fh:
                json.dump({"load_before": load0, "load_after": load1, **res}, fh, indent=1)
        return
    load0 = os.getloadavg()
    res = {}
    for name in ("float32", "bfloat16"):
        run = subprocess.run([sys.executable, __file__, "--child", name, "--repeats", str(a.repeats)],
                             check=True, stdout=subprocess.PIPE, text=True)
        res[name] = json.loads(run.stdout.strip().splitlines()[-1])
    gflops = {name: matmul_gflops(getattr(torch, name), a.repeats) for name in res}
    load1 = os.getloadavg()
    f, b = res["float32"], res["bfloat16"]
    auto = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    print(f"SmolLM2-135M on CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"native bf16 (runtime.native_bf16): {native_bf16(torch.device('cpu'))}, auto -> {auto}")
    print(f"load average (1, 5, 15 min) before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print(f"{'':34}{'float32':>12}{'bfloat16':>12}{'bf16/f32':>10}")
    print(f"{'7B-shaped matmul GFLOP/s':34}{gflops['float32']:12.1f}{gflops['bfloat16']:12.1f}"
          f"{gflops['bfloat16'] / gflops['float32']:10.4f}")
    print(f"{'dense ppl (64 x 128)':34}{f['dense_ppl']:12.3f}{b['dense_ppl']:12.3f}"
          f"{b['dense_ppl'] / f['dense_ppl']:10.4f}")
    for r in RATIOS:
        pf, pb = f["pruned"][str(r)], b["pruned"][str(r)]
        print(f"{f'pruned {r} ppl, own dtype':34}{pf['ppl']:12.3f}{pb['ppl']:12.3f}{pb['ppl'] / pf['ppl']:10.4f}")
        print(f"{f'pruned {r} ppl, bf16 selection in f32':34}{'':12}{pb['ppl_in_float32']:12.3f}"
              f"{pb['ppl_in_float32'] / pf['ppl']:10.4f}")
        print(f"{f'pruned {r} achieved ratio':34}{pf['achieved_ratio']:12.4f}{pb['achieved_ratio']:12.4f}")
        for key in ("kept_groups", "kept_channels"):
            sf, sb = pf["selection"][key], pb["selection"][key]
            same = sum(x == y for x, y in zip(sf, sb, strict=True))
            print(f"{f'pruned {r} {key} Jaccard':34}{jaccard(pf['selection'], pb['selection'], key):12.4f}"
                  f"   layers identical {same}/{len(sf)}")
    print(f"{f'calibration s (N={N}, median of {a.repeats})':34}{f['calib_seconds']:12.2f}{b['calib_seconds']:12.2f}"
          f"{b['calib_seconds'] / f['calib_seconds']:10.4f}")
    print(f"{'perplexity s (64 windows, median)':34}{f['ppl_seconds']:12.2f}{b['ppl_seconds']:12.2f}"
          f"{b['ppl_seconds'] / f['ppl_seconds']:10.4f}")
    print(f"{'peak RSS MiB (own process)':34}{f['peak_rss_mib']:12.0f}{b['peak_rss_mib']:12.0f}"
          f"{b['peak_rss_mib'] / f['peak_rss_mib']:10.4f}")
    print("runs (s): " + "; ".join(f"{k} calib {[round(t, 2) for t in v['calib_runs']]} "
                                    f"ppl {[round(t, 2) for t in v['ppl_runs']]}" for k, v in res.items()))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"load_before": load0, "load_after": load1, "auto": auto, "matmul_gflops": gflops, **res},
                      fh, indent=1)


if __name__ == "__main__":
    main()
