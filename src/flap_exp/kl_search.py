"""The kl_search allocation's evolutionary search over per-layer levels (pure: no model, no data).

EvoPress (Sieberling, Kuznedelev, Kurtic, Alistarh, 2024) and Týr-the-Pruner (NeurIPS 2025): every layer has
a database of pruned variants, one per level (the share of its attention + MLP weights it removes); a
candidate is a level per layer; its fitness is the KL divergence of the pruned model's next-token distribution
to the dense model's. The search mutates the best candidate by "level switches": one step of ratio moves from
one layer to another, so every candidate's mean level is the ratio and, through allocation.layer_counts, the
model's removed share is the ratio to within a channel per layer.

A candidate is stored as integer offsets d_l (level_l = ratio + d_l * step, sum d_l = 0) within per-layer
bounds: level >= 0, level <= the cap, and the per-layer floors (min_groups, min_channels) kept.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .allocation import LOG_CAP, layer_counts
from .arch import ArchView
from .errors import FlapError

Offsets = tuple[int, ...]

#: Offspring per generation of the (1 + λ) search: few, so that the best moves often within a small budget
#: (EvoPress's own schedule starts at 64 offspring, for budgets of thousands of candidates).
OFFSPRING = 4
#: Level switches per offspring: 1 to this many, drawn uniformly (EvoPress mutates by one to a few switches).
MAX_MOVES = 3


@dataclass
class SearchResult:
    levels: list[float]  # per layer: the share of its attention + MLP weights it removes
    offsets: list[int]  # per layer: (level - ratio) / step
    kl: float  # the fitness of the chosen levels
    uniform_kl: float  # the fitness of the uniform start (every layer the ratio)
    candidates: int  # fitness evaluations spent
    history: list[dict] = field(default_factory=list)  # per generation: {generation, candidates, best_kl}


def level_bounds(arch: ArchView, ratio: float, step: float, min_groups: int = 0, min_channels: int = 0,
                 cap: float = LOG_CAP) -> tuple[list[int], list[int]]:
    """(lowest, highest) offset of every layer: levels ratio + d * step in [0, cap] whose counts keep the
    per-layer floors. The same for every layer (the floors are per layer); lists for the search's sake."""
    if not 0 < step < 1:
        raise FlapError(f"search_step must be in (0, 1), got {step}")
    lo = -int(ratio / step + 1e-9)

    def fits(d: int) -> bool:
        level = ratio + d * step
        if level > cap + 1e-9:
            return False
        (g, c), = layer_counts(arch, [level])
        return g <= arch.num_kv_heads - min_groups and c <= arch.intermediate_size - min_channels

    if not fits(0):
        raise FlapError(f"the per-layer floors (min_groups {min_groups}, min_channels {min_channels}) or the cap "
                        f"{cap} leave no layer room for the ratio {ratio}")
    hi = 0
    while fits(hi + 1):
        hi += 1
    return [lo] * arch.num_layers, [hi] * arch.num_layers


def levels_of(offsets, ratio: float, step: float) -> list[float]:
    return [max(0.0, ratio + d * step) for d in offsets]


def _ups(d: list[int], lo: list[int], hi: list[int]) -> list[int]:
    """Layers that can go up a step while another layer can go down one."""
    down = [j for j in range(len(d)) if d[j] > lo[j]]
    return [i for i in range(len(d)) if d[i] < hi[i] and any(j != i for j in down)]


def can_move(offsets: Offsets, lo: list[int], hi: list[int]) -> bool:
    return bool(_ups(list(offsets), lo, hi))


def mutate(offsets: Offsets, lo: list[int], hi: list[int], moves: int, gen: torch.Generator) -> Offsets:
    """`moves` level switches: one layer (below its highest offset) up a step, another (above its lowest) down
    one, both drawn uniformly by `gen`; the sum of offsets stays 0. Fewer when no switch is possible."""
    d = list(offsets)
    for _ in range(moves):
        up = _ups(d, lo, hi)
        if not up:
            break
        i = up[int(torch.randint(len(up), (1,), generator=gen))]
        down = [j for j in range(len(d)) if d[j] > lo[j] and j != i]
        j = down[int(torch.randint(len(down), (1,), generator=gen))]
        d[i], d[j] = d[i] + 1, d[j] - 1
    return tuple(d)


Fitness = Callable[[Offsets, object], tuple[float, object]]


def evolve(fitness: Fitness, lo: list[int], hi: list[int], candidates: int, seed: int,
           progress: bool = True) -> tuple[Offsets, float, float, int, list[dict]]:
    """(best offsets, its fitness, the uniform start's fitness, candidates evaluated, history) of a seeded
    (1 + λ) search from the uniform offsets, elitist (the parent survives unless an offspring beats it),
    bounded by `candidates` fitness evaluations in all (the uniform start included). fitness(offsets, base)
    -> (kl, state): `base` is the parent's (offsets, state), which a fitness may reuse (its layers' inputs)."""
    if candidates < 1:
        raise FlapError(f"search_candidates must be >= 1, got {candidates}")
    gen = torch.Generator().manual_seed(seed)
    best: Offsets = (0,) * len(lo)
    best_kl, state = fitness(best, None)
    uniform_kl, seen, used = best_kl, {best: best_kl}, 1
    history = [{"generation": 0, "candidates": used, "best_kl": best_kl}]
    bar = tqdm(total=candidates, initial=used, desc="kl_search", unit="cand", disable=not progress)
    while used < candidates and can_move(best, lo, hi):  # no switch possible: one layer, or all at bounds
        kids = []
        for _ in range(min(OFFSPRING, candidates - used)):
            child = mutate(best, lo, hi, 1 + int(torch.randint(MAX_MOVES, (1,), generator=gen)), gen)
            used += 1
            bar.update(1)
            if child in seen:  # a candidate already scored costs a draw, not a forward pass
                continue
            kl, st = fitness(child, (best, state))
            seen[child] = kl
            kids.append((kl, child, st))
        if kids:
            kl, child, st = min(kids, key=lambda k: k[0])
            if kl < best_kl:
                best, best_kl, state = child, kl, st
        history.append({"generation": len(history), "candidates": used, "best_kl": best_kl})
        bar.set_postfix(best_kl=f"{best_kl:.4f}")
    bar.close()
    return best, best_kl, uniform_kl, used, history
