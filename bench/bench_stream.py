"""Streamed pruning of a model larger than memory, with FLAP's bias and with lsq (`--stream`).

Writes a random LLaMA of ~3.0 GB float32 weights (`tests/helpers/synthetic.py`'s `BIG_CONFIG`: 48 layers, d=1024,
MLP 4096, 16/4 heads) shard by shard, then, each in a fresh process, prunes it streamed (WIFV, AL-AM, 0.5,
4 x 32 calibration tokens) under `--memory-budget` and evaluates the pruned directory streamed. Prints the
peak resident memory of each run against the weights, and lsq's time against the bias run's; writes
reports/bench_stream.json.

    python bench/bench_stream.py [--budget 768MiB] [--tmp DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from flap_exp.units import parse_bytes

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "tests" / "helpers" / "synthetic.py"  # the streaming test's random checkpoint and measurement
sys.path.insert(0, str(SYNTHETIC.parent))
from synthetic import BIG_CONFIG, write_random_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="768MiB", help="--memory-budget of both runs (flap-exp's own working set)")
    ap.add_argument("--tmp", default=None, help="where to write the ~3 GB checkpoint and the pruned copies")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench_stream.json"))
    a = ap.parse_args()
    budget = parse_bytes(a.budget)
    res: dict = {"config": {k: getattr(BIG_CONFIG, k) for k in ("num_hidden_layers", "hidden_size",
                                                                   "intermediate_size", "num_attention_heads",
                                                                   "num_key_value_heads", "vocab_size")},
                 "budget": budget, "threads": os.environ.get("OMP_NUM_THREADS"), "runs": []}
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        weights = write_random_checkpoint(BIG_CONFIG, Path(tmp) / "big")
        for comp in ("bias", "lsq"):
            r = subprocess.run([sys.executable, str(SYNTHETIC), str(Path(tmp) / "big"),
                                str(Path(tmp) / f"pruned-{comp}"), str(budget), comp],
                               capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise SystemExit(f"{comp}: {r.stderr[-2000:]}")
            got = json.loads(r.stdout.strip().splitlines()[-1])
            res["runs"].append(got)
            print(json.dumps(got), flush=True)
    res["weights"] = weights
    bias, lsq = res["runs"]
    res["lsq_over_bias_prune_s"] = lsq["prune_s"] / bias["prune_s"]
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"\nweights {weights / 2**30:.2f} GiB float32, --memory-budget {budget / 2**20:.0f} MiB")
    print(f"{'compensation':<14}{'peak RSS':>12}{'weights / peak':>16}{'prune s':>10}{'ppl s':>8}{'ppl':>10}")
    for r in res["runs"]:
        print(f"{r['compensation']:<14}{r['peak_rss'] / 2**20:>8.0f} MiB{weights / r['peak_rss']:>15.1f}x"
              f"{r['prune_s']:>10.1f}{r['ppl_s']:>8.1f}{r['ppl']:>10.1f}")
    print(f"lsq's streamed prune takes {res['lsq_over_bias_prune_s']:.2f}x the bias run's time")


if __name__ == "__main__":
    main()
