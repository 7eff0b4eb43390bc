"""Zero-shot accuracy of an in-memory causal LM through lm-evaluation-harness (0.4.x), batched.

`evaluate_zeroshot` wraps the model in lm-eval's `HFLM` and runs `lm_eval.simple_evaluate` on the
tasks of `tasks.py` (offline copies by default). It returns plain, JSON-serializable dicts.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from statistics import fmean
from typing import Any

import torch

from ..errors import FlapError
from ..uncertainty import average_stderr
from .tasks import TASKS, build_tasks

log = logging.getLogger(__name__)


@contextmanager
def eval_pad_token(tokenizer: Any) -> Iterator[None]:
    """Give a tokenizer without a pad token its eos (else unk) token as pad, and undo it afterwards.

    lm-eval would otherwise set one itself and leave it set, or, lacking eos and unk, add a new
    `<|pad|>` token, growing the vocabulary past the model's embedding. Padding is masked out of
    the log-likelihoods, so which token pads does not change any score.
    """
    if tokenizer.pad_token is not None:
        yield
        return
    fill = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if fill is None:
        raise FlapError("the tokenizer has no pad, eos or unk token to pad batches with; set tokenizer.pad_token")
    tokenizer.pad_token = fill
    try:
        yield
    finally:
        tokenizer.pad_token = None


def check_limit(limit: int | None, sizes: dict[str, int]) -> None:
    """A limit caps the documents per task. A task smaller than the limit runs in full (logged);
    a limit at or above every task's size has no effect at all, which signals a mistake (the full
    splits are `limit=None`), so that is refused."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise FlapError(f"limit must be a positive whole number of documents per task or None, not {limit!r}")
    if all(limit >= n for n in sizes.values()):
        listed = ", ".join(f"{k} {v}" for k, v in sizes.items())
        raise FlapError(f"limit {limit} is at least every task's size ({listed}); use no limit for full splits")
    for name, n in sizes.items():
        if limit > n:
            log.warning("%s has only %d documents; limit %d evaluates all of them", name, n, limit)


def _metric(res: dict, name: str) -> float | None:
    """A number lm-eval reported, None where it has none ("N/A": a standard error of one document)."""
    value = res.get(f"{name},none")
    if not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):  # a NaN is an error, never a result
        raise FlapError(f"lm-eval reported a non-finite {name} ({value})")
    return float(value)


def evaluate_zeroshot(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,  # lm-eval sorts requests by length, so batching wastes little on padding
    device: str | torch.device | None = None,
    source: str = "local",
) -> dict[str, Any]:
    """Zero-shot accuracy per task and the average of each task's paper metric (see tasks.TaskSpec).

    `limit` takes the first `limit` documents of each task (lm-eval's convention); `device`, if
    given, moves the model there (in place) first; `source` is "local" (offline) or "hub".
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FlapError(f"batch_size must be a positive integer, not {batch_size!r}")
    task_objs = build_tasks(tasks, source)
    sizes = {name: len(t.eval_docs) for name, t in task_objs.items()}
    check_limit(limit, sizes)
    if device is not None:
        model.to(device)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training  # HFLM switches the model to eval mode; switch back afterwards
    try:
        with eval_pad_token(tokenizer):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task_objs[n] for n in tasks],
                limit=limit,
                # The Task objects are built above; an index of lm-eval's ~10k bundled YAMLs is not needed.
                task_manager=TaskManager(include_defaults=False),
                log_samples=False,  # per-document records are not kept; saves memory on full splits
                # acc/acc_norm aggregate by mean, whose stderr lm-eval computes in closed form; the
                # bootstrap only serves other metrics, so a small count keeps any such case cheap.
                bootstrap_iters=1000,
            )
    finally:
        model.train(was_training)

    per_task: dict[str, dict[str, Any]] = {}
    for name in tasks:
        res, spec = out["results"][name], TASKS[name]
        n = out["n-samples"][name]
        entry = {
            "acc": _metric(res, "acc"),
            "acc_stderr": _metric(res, "acc_stderr"),
            "acc_norm": _metric(res, "acc_norm"),  # None for tasks without it (boolq, winogrande)
            "acc_norm_stderr": _metric(res, "acc_norm_stderr"),
            "metric": spec.paper_metric,
            "n_docs": int(n["effective"]),
            "n_total": int(n["original"]),
            "split": spec.split,
        }
        entry["score"] = entry[spec.paper_metric]
        entry["score_stderr"] = entry[f"{spec.paper_metric}_stderr"]  # lm-eval's: sample std / sqrt(n_docs)
        per_task[name] = entry
    return {
        "tasks": per_task,
        "average": fmean(t["score"] for t in per_task.values()),
        "average_stderr": average_stderr([t["score_stderr"] for t in per_task.values()]),
        "n_docs": sum(t["n_docs"] for t in per_task.values()),
        "average_of": "per-task paper metric (acc or acc_norm, see metric)",
        "limit": limit,
        "batch_size": batch_size,
        "source": source,
        "lm_eval_version": lm_eval.__version__,
    }
