"""The OBS cell's cost on a GPU, as multiples of one plain forward over the calibration tokens, on a random
model of SmolLM2-135M's shape (the real weights do not travel to the device machine; the cost does not depend on
them): plain forward, then prune() of uniform + lsq (wifv ul_um) and OBS uniform + lsq (obs ul_um; its lsq is the
pass's own refit) at 0.5. Prints one JSON line per row and a table.

    python bench/bench_gpu_obs.py --n 64 --device cuda
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flap_exp.compensation.base import CompensationConfig
from flap_exp.prune import PruneConfig, prune
from flap_exp.structures import StructureOptions

#: SmolLM2-135M's shape (config.json of HuggingFaceTB/SmolLM2-135M).
SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--obs-batch", type=int, default=8)
    a = ap.parse_args()
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(dev, dtype).eval()
    windows = torch.randint(0, SHAPE["vocab_size"], (a.n, a.seqlen), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in windows[:8].split(8):
            base(input_ids=b.to(dev), use_cache=False, logits_to_keep=1)
        sync(dev)
        t = time.perf_counter()
        for b in windows.split(8):
            base(input_ids=b.to(dev), use_cache=False, logits_to_keep=1)
        sync(dev)
        fwd = time.perf_counter() - t
    print(json.dumps({"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": a.dtype,
                      "n": a.n, "plain_forward_s": fwd}), flush=True)
    lsq = CompensationConfig("lsq", 0.01, "sequential")
    rows = []
    for name, metric in (("uniform + lsq", "wifv"), ("OBS uniform", "obs")):
        cfg = PruneConfig(metric, "ul_um", 0.5, compensation=lsq, options=StructureOptions(obs_batch=a.obs_batch))
        m = copy.deepcopy(base)
        sync(dev)
        t = time.perf_counter()
        out = prune(m, windows, cfg, progress=False)
        sync(dev)
        wall = time.perf_counter() - t
        sel = out.seconds["calibrate"] + out.seconds["score_select"]
        row = {"cell": name, "achieved": round(out.achieved_ratio, 4), "select_s": sel, "prune_s": wall,
               "select_x_fwd": sel / fwd, "prune_x_fwd": wall / fwd}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| cell at 0.5 | removed | selection / plain fwd | whole prune / plain fwd | (plain fwd {fwd:.3f} s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cell']} | {r['achieved']:.4f} | {r['select_x_fwd']:.2f}x | {r['prune_x_fwd']:.2f}x | |")


if __name__ == "__main__":
    main()
