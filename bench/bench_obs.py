"""Reconstruction-aware selection on SmolLM2-135M: FLAP (bias), uniform + lsq, OBS uniform / log / curve /
kl_search (the searched levels' cost is reported apart: search_s, candidates).

Calibration on the Wikipedia text (exllamav2 wheel), N windows of T=128, seed 0; perplexity on the first
`--eval-windows` WikiText-2 test windows and on held-out Wikipedia windows that overlap no calibration window.
Every cell's compensation is lsq (damping 0.01, sequential) except FLAP's own bias. The cost column is the
cell's selection + compensation time as a ratio to one plain forward over the calibration tokens (decoder +
last-token logits), measured on the same (shared) CPU. Prints a table; writes --out (JSON).

    python bench/bench_obs.py --n 128 --eval-windows 64 --ratios 0.5,0.2 --obs-batch 8
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

import torch

from flap_exp.allocation_search import search_allocation
from flap_exp.compensation.base import CompensationConfig
from flap_exp.data import Corpus, calibration_windows, load_text, tokenize
from flap_exp.models import load_model
from flap_exp.ppl import perplexity
from flap_exp.prune import PruneConfig, prune
from flap_exp.store import ResidentStore
from flap_exp.structures import StructureOptions

ROOT = Path(__file__).resolve().parents[1]
T = 128
LSQ = CompensationConfig("lsq", 0.01, "sequential")
CELLS = {  # name: (metric, structure, compensation, options)
    "FLAP (bias)": ("wifv", "al_am", "bias", {}),
    "uniform + lsq": ("wifv", "ul_um", LSQ, {}),
    "OBS uniform": ("obs", "ul_um", LSQ, {}),
    "OBS + log": ("obs", "ul_log", LSQ, {}),
    "OBS + curve": ("obs", "curve", LSQ, {}),
    "OBS + kl_search": ("obs", "kl_search", LSQ, {}),  # conf/structure/kl_search.yaml
    "SlimGPT-style": ("obs", "ul_log", LSQ, {"obs_batch": 16}),  # conf/structure/ul_log_slimgpt.yaml
}


def heldout(tokens: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """m windows of T tokens disjoint from the n calibration windows (same draw as data.calibration_windows)."""
    rng, cover = random.Random(0), torch.zeros(tokens.numel(), dtype=torch.bool)
    for _ in range(n):
        s = rng.randint(0, tokens.numel() - T - 1)
        cover[s:s + T] = True
    free = [s for s in range(0, tokens.numel() - T, T) if not bool(cover[s:s + T].any())]
    return torch.stack([tokens[s:s + T] for s in sorted(random.Random(1).sample(free, m))]).flatten()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=64, help="WikiText-2 test windows; 0: the whole split (paper)")
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--cells", default="FLAP (bias),uniform + lsq,OBS uniform,OBS + log,OBS + curve")
    ap.add_argument("--obs-batch", type=int, default=8, help="units per greedy step of the OBS cells that set none")
    ap.add_argument("--search-candidates", type=int, default=32, help="kl_search: fitness evaluations")
    ap.add_argument("--search-windows", type=int, default=8, help="kl_search: calibration windows of the KL")
    ap.add_argument("--kl-levels", default=None,
                    help="kl_search: the levels (and the search's cost) of this earlier --out, not a new search")
    ap.add_argument("--out", default="/tmp/bench_obs.json")
    a = ap.parse_args()
    os.environ.setdefault("FLAP_EXP_WIKITEXT2", str(ROOT.parent / "shared" / "data" / "wikitext-2-raw"))
    lm = load_model("smollm2-135m")
    base, tok = lm.model, lm.tokenizer
    wiki = tokenize(tok, load_text(Corpus("wiki"), join=" ").text)
    windows = calibration_windows(wiki, a.n, T, seed=0)
    held = heldout(wiki, a.n, a.heldout)
    evals = tokenize(tok, load_text(Corpus("wikitext2", "test")).text)

    def ppl(m) -> tuple[float, float]:
        return (perplexity(m, evals, T, 8, a.eval_windows or None, progress=False).ppl,
                perplexity(m, held, T, 8, None, progress=False).ppl)

    with torch.no_grad():
        for b in windows[:8].split(8):
            base(input_ids=b, use_cache=False, logits_to_keep=1)
        t = time.perf_counter()
        for b in windows.split(8):
            base(input_ids=b, use_cache=False, logits_to_keep=1)
        fwd = time.perf_counter() - t
    res = {"N": a.n, "obs_batch": a.obs_batch, "T": T, "eval_windows": a.eval_windows, "heldout_windows": a.heldout,
           "seed": 0,
           "threads": torch.get_num_threads(), "plain_forward_s": fwd, "rows": []}
    test, h = ppl(base)
    res["dense"] = {"test_ppl": test, "heldout_ppl": h}
    print(f"dense: wikitext2 {test:.2f}, held-out wiki {h:.2f}; plain forward {fwd:.1f} s", flush=True)
    for r in [float(x) for x in a.ratios.split(",")]:
        for name in a.cells.split(","):
            metric, structure, comp, opts = CELLS[name]
            opts = {"obs_batch": a.obs_batch, **opts}
            search = {}
            if structure == "kl_search":  # the search apart, timed; the OBS pass then takes its levels
                opts |= {"search_candidates": a.search_candidates, "search_windows": a.search_windows}
                cfg = PruneConfig(metric, structure, r, compensation=comp, options=StructureOptions(**opts))
                if a.kl_levels:
                    old = [x for x in json.loads(Path(a.kl_levels).read_text())["rows"]
                           if x["cell"] == name and x["target"] == r][0]
                    search = {k: old[k] for k in ("search_s", "candidates", "kl", "uniform_kl", "levels", "database",
                                                  "search", "windows")} | {"levels_from": a.kl_levels}
                else:
                    t = time.perf_counter()
                    found, secs = search_allocation(ResidentStore(base), windows, cfg, progress=True)
                    search = {"search_s": time.perf_counter() - t, "candidates": found.candidates, "kl": found.kl,
                              "uniform_kl": found.uniform_kl, "levels": found.levels, **secs}
                opts["levels"] = tuple(search["levels"])
            cfg = PruneConfig(metric, structure, r, compensation=comp, options=StructureOptions(**opts))
            m = copy.deepcopy(base)
            out = prune(m, windows, cfg, progress=False)
            t_sel = out.seconds["calibrate"] + out.seconds["score_select"]
            t_all = t_sel + out.seconds["compensate_cut"]
            test, h = ppl(m)
            row = {"cell": name, "target": r, "achieved": round(out.achieved_ratio, 4), "test_ppl": test,
                   "heldout_ppl": h, "select_s": t_sel, "select_x_fwd": t_sel / fwd,
                   "prune_s": t_all, "prune_x_fwd": t_all / fwd, "loadavg": os.getloadavg(), **search}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
    print("\n| cell | ratio | achieved | WikiText-2 ppl | held-out wiki ppl | selection / fwd | prune (all) / fwd |")
    print("|---|---|---|---|---|---|---|")
    for x in res["rows"]:
        print(f"| {x['cell']} | {x['target']} | {x['achieved']:.4f} | {x['test_ppl']:.2f} | {x['heldout_ppl']:.2f} "
              f"| {x['select_x_fwd']:.2f}x | {x['prune_x_fwd']:.2f}x |")


if __name__ == "__main__":
    main()
