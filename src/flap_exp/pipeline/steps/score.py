"""Stages score and standardize: per-layer channel scores of one metric, and their AL z-scored units."""
from __future__ import annotations

import torch

from ...errors import FlapError
from ...integrity import check_finite_scores
from ...metrics import channel_scores, get_metric
from ...structures import standardized_units


def scores_to_tensors(scores) -> dict:
    out = {}
    for i, (a, m) in enumerate(scores):
        out[f"layers.{i}.attn"], out[f"layers.{i}.mlp"] = a, m
    return out


def scores_from_tensors(t: dict) -> list:
    n = 1 + max(int(k.split(".")[1]) for k in t)
    return [(t[f"layers.{i}.attn"], t[f"layers.{i}.mlp"]) for i in range(n)]


def score(model, stats, metric: str, square_attn: bool | None) -> dict:
    """Channel scores of the dense model; `stats` may be None for data-free metrics."""
    scores = channel_scores(get_metric(metric), model, stats, square_attn)
    check_finite_scores(scores, f"score@{metric}")  # data-free metrics too: a NaN weight gives a NaN score
    return scores_to_tensors(scores)


def standardize(score_tensors: dict, arch) -> dict:
    """AL units as the AL structures rank them: groups [L, kv] and channels [L, I], z-scored per layer."""
    scores = scores_from_tensors(score_tensors)
    check_finite_scores(scores, "standardize")
    groups, channels = standardized_units(scores, arch)
    # the per-layer tensor format of every stage file (`layers.{i}.NAME`), one row per layer
    return {f"layers.{i}.{name}": t[i].contiguous() for name, t in (("groups", groups), ("channels", channels))
            for i in range(arch.num_layers)}


def units_from_tensors(t: dict, arch) -> tuple:
    """(groups [L, kv], channels [L, I]) from a standardize stage file; refused if a layer is missing."""
    want = {f"layers.{i}.{n}" for i in range(arch.num_layers) for n in ("groups", "channels")}
    if set(t) != want:
        raise FlapError(f"standardized units do not fit the model's {arch.num_layers} layers "
                        f"(tensor {sorted(set(t) ^ want)[0]}); refusing them")
    return tuple(torch.stack([t[f"layers.{i}.{n}"] for i in range(arch.num_layers)]) for n in ("groups", "channels"))


def checked_scores(tensors: dict, meta: dict, arch, metric: str, where: str) -> dict:
    """Score tensors of a file written by the score stage, refused unless they are `metric`'s and fit the
    model (one attention and one MLP row per layer, of the model's widths)."""
    if meta.get("metric") != metric:
        raise FlapError(f"{where} holds {meta.get('metric')!r} scores, not {metric!r}; refusing it: "
                        "rerun dvc repro")
    widths = {"attn": arch.num_heads * arch.head_dim, "mlp": arch.intermediate_size}
    want = {f"layers.{i}.{m}" for i in range(arch.num_layers) for m in widths}
    if set(tensors) != want:
        odd = sorted(set(tensors) ^ want)[0]
        raise FlapError(f"{where} does not fit the model's {arch.num_layers} layers (tensor {odd}); refusing it")
    for k, t in tensors.items():
        if tuple(t.shape) != (widths[k.rsplit(".", 1)[1]],):
            raise FlapError(f"{where}: tensor {k} has shape {tuple(t.shape)}, not ({widths[k.rsplit('.', 1)[1]]},); "
                            "refusing it")
    return tensors
