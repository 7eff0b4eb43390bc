"""Zero-shot accuracy of the dense SmolLM2-135M on the seven FLAP tasks, and its throughput against a
smaller model of the same family.

    .venv/bin/python bench/bench_zeroshot.py --limit 100
    .venv/bin/python bench/bench_zeroshot.py --skip-eval --repeats 7 --json out.json

The smaller model is a stand-in for a pruned one until the pruner lands: SmolLM2's config with half the
MLP width (768) and 2 of its 3 key/value groups (6 query heads), random weights (speed does not depend
on the values).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaForCausalLM

from flap_exp.evaluation.tasks import TASKS
from flap_exp.evaluation.throughput import compare_throughput
from flap_exp.evaluation.zeroshot import evaluate_zeroshot
from flap_exp.models import load_model


def smaller_like(dense: torch.nn.Module) -> torch.nn.Module:
    cfg = dense.config.to_dict()
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    group = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    kv = max(1, cfg["num_key_value_heads"] * 2 // 3)
    cfg.update(intermediate_size=cfg["intermediate_size"] // 2, num_key_value_heads=kv,
               num_attention_heads=kv * group, head_dim=head_dim)
    cfg.pop("quantization_config", None)
    torch.manual_seed(0)
    return LlamaForCausalLM(type(dense.config).from_dict(cfg)).eval()


def print_accuracy(res: dict, seconds: float) -> None:
    print(f"\nzero-shot, dense SmolLM2-135M, limit {res['limit']}, batch {res['batch_size']}, "
          f"lm-eval {res['lm_eval_version']}, {seconds:.0f} s")
    print(f"{'task':<14}{'n':>6}{'acc':>8}{'acc_norm':>10}  {'paper metric':<18}")
    for name, r in res["tasks"].items():
        norm = f"{r['acc_norm']:.4f}" if r["acc_norm"] is not None else "-"
        print(f"{name:<14}{r['n_docs']:>6}{r['acc']:>8.4f}{norm:>10}  {r['metric']:<10}{r['score']:.4f}")
    print(f"{'average':<14}{'':>24}  {'':<10}{res['average']:.4f}")


def print_throughput(res: dict) -> None:
    print(f"\nthroughput on {res['device']} ({res['threads']} threads), {res['repeats']} interleaved repeats "
          f"after {res['warmup']} warm-up; median [min..max]; load average {res['loadavg_before']} -> "
          f"{res['loadavg_after']} (above ~0.5 other processes competed: timings unreliable)")
    for name, m in res["models"].items():
        size = m["size"]
        print(f"\n{name}: {size['params'] / 1e6:.1f} M params, {size['param_bytes'] / 2**20:.0f} MiB")
        for w, v in m["workloads"].items():
            t, ms = v["tokens_per_s"], v["ms_per_token"]
            mem = v["peak_mem_delta_bytes"]
            mem_s = f"{mem / 2**20:.1f} MiB" if mem is not None else "n/a"
            print(f"  {w:<18}{t['median']:>9.1f} tok/s [{t['min']:.1f}..{t['max']:.1f}]"
                  f"  {ms['median']:>7.2f} ms/token  peak +{mem_s}")
    for name, ratios in res["speedup"].items():
        print(f"\nspeedup of {name} over {res['speedup_vs']} (paired per round):")
        for w, r in ratios.items():
            print(f"  {w:<18}{r['median']:.2f}x [{r['min']:.2f}..{r['max']:.2f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=100, help="first N documents per task")
    ap.add_argument("--full", action="store_true", help="evaluate the full splits (hours on a CPU)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--json", help="also write all figures to this file")
    args = ap.parse_args()

    loaded = load_model("smollm2-135m")
    report: dict = {}
    if not args.skip_eval:
        t0 = time.perf_counter()
        report["zeroshot"] = evaluate_zeroshot(loaded.model, loaded.tokenizer, args.tasks.split(","),
                                               limit=None if args.full else args.limit, batch_size=args.batch_size)
        print_accuracy(report["zeroshot"], time.perf_counter() - t0)
    if not args.skip_throughput:
        models = {"dense": loaded.model, "smaller": smaller_like(loaded.model)}
        report["throughput"] = compare_throughput(models, repeats=args.repeats)
        print_throughput(report["throughput"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
