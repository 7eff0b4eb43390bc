"""How scores become a selection: per-layer/per-module standardization and the global threshold; the helpers
the structures (one module each in flap_exp.methods.structure, registered in catalogue.STRUCTURES) select with.

    ul_um  uniform layers, uniform modules: every layer drops floor(p*groups) groups and MLP channels take the
           rest of the layer's share p (ul_rounding="fill", the default); "floor" is the official rule,
           floor(p*I) channels, which misses the ratio when p*groups is not whole (SmolLM2, 3 groups: 0.2 -> 0.15)
    ul_mm  uniform layers, manual modules: remove_groups // L groups per layer, MLP channels fill the budget
           (the nearest whole channel with "fill", rounded down as the official code with "floor")
    al_mm  adaptive layers, manual modules: remove_groups groups globally, MLP channels globally
    al_am  adaptive layers and modules: one ranking of groups and channels, weighted by parameter cost (FLAP)

UL structures rank raw scores within a layer, a group scoring the SUM of its channels; AL structures
z-score each (layer, module) row of channel scores and give a group the MEAN of its standardized channels.
Ties follow the official code: UL keeps score >= the k-th smallest, AL-AM keeps score > tau.

AL-AM weighs a group by its exact parameter cost in MLP-channel units (head_cost="exact"); head_cost="official"
is the official code's truncated integer cost, int(4*head_dim/3) per MHA head (512/3 -> 170 on LLaMA-7B),
generalised as int(group cost / channel cost): a compatibility mode that reproduces its masks exactly.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import query_units as qu
from .arch import ArchView
from .catalogue import OBS_DAMPING, STRUCTURES, structures_where
from .errors import FlapError
from .integrity import check_finite_scores
from .selection import Selection

Scores = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (attention channel scores, MLP channel scores)

UL_ROUNDING = ("fill", "floor")
HEAD_COSTS = ("exact", "official")
ATTN_UNITS = ("group", "query")


@dataclass(frozen=True)
class StructureOptions:
    min_groups: int = 0  # per layer; 0 as in the official code (a layer may lose all its attention)
    min_channels: int = 0  # per layer
    # MM structures only: groups removed over the whole model. None: 3/4 of the ratio's share of groups,
    # the proportion of the official ablation script (384 of 1024 heads at p = 0.5).
    remove_groups: int | None = None
    # UL structures: "fill" (default) lets MLP channels take the part of a layer's share that whole groups
    # cannot meet, so every structure reaches its ratio within one unit's cost per layer and comparisons are
    # at equal budgets; "floor" is the official per-layer floor(p * units), kept for compatibility.
    ul_rounding: str = "fill"
    # AL-AM: "exact" group cost; "official" the official code's truncated integer cost (compatibility).
    head_cost: str = "exact"
    # "group": k/v groups go whole (FLAP); "query": query heads inside a group go too, k/v once all its heads
    # have gone (query_units.py), so a model with one k/v head can still lose attention weights. Costs exact.
    attn_unit: str = "group"
    # metric obs only: units removed per greedy step (1: one at a time, ZipLM; more: SlimGPT's batched removal)
    obs_batch: int = 1
    # metric obs only: λ = obs_damping x mean diag Σ in H = Σ + λI (catalogue.OBS_DAMPING: lsq's default)
    obs_damping: float = OBS_DAMPING
    # structure kl_search only (allocation_search.py): levels on a grid of this step around the ratio; 0.05 puts
    # the study's ratios (0.2, 0.3, 0.5) on it and gives a layer 19 levels from 0 to the cap 0.9
    search_step: float = 0.05
    # fitness evaluations in all (the uniform start included); 1 is the uniform allocation. 32: what the quick
    # protocol affords on a 2-core CPU (~5 s a candidate for SmolLM2-135M on 8 windows); protocols set theirs
    search_candidates: int = 32
    # calibration windows the fitness's KL reads (the first ones; never an evaluation text): 8 x 128 tokens
    search_windows: int = 8
    search_seed: int = 0
    # the levels of an earlier search (the pipeline's allocate stage): the OBS pass uses them, nothing is searched
    levels: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name, valid in (("ul_rounding", UL_ROUNDING), ("head_cost", HEAD_COSTS), ("attn_unit", ATTN_UNITS)):
            if getattr(self, name) not in valid:
                raise FlapError(f"{name} must be one of {', '.join(valid)}; got {getattr(self, name)!r}")
        for name in ("min_groups", "min_channels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise FlapError(f"{name} must be a non-negative integer; got {getattr(self, name)!r}")
        if isinstance(self.obs_batch, bool) or not isinstance(self.obs_batch, int) or self.obs_batch < 1:
            raise FlapError(f"obs_batch must be an integer >= 1; got {self.obs_batch!r}")
        d = self.obs_damping
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
            raise FlapError(f"obs_damping must be a finite number >= 0; got {d!r}")
        st = self.search_step
        if isinstance(st, bool) or not isinstance(st, (int, float)) or not 0 < st < 1:
            raise FlapError(f"search_step must be a number in (0, 1); got {st!r}")
        for name, least in (("search_candidates", 1), ("search_windows", 1), ("search_seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise FlapError(f"{name} must be an integer >= {least}; got {v!r}")
        if self.levels is not None and not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in self.levels):
            raise FlapError(f"levels must be per-layer shares in [0, 1); got {self.levels!r}")


def group_cost(arch: ArchView, head_cost: str = "exact") -> float:
    """A k/v group's cost in MLP-channel units: exact, or truncated to an integer as the official code does."""
    exact = arch.group_params / arch.channel_params
    return float(math.floor(exact)) if head_cost == "official" else exact


def standardize(rows: torch.Tensor) -> torch.Tensor:
    """Z-score each row with the Bessel-corrected std (torch default); a constant row becomes 0."""
    mean = rows.mean(-1, keepdim=True)
    std = rows.std(-1, keepdim=True)
    return torch.where(std > 0, (rows - mean) / torch.where(std > 0, std, 1), torch.zeros_like(rows))


def group_scores(attn_channels: torch.Tensor, arch: ArchView, reduce: str) -> torch.Tensor:
    """Aggregate attention channel scores [..., H*hd] into k/v-group scores [..., num_kv_heads]."""
    g = attn_channels.reshape(*attn_channels.shape[:-1], arch.num_kv_heads, arch.group_size * arch.head_dim)
    return g.sum(-1) if reduce == "sum" else g.mean(-1)


def standardized_units(scores: Scores, arch: ArchView) -> tuple[torch.Tensor, torch.Tensor]:
    """AL scores: (groups [L, kv], channels [L, I]) after per-layer, per-module standardization."""
    attn = standardize(torch.stack([a for a, _ in scores]))
    mlp = standardize(torch.stack([m for _, m in scores]))
    return group_scores(attn, arch, "mean"), mlp


def keep_top(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Official UL rule: threshold = the n_remove-th smallest score, keep score >= threshold."""
    if n_remove <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if n_remove >= scores.numel():
        return torch.zeros_like(scores, dtype=torch.bool)
    return scores >= scores.sort().values[n_remove]


def remove_lowest(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Keep-mask removing exactly the n_remove lowest scores (over all elements)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[scores.flatten().argsort()[:max(0, min(n_remove, scores.numel()))]] = False
    return keep.view(scores.shape)


def enforce_minimum(keep: torch.Tensor, scores: torch.Tensor, minimum: int) -> torch.Tensor:
    """Per row of [L, n], keep at least `minimum` units: the best-scoring ones."""
    if minimum <= 0:
        return keep
    keep = keep.clone()
    top = scores.topk(min(minimum, scores.shape[-1]), dim=-1).indices
    keep.scatter_(-1, top, True)
    return keep


def _mm_channels(arch: ArchView, ratio: float, n_removed: int, layers: int, rounding: str = "floor") -> int:
    """MLP channels that fill the budget left by the groups: rounded down (official) or to the nearest."""
    budget = (layers * ratio * arch.layer_params - n_removed * arch.group_params) / arch.channel_params
    n = math.floor(budget) if rounding == "floor" else math.floor(budget + 0.5)
    return max(0, min(layers * arch.intermediate_size, n))


def groups_removed(opts: StructureOptions, arch: ArchView, ratio: float) -> int:
    if opts.remove_groups is not None:
        return opts.remove_groups
    return math.floor(0.75 * ratio * arch.num_layers * arch.num_kv_heads)


def ul_layer(attn: torch.Tensor, mlp: torch.Tensor, arch: ArchView, ratio: float, opts: StructureOptions,
             n_groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection inside one layer (UL-UM, or UL-MM when n_groups is given); usable sequentially."""
    g = group_scores(attn, arch, "sum")
    if n_groups is None and opts.ul_rounding == "floor":  # official UL-UM: floor(p * units) of each module
        keep_g = keep_top(g, math.floor(ratio * arch.num_kv_heads))
        keep_c = keep_top(mlp, math.floor(ratio * arch.intermediate_size))
    else:  # whole groups first (UL-UM: those that fit in the attention share), channels fill the layer's budget
        n_groups = math.floor(ratio * arch.num_kv_heads) if n_groups is None else n_groups
        keep_g, keep_c = keep_top(g, n_groups), keep_top(mlp, _mm_channels(arch, ratio, n_groups, 1, opts.ul_rounding))
    return (enforce_minimum(keep_g[None], g[None], opts.min_groups)[0],
            enforce_minimum(keep_c[None], mlp[None], opts.min_channels)[0])


def ul_layer_query(attn: torch.Tensor, mlp: torch.Tensor, arch: ArchView, ratio: float,
                   opts: StructureOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """UL-UM with query-head slots: floor(p * G) slots (as groups: the share p of the units, rounded down), then
    MLP channels fill the layer's budget by the slots' exact cost ("fill"), or floor(p * I) ("floor")."""
    slot_scores, order = qu.slots(qu.head_scores(attn, arch, "sum"), arch)
    keep_s = enforce_minimum(keep_top(slot_scores, qu.ul_slots_removed(arch, ratio))[None], slot_scores[None],
                             opts.min_groups)[0]
    if opts.ul_rounding == "floor":
        n_ch = math.floor(ratio * arch.intermediate_size)
    else:
        budget = ratio * arch.layer_params - qu.removed_attn_params(int((~keep_s).sum()), arch)
        n_ch = max(0, min(arch.intermediate_size, math.floor(budget / arch.channel_params + 0.5)))
    keep_c = enforce_minimum(keep_top(mlp, n_ch)[None], mlp[None], opts.min_channels)[0]
    return qu.keep_heads_from_slots(keep_s, order, arch), keep_c


def al_mm_units(groups: torch.Tensor, channels: torch.Tensor, arch: ArchView, ratio: float,
                opts: StructureOptions) -> Selection:
    """AL-MM from standardized units (groups [L, kv], channels [L, I]), as the standardize stage writes them."""
    n_groups = groups_removed(opts, arch, ratio)
    keep_g = enforce_minimum(remove_lowest(groups, n_groups), groups, opts.min_groups)
    keep_c = remove_lowest(channels, _mm_channels(arch, ratio, n_groups, arch.num_layers))
    keep_c = enforce_minimum(keep_c, channels, opts.min_channels)
    return Selection(list(keep_g), list(keep_c))


def al_am_query(scores: Scores, arch: ArchView, ratio: float, opts: StructureOptions) -> Selection:
    """AL-AM over query-head slots (a slot scores the mean of its heads' standardized channels) and MLP channels,
    each weighted by its exact cost in MLP-channel units (a layer's last slot carries its k/v heads)."""
    attn = standardize(torch.stack([a for a, _ in scores]))
    channels = standardize(torch.stack([m for _, m in scores]))
    slot_scores, order = qu.slots(qu.head_scores(attn, arch, "mean"), arch)
    cost = (qu.slot_params(arch) / arch.channel_params).expand_as(slot_scores)
    keep_s, keep_c = _al_am_keep(slot_scores, cost, channels, ratio, opts)
    return Selection.from_heads([qu.keep_heads_from_slots(keep_s[i], order[i], arch) for i in range(arch.num_layers)],
                                list(keep_c), arch)


def al_am_units(groups: torch.Tensor, channels: torch.Tensor, arch: ArchView, ratio: float,
                opts: StructureOptions) -> Selection:
    """AL-AM from standardized units (groups [L, kv], channels [L, I]), as the standardize stage writes them."""
    cost = torch.full(groups.shape, group_cost(arch, opts.head_cost), dtype=torch.float64)
    keep_g, keep_c = _al_am_keep(groups, cost, channels, ratio, opts)
    return Selection(list(keep_g), list(keep_c))


def _al_am_keep(groups: torch.Tensor, group_costs: torch.Tensor, channels: torch.Tensor, ratio: float,
                opts: StructureOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept attention units, kept channels) of one global ranking; attention units weigh `group_costs` each
    (in MLP-channel units), a channel 1."""
    if ratio == 0:  # the official search would still drop the lowest unit (keep > tau)
        return torch.ones_like(groups, dtype=torch.bool), torch.ones_like(channels, dtype=torch.bool)
    # Per-layer floors count toward the budget: the units a floor keeps rank first, so the threshold takes
    # the whole ratio from the other units and the selection still reaches it (with no floor, as official).
    floor_g = enforce_minimum(torch.zeros_like(groups, dtype=torch.bool), groups, opts.min_groups)
    floor_c = enforce_minimum(torch.zeros_like(channels, dtype=torch.bool), channels, opts.min_channels)
    groups, channels = groups.masked_fill(floor_g, math.inf), channels.masked_fill(floor_c, math.inf)
    units = torch.cat([groups.flatten(), channels.flatten()])
    cost = torch.cat([group_costs.flatten().to(torch.float64), torch.ones(channels.numel(), dtype=torch.float64)])
    order = units.argsort(descending=True, stable=True)
    cum = cost[order].cumsum(0)
    k = int((cum - (1 - ratio) * cum[-1]).abs().argmin())
    tau = units[order[k]]
    return (groups > tau) | floor_g, (channels > tau) | floor_c


StructureFn = Callable[[Scores, ArchView, float, StructureOptions], Selection]


def _finite_first(name: str, fn: StructureFn) -> StructureFn:
    """The registry's entry: a NaN/Inf score never reaches a selection (NaN sorts arbitrarily; one NaN
    poisons a whole z-scored row), so it is refused with the layer and module named."""
    def checked(scores: Scores, arch: ArchView, ratio: float, opts: StructureOptions) -> Selection:
        check_attn_unit(name, opts)
        check_finite_scores(scores, f"structure {name}")
        return fn(scores, arch, ratio, opts)
    checked.__name__, checked.__doc__ = fn.__name__, fn.__doc__
    return checked


def select_from_units(name: str, groups: torch.Tensor, channels: torch.Tensor, arch: ArchView, ratio: float,
                      opts: StructureOptions) -> Selection:
    """An adaptive structure's selection from standardized units; refuses non-finite units and bad shapes."""
    if opts.attn_unit == "query":
        raise FlapError(f"attn_unit 'query' with {name} ranks query heads, which the standardized k/v-group units "
                        "do not hold; run it with `flap-exp prune --attn-unit query` (or ul_um in the study)")
    units = STRUCTURES.get(name).units
    if units is None:
        raise FlapError(f"structure {name!r} does not rank standardized units; "
                        f"adaptive ones: {', '.join(structures_where('adaptive'))}")
    want = {"groups": (arch.num_layers, arch.num_kv_heads), "channels": (arch.num_layers, arch.intermediate_size)}
    for what, t in (("groups", groups), ("channels", channels)):
        if tuple(t.shape) != want[what]:
            raise FlapError(f"standardized {what} have shape {tuple(t.shape)}, the model needs {want[what]}")
        if not bool(torch.isfinite(t).all()):
            raise FlapError(f"standardized {what} hold NaN/Inf; refusing to select from them")
    return units(groups, channels, arch, check_ratio(ratio), opts)


def check_attn_unit(structure: str, opts: StructureOptions) -> None:
    if opts.attn_unit == "query" and not STRUCTURES.get(structure).query_units:
        raise FlapError(f"attn_unit 'query' (query-head units) works with structures "
                        f"{', '.join(structures_where('query_units'))}; not {structure!r}")


def get_structure(name: str) -> StructureFn:
    """The registered structure (flap_exp.methods.structure), refusing non-finite scores first."""
    return _finite_first(name, STRUCTURES.get(name).obj)


def check_ratio(ratio: float) -> float:
    if not (isinstance(ratio, (int, float)) and 0 <= ratio < 1):
        raise FlapError(f"pruning ratio must be in [0, 1), got {ratio!r}")
    return float(ratio)
