"""Prefill and decode speed, peak memory and size of several models (e.g. pruned vs dense), measured
in one process with the models interleaved, so that drift (thermal, other load) hits all alike.

Prefill: one forward over random tokens with `logits_to_keep=1`, as `generate` does for its prompt,
so the lm_head over every position does not dominate. Decode: greedy `generate` with the KV cache and
exactly `new_tokens` new tokens, timed per step from inside `generate` (a stopping criterion that
never stops), from the first new token to the last: the new_tokens - 1 decode steps, no prefill.
Everything returned is plain dicts of numbers (JSON-ready).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from statistics import median, quantiles

import torch
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList

from ..errors import FlapError


@dataclass
class Spread:
    median: float
    min: float
    max: float
    q1: float  # interquartile range: q1..q3
    q3: float
    n: int

    @classmethod
    def of(cls, xs: list[float]) -> Spread:
        q1, _, q3 = quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
        return cls(median(xs), min(xs), max(xs), q1, q3, len(xs))


def model_size(model: torch.nn.Module, directory: str | Path | None = None) -> dict[str, int | None]:
    """Parameter count, bytes of parameters in memory, and bytes of *.safetensors in `directory`."""
    params = list(model.parameters())  # yields a tied (shared) embedding once
    disk = None
    if directory is not None:
        files = list(Path(directory).glob("*.safetensors"))
        if not files:
            raise FlapError(f"no .safetensors files in {directory}")
        disk = sum(f.stat().st_size for f in files)
    return {"params": sum(p.numel() for p in params),
            "param_bytes": sum(p.numel() * p.element_size() for p in params), "disk_bytes": disk}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: wait before reading the clock


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _measure(fn: Callable[[], object], device: torch.device) -> tuple[float, int | None]:
    """Seconds for fn() and its peak memory above what was in use before it (bytes; None if unknown).

    GPU: exact, from the caching allocator's statistics. CPU (Linux): growth of the process's peak
    resident set, after resetting the peak via /proc/self/clear_refs; memory the allocator kept from
    earlier runs is reused without growing it, so the CPU figure is a lower bound.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5" resets VmHWM (the peak RSS) to the current RSS
            base = _rss_kib("VmRSS") * 1024
        except OSError:
            base = None
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak: int | None = torch.cuda.max_memory_allocated(device) - (base or 0)  # base is always set on CUDA
    else:
        peak = None if base is None else max(0, _rss_kib("VmHWM") * 1024 - base)
    return seconds, peak


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]  # 1-minute average of runnable processes
    except OSError:
        return None


def _tokens(vocab: int, batch: int, seq_len: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)


def _prefill(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    return lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1)


class _StepClock(StoppingCriteria):
    """Never stops generation; stamps the time after each new token (the first stamp ends the prefill)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int,
              clock: _StepClock | None = None) -> Callable[[], object]:
    pad = getattr(model.config, "pad_token_id", None)
    pad = 0 if pad is None else pad  # any id: every sequence is as long as the others, nothing is padded
    return lambda: model.generate(  # type: ignore[operator]  # transformers 5 types it on GenerationMixin only
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens,  # EOS cannot end a run early
        pad_token_id=pad, stopping_criteria=StoppingCriteriaList([clock] if clock else []),
    )


def compare_throughput(
    models: Mapping[str, PreTrainedModel],
    # (batch, seq_len): FLAP's 128-token windows, alone and batched (the docs' reference figures).
    prefill_shapes: tuple[tuple[int, int], ...] = ((1, 128), (8, 128)),
    decode_batches: tuple[int, ...] = (1, 8),  # latency-bound single stream, and a batched server
    prompt_len: int = 32,  # short prompt: decode time is what is measured
    new_tokens: int = 32,  # 31 timed steps: enough to average out per-call overhead
    warmup: int = 1,  # one run pages in lazily loaded weights and warms allocator and kernels
    repeats: int = 5,  # rounds; the median of 5 with min/max and IQR is robust to one outlier
    device: str | torch.device | None = None,
    seed: int = 0,
) -> dict:
    """Time every model on every workload; the first model in `models` is the reference (dense)
    for the speedup ratios. Models are moved to `device` (default: the first model's device)."""
    if len(models) < 1 or repeats < 1 or warmup < 0 or new_tokens < 2:
        raise FlapError("need at least one model, repeats >= 1, warmup >= 0 and new_tokens >= 2")
    names = list(models)
    dev = torch.device(device) if device is not None else next(models[names[0]].parameters()).device
    vocab: int = min(m.config.vocab_size for m in models.values())
    for m in models.values():
        # (the ignore: typeshed's functools.wraps, which transformers puts on PreTrainedModel.to, drops self)
        m.to(dev).eval()  # type: ignore[arg-type]

    # workload name -> (run(model) -> (seconds, peak bytes), tokens per run, steps per run)
    def prefill_run(m: PreTrainedModel, b: int, s: int) -> tuple[float, int | None]:
        return _measure(_prefill(m, _tokens(vocab, b, s, seed, dev)), dev)

    def decode_run(m: PreTrainedModel, b: int) -> tuple[float, int | None]:
        clock = _StepClock(dev)
        _, peak = _measure(_generate(m, _tokens(vocab, b, prompt_len, seed, dev), new_tokens, clock), dev)
        return clock.stamps[-1] - clock.stamps[0], peak  # the new_tokens - 1 steps after the prefill

    workloads: dict[str, tuple[Callable[[PreTrainedModel], tuple[float, int | None]], int, int]]
    workloads = {f"prefill_b{b}_s{s}": (partial(prefill_run, b=b, s=s), b * s, b * s) for b, s in prefill_shapes}
    workloads |= {f"decode_b{b}": (partial(decode_run, b=b), b * (new_tokens - 1), new_tokens - 1)
                  for b in decode_batches}

    # The load average records whether other processes competed for the CPU (timings are then unreliable).
    out: dict = {"device": str(dev), "threads": torch.get_num_threads(), "loadavg_before": _loadavg(),
                 "warmup": warmup, "repeats": repeats,
                 "prompt_len": prompt_len, "new_tokens": new_tokens,
                 "models": {n: {"size": model_size(models[n]), "workloads": {}} for n in names},
                 "speedup_vs": names[0], "speedup": {n: {} for n in names[1:]}}
    with torch.inference_mode():
        for wname, (run, tokens, steps) in workloads.items():
            times: dict[str, list[float]] = {n: [] for n in names}
            peaks: dict[str, list[int]] = {n: [] for n in names}
            for r in range(warmup + repeats):
                # Alternate the order every round (A B, B A, ...) so neither model always runs first.
                for n in (names if r % 2 == 0 else names[::-1]):
                    seconds, peak = run(models[n])
                    if r < warmup:  # warm-up also pages in weights loaded lazily (mmapped safetensors)
                        continue
                    times[n].append(seconds)
                    if peak is not None:
                        peaks[n].append(peak)
            for n in names:
                out["models"][n]["workloads"][wname] = {
                    "tokens_per_run": tokens,
                    "seconds": asdict(Spread.of(times[n])),
                    "tokens_per_s": asdict(Spread.of([tokens / t for t in times[n]])),
                    # decode: latency of one step (one new token per sequence);
                    # prefill: run time divided by the tokens processed
                    "ms_per_token": asdict(Spread.of([1000 * t / steps for t in times[n]])),
                    "peak_mem_delta_bytes": max(peaks[n]) if peaks[n] else None,
                }
            for n in names[1:]:
                # Ratios of the runs paired in the same round, so that drift between rounds cancels;
                # "best": ratio of the fastest runs, the estimate least disturbed by other processes.
                pairs = [a / b for a, b in zip(times[names[0]], times[n], strict=True)]
                out["speedup"][n][wname] = asdict(Spread.of(pairs)) | {"best": min(times[names[0]]) / min(times[n])}
    out["loadavg_after"] = _loadavg()
    return out
