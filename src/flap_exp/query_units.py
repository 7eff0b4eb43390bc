"""Query heads as attention units (StructureOptions.attn_unit = "query"), beside whole k/v groups.

A layer keeps one query-head count G' for all its kept k/v groups (stock attention needs one G'), so the
unit a structure ranks is a *slot*: slot r of a layer is the r-th lowest-scoring query head of every k/v
group (n_kv heads). Slot scores grow with r (each group's r-th order statistic does), so a threshold always
removes a layer's lowest slots first and every kept group keeps the same heads count. With one k/v head
(Gemma-3-270M: 4 query heads, 1 k/v head) a slot is a single query head.

Exact costs in weights: a slot's q rows and o_proj columns, 2 n_kv d hd; the last slot of a layer also frees
the k/v heads (another 2 n_kv d hd), so removing all G slots costs what the layer's groups cost.
"""
from __future__ import annotations

import math

import torch

from .arch import ArchView


def head_scores(attn_channels: torch.Tensor, arch: ArchView, reduce: str) -> torch.Tensor:
    """Attention channel scores [..., H*hd] -> query-head scores [..., H] (sum or mean over the head's channels)."""
    h = attn_channels.reshape(*attn_channels.shape[:-1], arch.num_heads, arch.head_dim)
    return h.sum(-1) if reduce == "sum" else h.mean(-1)


def slots(heads: torch.Tensor, arch: ArchView) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot scores [..., G] (the mean over groups), order [..., kv, G]: head index within its group of each
    slot, lowest first) from head scores [..., H]."""
    per_group = heads.reshape(*heads.shape[:-1], arch.num_kv_heads, arch.group_size)
    sorted_, order = per_group.sort(dim=-1, stable=True)
    return sorted_.mean(-2), order


def slot_params(arch: ArchView) -> torch.Tensor:
    """Weights removed by each slot [G], in layer order of removal (lowest slot first)."""
    step = 2 * arch.num_kv_heads * arch.hidden_size * arch.head_dim
    cost = torch.full((arch.group_size,), float(step), dtype=torch.float64)
    cost[-1] += step  # the last slot frees the k and v heads too
    return cost


def keep_heads_from_slots(keep_slots: torch.Tensor, order: torch.Tensor, arch: ArchView) -> torch.Tensor:
    """Keep-mask over the layer's heads [H] from its kept slots [G] and their order [kv, G]."""
    keep = torch.zeros(arch.num_kv_heads, arch.group_size, dtype=torch.bool)
    keep.scatter_(1, order, keep_slots.expand(arch.num_kv_heads, -1).clone())
    return keep.flatten()


def ul_slots_removed(arch: ArchView, ratio: float) -> int:
    """UL: the slots a layer drops, as whole groups do: the share p of its attention units, rounded down."""
    return math.floor(ratio * arch.group_size)


def removed_attn_params(n_slots: int, arch: ArchView) -> float:
    """Weights removed by a layer's n lowest slots."""
    return float(slot_params(arch)[:n_slots].sum())
