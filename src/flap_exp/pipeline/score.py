"""Stages score and standardize: per-layer channel scores of one metric, and their AL z-scored units."""
from __future__ import annotations


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
    from ..metrics import channel_scores, get_metric
    return scores_to_tensors(channel_scores(get_metric(metric), model, stats, square_attn))


def standardize(score_tensors: dict, arch) -> dict:
    """AL units as the AL structures rank them: groups [L, kv] and channels [L, I], z-scored per layer."""
    from ..structures import standardized_units
    groups, channels = standardized_units(scores_from_tensors(score_tensors), arch)
    return {"groups": groups, "channels": channels}
