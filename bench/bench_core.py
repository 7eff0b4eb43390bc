"""Core benchmark on SmolLM2-135M: quality ordering, calibration cost, pruned prefill speed.

Calibration on the Wikipedia text (exllamav2 wheel), N=1024, T=128, seed 0; perplexity on the full
WikiText-2 test split at seqlen 128 (FLAP_EXP_WIKITEXT2 or ../shared/data). Prints measured ratios and
writes them to reports/bench_core.json.  Usage: python bench/bench_core.py [--quick] [--model NAME]
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import resource
import statistics
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
from flap_exp.prune import PruneConfig, prune
from flap_exp.structures import StructureOptions, get_structure
from flap_exp.surgery import prune_model

ROOT = Path(__file__).resolve().parents[1]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


@torch.no_grad()
def plain_forward(model, windows, batch_size):
    for b in windows.split(batch_size):
        model(input_ids=b, use_cache=False)


def flap_from_stats(base, stats, metric, structure, ratio, compensate):
    """Prune a copy of `base` reusing one calibration (what the DVC pipeline does)."""
    m, arch = copy.deepcopy(base), ArchView.from_config(base.config)
    sel = get_structure(structure)(channel_scores(get_metric(metric), base, stats), arch, ratio, StructureOptions())
    prune_model(m, sel, compensation_biases(base, stats, sel, arch) if compensate else None, arch)
    return m, sel.achieved_ratio(arch)


@torch.no_grad()
def prefill_speed(models: dict, batch: int, seqlen: int, repeats: int, logits_to_keep: int | None):
    x = torch.randint(0, 1000, (batch, seqlen))
    kw = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
    times = {k: [] for k in models}
    for m in models.values():  # warm-up
        m(input_ids=x, use_cache=False, **kw)
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        for k, m in models.items():
            _, dt = timed(functools.partial(m, input_ids=x, use_cache=False, **kw))
            times[k].append(dt)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
                "tokens_per_s": batch * seqlen / statistics.median(v)} for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="N=128 and 64 evaluation windows (minutes, not ~40)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench_core.json"))
    a = ap.parse_args()
    n, max_windows = (128, 64) if a.quick else (1024, None)
    os.environ.setdefault("FLAP_EXP_WIKITEXT2", str(ROOT.parent / "shared" / "data" / "wikitext-2-raw"))
    lm = load_model(a.model)
    base, tok = lm.model, lm.tokenizer
    windows = calibration_windows(tokenize(tok, load_text(Corpus("wiki"), join=" ").text), n, 128, seed=0)
    evals = tokenize(tok, load_text(Corpus("wikitext2", "test")).text)
    res: dict = {"model": a.model, "N": n, "T": 128, "device": "cpu", "threads": torch.get_num_threads(),
                 "eval_windows": max_windows or "all"}

    # 1. calibration cost vs a plain batched forward over the same tokens
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, t_fwd = timed(lambda: plain_forward(base, windows, 8))
    stats, t_cal = timed(lambda: collect_stats(base, windows, 8, progress=False))
    res["calibration"] = {"plain_forward_s": t_fwd, "calibrate_s": t_cal, "ratio": t_cal / t_fwd,
                          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                          "rss_before_gib": rss0 / 2**20}
    print(f"calibration {t_cal:.1f}s vs plain forward {t_fwd:.1f}s: ratio {t_cal / t_fwd:.3f}", flush=True)

    # 2. quality at ratio 0.2
    def ppl(m):
        return perplexity(m, evals, 128, 8, max_windows, progress=False).ppl

    q = {"dense": {"ppl": ppl(base), "ratio": 0.0}}
    print("dense", q["dense"], flush=True)
    for name, metric, structure, comp in [("flap", "wifv", "al_am", True), ("flap_nocomp", "wifv", "al_am", False),
                                         ("magnitude", "weight_magnitude", "ul_um", False)]:
        m, r = flap_from_stats(base, stats, metric, structure, 0.2, comp)
        q[name] = {"ppl": ppl(m), "ratio": r}
        print(name, q[name], flush=True)
        del m
    m = copy.deepcopy(base)  # Wanda-sp runs its own sequential calibration, as the official code
    r = prune(m, windows, PruneConfig("wanda_sp", "ul_um", 0.2, compensation="none"), progress=False).achieved_ratio
    q["wanda_sp"] = {"ppl": ppl(m), "ratio": r}
    print("wanda_sp", q["wanda_sp"], flush=True)
    del m
    m, r = flap_from_stats(base, stats, "wifv", "al_am", q["wanda_sp"]["ratio"], True)
    q["flap_at_wanda_ratio"] = {"ppl": ppl(m), "ratio": r}
    print("flap_at_wanda_ratio", q["flap_at_wanda_ratio"], flush=True)
    del m
    res["quality"] = q
    res["ordering_holds"] = {
        "flap<wanda_sp (nominal 0.2)": q["flap"]["ppl"] < q["wanda_sp"]["ppl"],
        "flap<wanda_sp (matched ratio)": q["flap_at_wanda_ratio"]["ppl"] < q["wanda_sp"]["ppl"],
        "wanda_sp<magnitude": q["wanda_sp"]["ppl"] < q["magnitude"]["ppl"],
        "comp<nocomp": q["flap"]["ppl"] < q["flap_nocomp"]["ppl"]}

    # 3. prefill speed of the physically pruned model at 0.5, same process, interleaved
    pruned, r = flap_from_stats(base, stats, "wifv", "al_am", 0.5, True)
    for label, keep in (("prefill_last_logits", 1), ("forward_all_logits", None)):
        sp = prefill_speed({"dense": base, "pruned": pruned}, 8, 128, 10, keep)
        sp["speedup"] = sp["dense"]["median_s"] / sp["pruned"]["median_s"]
        sp["achieved_ratio"] = r
        res[label] = sp
        print(f"{label} 8x128 at ratio {r:.3f}: speedup {sp['speedup']:.3f}", flush=True)

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(main())
