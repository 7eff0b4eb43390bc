"""A random LLaMA checkpoint larger than memory, and a fresh-process measurement of streaming it.

`write_random_checkpoint` writes the model shard by shard (one per decoder layer) without ever holding it
whole, so a small machine can make a checkpoint several times its memory. Used by the streaming test (bias)
and `bench/bench_stream.py` (bias and lsq):

    python tests/helpers/synthetic.py FOLDER OUT BUDGET_BYTES bias|lsq|none

prunes FOLDER into OUT with `--stream` semantics (WIFV, AL-AM, 0.5, 4 random windows of 32 tokens),
evaluates the pruned directory streamed, and prints one JSON line: the process's peak resident memory
(VmHWM: Linux carries ru_maxrss across exec, so it would count a forking parent's), the weights' bytes,
the achieved ratio, the perplexity and the seconds.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flap_exp.shards import INDEX

#: 48 layers of ~15.7M parameters (63 MB in float32) + embedding and head: ~3.0 GB of float32 weights.
BIG_CONFIG = LlamaConfig(vocab_size=8000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=48,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False)


def write_random_checkpoint(cfg: LlamaConfig, folder: Path) -> int:
    """A random LLaMA written shard by shard (one per layer) without ever holding the whole model; its bytes."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    with init_empty_weights():
        skel = LlamaForCausalLM(cfg)
    groups: dict[str, dict] = {}
    for name, p in skel.named_parameters():
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, {})[name] = p.shape
    g, weight_map, total, drawn = torch.Generator().manual_seed(0), {}, 0, {}
    for k, shapes in enumerate(groups.values()):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n, s in shapes.items():
            kind = n.split(".", 3)[-1] if n.startswith("model.layers.") else n
            if kind not in drawn:  # one random draw per weight kind, scaled per layer: writing is disk-bound
                drawn[kind] = torch.randn(s, generator=g) * 0.02 if len(s) == 2 else torch.ones(s)
            tensors[n] = drawn[kind] * (1 + 0.01 * k) if len(s) == 2 else drawn[kind]
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in tensors})
        total += sum(t.numel() * 4 for t in tensors.values())
        del tensors
    del drawn
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg.save_pretrained(folder)
    return total


def measure(folder: str, out: str, budget: int, compensation: str) -> dict:
    """Streamed prune + streamed perplexity of `folder` in this process; what `main` prints."""
    from flap_exp.persist import write_streamed
    from flap_exp.ppl import perplexity
    from flap_exp.prune import PruneConfig
    from flap_exp.streaming import StreamedModel
    vocab = LlamaConfig.from_pretrained(folder).vocab_size
    torch.manual_seed(0)
    windows = torch.randint(0, vocab, (4, 32))
    t = time.perf_counter()
    sm = StreamedModel(folder, budget=budget)
    res = write_streamed(sm, windows, PruneConfig("wifv", "al_am", 0.5, compensation=compensation, batch_size=4),
                         out, {}, progress=False)
    t1 = time.perf_counter()
    ppl = perplexity(StreamedModel(out, budget=budget), windows.flatten(), 32, 4, progress=False)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return {"compensation": compensation, "peak_rss": hwm * 1024, "weights": sm.weight_bytes(),
            "ratio": res.achieved_ratio, "ppl": ppl.ppl, "prune_s": t1 - t, "ppl_s": time.perf_counter() - t1}


def main() -> None:
    folder, out, budget, compensation = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    print(json.dumps(measure(folder, out, budget, compensation)))


if __name__ == "__main__":
    main()
