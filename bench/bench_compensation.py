"""Compensation benchmark on SmolLM2-135M: none vs FLAP's bias vs least-squares (`lsq`) reconstruction.

Calibration on the Wikipedia text (exllamav2 wheel), T=128, seed 0; every compensation of a cell uses
the same selection. The lsq default (damping, then form) is chosen on HELD-OUT Wikipedia windows that
overlap no calibration window, never on the WikiText-2 test split, which is only reported.
Writes reports/bench_compensation.json and prints a table.

    python bench/bench_compensation.py --quick     # N=256, 64 test windows (the run reported)
    python bench/bench_compensation.py             # N=1024, the whole test split (hours on CPU)
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path

import torch

from flap_exp.arch import ArchView
from flap_exp.calibrate import collect_stats
from flap_exp.compensation.base import CompensationConfig
from flap_exp.compensation.bias import compensation_biases
from flap_exp.compensation.lsq import lsq_compensation
from flap_exp.data import Corpus, calibration_windows, load_text, tokenize
from flap_exp.errors import FlapError
from flap_exp.metrics import channel_scores, get_metric
from flap_exp.models import load_model
from flap_exp.ppl import perplexity
from flap_exp.prune import PruneConfig, prune
from flap_exp.structures import StructureOptions, check_ratio, get_structure
from flap_exp.surgery import prune_model

ROOT = Path(__file__).resolve().parents[1]
T = 128


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


@torch.no_grad()
def plain_forward(model, windows, batch_size: int = 8) -> None:
    for b in windows.split(batch_size):
        model(input_ids=b, use_cache=False, logits_to_keep=1)


def heldout_windows(tokens: torch.Tensor, calib_starts_cover: torch.Tensor, m: int, seed: int) -> torch.Tensor:
    """m windows of T tokens that overlap no calibration window (seeded choice among the free slots)."""
    free = [s for s in range(0, tokens.numel() - T, T) if not bool(calib_starts_cover[s:s + T].any())]
    if len(free) < m:
        raise FlapError(f"only {len(free)} held-out windows are disjoint from the calibration windows; need {m}")
    starts = sorted(random.Random(seed).sample(free, m))
    return torch.stack([tokens[s:s + T] for s in starts])


def covered(tokens: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Which token positions the calibration windows use (same draw as data.calibration_windows)."""
    rng = random.Random(seed)
    mask = torch.zeros(tokens.numel(), dtype=torch.bool)
    for _ in range(n):
        s = rng.randint(0, tokens.numel() - T - 1)
        mask[s:s + T] = True
    return mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="N=256 and 64 test windows")
    ap.add_argument("--n", type=int, help="calibration windows (overrides --quick)")
    ap.add_argument("--eval-windows", type=int, help="WikiText-2 test windows (overrides --quick)")
    ap.add_argument("--heldout", type=int, default=32, help="held-out Wikipedia windows that choose the default")
    ap.add_argument("--dampings", default="0,0.001,0.01,0.1,1", help="lsq damping grid (sequential form)")
    ap.add_argument("--forms", default="sequential,dense,drift")
    ap.add_argument("--floor", type=float, default=0.25, help="min_channels as a fraction of the MLP width (0: skip)")
    # Once lsq refits the survivors, the selection that suits a mean-shift bias need not be the best one:
    # FLAP's score (wifv) under the other structures, bias and lsq, at one ratio
    ap.add_argument("--structures", default="", help="e.g. al_mm,ul_mm,ul_um (empty: skip)")
    ap.add_argument("--structure-ratio", type=float, default=0.5)
    # Smaller runs for a CPU shared by many (the defaults are the protocol of issue 11)
    ap.add_argument("--flap-ratios", default="0.2,0.3,0.5")
    ap.add_argument("--choice-ratios", default="0.2,0.5", help="ratios whose held-out ppl choose the default")
    ap.add_argument("--wanda-ratios", default="0.2,0.5", help="empty: skip Wanda-sp")
    ap.add_argument("--flap-comps", default="none,bias,lsq", help="FLAP's compensations on the test split")
    ap.add_argument("--wanda-comps", default="none,bias,lsq", help="Wanda-sp's compensations on the test split")
    # The dense perplexities do not depend on the calibration: a long run may take them from an earlier run of
    # the same evaluation (same model, test windows and held-out windows), recorded as reused, never recomputed.
    ap.add_argument("--dense-from", help="an earlier output JSON whose dense row to reuse (same protocol)")
    ap.add_argument("--no-cost", action="store_true",
                    help="skip the plain-forward reference (on a shared CPU its ratios would not be honest)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench_compensation.json"))
    a = ap.parse_args()
    # the extra structures are checked before the hours of work, not when their block is reached
    structures = [x for x in a.structures.split(",") if x]
    try:
        extra_structures = {x: get_structure(x) for x in structures}
        check_ratio(a.structure_ratio)
    except FlapError as err:
        ap.error(str(err))
    n, max_windows = (256, 64) if a.quick else (1024, None)
    n, max_windows = a.n or n, a.eval_windows or max_windows
    prior = None  # --dense-from: checked against this run's protocol before any work
    if a.dense_from:
        prior = json.loads(Path(a.dense_from).read_text())
        this = {"model": a.model, "T": T, "eval_windows": max_windows or "all", "heldout_windows": a.heldout, "N": n}
        same = {k: prior.get(k) for k in this}
        if same != this:
            ap.error(f"--dense-from {a.dense_from}: another protocol ({same}); this run is {this}")
    os.environ.setdefault("FLAP_EXP_WIKITEXT2", str(ROOT.parent / "shared" / "data" / "wikitext-2-raw"))
    lm = load_model(a.model)
    base, tok = lm.model, lm.tokenizer
    arch = ArchView.from_config(base.config)
    wiki = tokenize(tok, load_text(Corpus("wiki"), join=" ").text)
    windows = calibration_windows(wiki, n, T, seed=0)
    held = heldout_windows(wiki, covered(wiki, n, 0), a.heldout, seed=1).flatten()
    evals = tokenize(tok, load_text(Corpus("wikitext2", "test")).text)
    res: dict = {"model": a.model, "N": n, "T": T, "seed": 0, "device": "cpu", "threads": torch.get_num_threads(),
                 "eval_windows": max_windows or "all", "heldout_windows": a.heldout, "rows": []}

    partial = Path(a.out).with_suffix(".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)

    def evaluate(m, test: bool = True) -> tuple[float, float | None]:
        return (perplexity(m, held, T, 8, None, progress=False).ppl,
                perplexity(m, evals, T, 8, max_windows, progress=False).ppl if test else None)

    def row(cell: str, sel, comp: str, comps=None, pruned=None, test: bool = True, **extra) -> dict:
        """One evaluated cell; test=False for the held-out choice runs (the test split is not looked at)."""
        m = pruned
        if m is None:
            m = copy.deepcopy(base)
            prune_model(m, sel, comps, arch)
        h, t = evaluate(m, test)
        r = {"cell": cell, "ratio": round(sel.achieved_ratio(arch), 4), "comp": comp, **extra, "heldout_ppl": h,
             "test_ppl": t}
        res["rows"].append(r)
        print(json.dumps(r), flush=True)
        partial.write_text(json.dumps(res, indent=1))  # a long run's rows survive an interruption
        return r

    # (selection, damping, form) -> (selection, compensation): the held-out choice's fits are reused. The
    # selection is held with its fit: keyed by id(), a freed selection's id could be reused by a new one.
    fitted: dict = {}

    def lsq(sel, damping: float, form: str):
        key = (id(sel), damping, form)
        if key not in fitted:
            fitted[key] = sel, lsq_compensation(base, sel, arch, windows, CompensationConfig("lsq", damping, form),
                                                progress=False)
        return fitted[key][1]

    # cost: a plain forward over the calibration tokens, the calibration pass, an lsq pass
    t_fwd = None
    if not a.no_cost:
        plain_forward(base, windows[:8])  # warm-up
        _, t_fwd = timed(lambda: plain_forward(base, windows))  # decoder + last-token logits: a conservative unit
    stats, t_cal = timed(lambda: collect_stats(base, windows, 8, progress=False))
    if prior is not None:
        res["dense"] = {**prior["dense"], "reused_from": a.dense_from}
    else:
        h, t = evaluate(base)
        res["dense"] = {"heldout_ppl": h, "test_ppl": t}
    print("dense", res["dense"], flush=True)
    scores = channel_scores(get_metric("wifv"), base, stats)
    ratios = lambda text: [float(x) for x in text.split(",") if x]  # noqa: E731
    choice_ratios = tuple(ratios(a.choice_ratios))
    flap = {r: get_structure("al_am")(scores, arch, r, StructureOptions())
            for r in sorted(set(ratios(a.flap_ratios)) | set(choice_ratios))}

    # 1. choose the damping (sequential form), then the form, on the held-out windows at 0.2 and 0.5
    timing = {}

    def gmean_heldout(rows) -> float:
        return math.exp(sum(math.log(r["heldout_ppl"]) for r in rows) / len(rows))

    grid = {}
    for d in [float(x) for x in a.dampings.split(",")]:
        rows = []
        for r in choice_ratios:
            try:
                comps, dt = timed(functools.partial(lsq, flap[r], d, "sequential"))
            except FlapError as err:  # e.g. a singular covariance at damping 0: a result, not a crash
                print(f"damping {d} at {r}: {err}", flush=True)
                rows = []
                break
            timing.setdefault(("sequential", r), dt)
            rows.append(row(f"flap@{r}", flap[r], "lsq", comps, test=False, form="sequential", damping=d))
        if rows:
            grid[d] = gmean_heldout(rows)
    damping = min(grid, key=grid.get)
    forms = {"sequential": grid[damping]}
    for form in [f for f in a.forms.split(",") if f != "sequential"]:
        rows = []
        for r in choice_ratios:
            comps, dt = timed(functools.partial(lsq, flap[r], damping, form))
            timing[(form, r)] = dt
            rows.append(row(f"flap@{r}", flap[r], "lsq", comps, test=False, form=form, damping=damping))
        forms[form] = gmean_heldout(rows)
    form = min(forms, key=forms.get)
    res["choice"] = {"heldout_gmean_ppl_by_damping": grid, "heldout_gmean_ppl_by_form": forms,
                     "damping": damping, "form": form, "ratios": list(choice_ratios)}
    print(f"held-out choice: damping {damping} ({grid}), form {form} ({forms})", flush=True)

    # 2. FLAP at 0.2/0.3/0.5: none, bias, lsq with the chosen default (only these rows see the test split)
    comps = a.flap_comps.split(",")
    for r in ratios(a.flap_ratios):
        sel = flap[r]
        if "none" in comps:
            row(f"flap@{r}", sel, "none")
        if "bias" in comps:
            row(f"flap@{r}", sel, "bias", compensation_biases(base, stats, sel, arch))
        if "lsq" in comps:
            row(f"flap@{r}", sel, "lsq", lsq(sel, damping, form), form=form, damping=damping)

    # 3. Wanda-sp (its own sequential selection, as the official code) at 0.2 and 0.5: none, bias, lsq
    for r in ratios(a.wanda_ratios):
        m = copy.deepcopy(base)
        sel = prune(m, windows, PruneConfig("wanda_sp", "ul_um", r, compensation="none"), progress=False).selection
        wcomps = a.wanda_comps.split(",")
        if "none" in wcomps:
            row(f"wanda_sp@{r}", sel, "none", pruned=m)
        del m
        if "bias" in wcomps:
            row(f"wanda_sp@{r}", sel, "bias", compensation_biases(base, stats, sel, arch))
        if "lsq" in wcomps:
            row(f"wanda_sp@{r}", sel, "lsq", lsq(sel, damping, form), form=form, damping=damping)

    # 4. a per-layer MLP floor at 0.5 (AL-AM's floors count toward the ratio: the same share removed), bias and lsq
    floor = int(a.floor * arch.intermediate_size)
    fsel = get_structure("al_am")(scores, arch, 0.5, StructureOptions(min_channels=floor)) if floor else None
    for comp, comps in ((("bias", compensation_biases(base, stats, fsel, arch)), ("lsq", lsq(fsel, damping, form)))
                        if floor else ()):
        row(f"flap@0.5+floor{floor}", fsel, comp, comps, form=form if comp == "lsq" else None,
            damping=damping if comp == "lsq" else None)

    # 5. FLAP's score under other structures at one ratio, bias and lsq (the same selection for both)
    for s, structure in extra_structures.items():
        ssel = structure(scores, arch, a.structure_ratio, StructureOptions())
        row(f"flap[{s}]@{a.structure_ratio}", ssel, "bias", compensation_biases(base, stats, ssel, arch))
        row(f"flap[{s}]@{a.structure_ratio}", ssel, "lsq", lsq(ssel, damping, form), form=form, damping=damping)

    res["cost"] = {"plain_forward_s": t_fwd, "calibrate_s": t_cal,
                   "calibrate_over_forward": t_cal / t_fwd if t_fwd else None,
                   "lsq_s": {f"{f}@{r}": v for (f, r), v in timing.items()},
                   "lsq_over_forward": {f"{f}@{r}": v / t_fwd for (f, r), v in timing.items()} if t_fwd else None,
                   "covariance_peak_mib": max(arch.intermediate_size, arch.attn_channels) ** 2 * 8 / 2**20,
                   "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    partial.unlink(missing_ok=True)
    print_table(res)


def print_table(res: dict) -> None:
    print(f"\n{res['model']}  N={res['N']} T={res['T']}  test windows={res['eval_windows']}  "
          f"held-out windows={res['heldout_windows']}  dense: held-out {res['dense']['heldout_ppl']:.2f}, "
          f"test {res['dense']['test_ppl']:.2f}")
    print(f"{'cell':<22}{'ratio':>7}  {'comp':<5}{'form':<11}{'damping':>8}{'held-out':>10}{'test ppl':>10}")
    for r in res["rows"]:
        d = r.get("damping")
        print(f"{r['cell']:<22}{r['ratio']:>7.3f}  {r['comp']:<5}{r.get('form') or '':<11}"
              f"{'' if d is None else f'{d:g}':>8}{r['heldout_ppl']:>10.1f}"
              f"{'-' if r['test_ppl'] is None else format(r['test_ppl'], '.1f'):>10}")
    c = res["choice"]
    print(f"\nchosen on held-out (geometric mean over ratios {c['ratios']}): damping {c['damping']:g} "
          f"{ {k: round(v, 1) for k, v in c['heldout_gmean_ppl_by_damping'].items()} }, form {c['form']} "
          f"{ {k: round(v, 1) for k, v in c['heldout_gmean_ppl_by_form'].items()} }")
    k = res["cost"]
    if k["plain_forward_s"] is None:  # --no-cost: seconds only, no ratios
        print(f"cost (no plain-forward reference): calibration {k['calibrate_s']:.0f}s, lsq "
              + ", ".join(f"{n} {v:.0f}s" for n, v in k["lsq_s"].items()))
    else:
        print(f"cost: plain forward {k['plain_forward_s']:.1f}s, calibration {k['calibrate_over_forward']:.2f}x, lsq "
              + ", ".join(f"{n} {v:.2f}x" for n, v in k["lsq_over_forward"].items()))
    print(f"covariance peak {k['covariance_peak_mib']:.0f} MiB, peak RSS {k['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main())
