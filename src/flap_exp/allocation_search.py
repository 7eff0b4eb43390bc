"""Structure kl_search's driver: the per-layer database of pruned variants, the KL fitness, the search.

1. Database (EvoPress's / Týr-the-Pruner's local pruner): one pass over the dense model's own stream. Per layer,
   the covariances of o_proj's and down_proj's inputs and one greedy OBS run of each projection to the most
   units any allowed level removes: the greedy order is nested, so its prefixes are every level's kept set.
   A variant (layer, level) is those kept units with the survivors refit by lsq (lsq_solve on the held
   covariance), built when a candidate first asks for it and cached.
2. Fitness of a candidate: the mean per-token KL(dense || candidate) over the first `search_windows`
   calibration windows (never an evaluation text), by a forward through the store with each layer's variant
   swapped in (o_proj/down_proj weights with the removed columns zero, plus lsq's bias; a zero column is a
   removed unit: masked == physical, tests/test_obs_prune.py). The dense log-probabilities are computed once;
   a candidate reuses its parent's inputs to every layer before the first one it changes.
3. kl_search.evolve over the levels; the chosen levels are the allocation of the ordinary OBS pass.

Memory beyond the model (SmolLM2-135M, N windows of T tokens, M fitness windows): the covariances, float64,
d_attn^2 + I^2 per layer (30 x 21.5 MB = 0.65 GB; LLaMA-7B's would be 35 GB: resident models of this size
only); the variant cache (VARIANT_CACHE_BYTES); the dense log-probabilities (M x T x vocab float32: 0.2 GB
for M=8), the parent's layer inputs (L x M x T x hidden float32: 71 MB) and, while the database is built, one
layer's MLP inputs (N x T x I float32: 50 MB at N=64, 0.8 GB at N=1024).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .allocation import layer_counts
from .arch import block_output
from .calibrate import layer_inputs
from .compensation.covariance import CovAccumulator
from .compensation.layer_io import down_input, o_input
from .compensation.lsq_solve import lsq_solve
from .compensation.obs import damped, greedy_obs
from .errors import FlapError
from .kl_search import SearchResult, evolve, level_bounds, levels_of

if TYPE_CHECKING:
    from .prune import PruneConfig
    from .store import LayerStore

#: Bytes of built variants kept (least recently used first out): SmolLM2-135M's variant is 4.7 MB (o_proj and
#: down_proj at full shape, float32), so about 220 of its 570 (layer, level) pairs, more than a 64-candidate
#: search visits; a variant dropped is rebuilt by one lsq solve per projection.
VARIANT_CACHE_BYTES = 1 << 30


def _cov(xs: list[torch.Tensor], d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    acc = CovAccumulator(d, device)
    for x in xs:
        acc.update(x)
    cov, _ = acc.finish()
    return cov, acc.mean


class Variants:
    """The database: per layer the projections' input moments and greedy OBS orders on the dense stream;
    get(i, layer, level) -> (o weight, o bias, down weight, down bias) at dense shapes, or None at level 0."""

    @torch.no_grad()
    def __init__(self, store: LayerStore, windows: torch.Tensor, cfg: PruneConfig, levels: list[float],
                 progress: bool = True):
        arch, o = store.arch, cfg.options
        self.arch, self.damping, self.floors = arch, o.obs_damping, (o.min_groups, o.min_channels)
        # the most units any allowed level removes (channels are not monotone in the level: a whole group more
        # leaves fewer channels to remove)
        counts = layer_counts(arch, levels, *self.floors)
        g_max, c_max = max(g for g, _ in counts), max(c for _, c in counts)
        hs, kws = layer_inputs(store, windows, cfg.batch_size)
        self.moments, self.orders = [], []
        for i in tqdm(range(store.num_layers), desc="kl_search database", unit="layer", disable=not progress):
            with store.layer(i) as layer:
                kw = [k[i] for k in kws]
                op, dp = layer.self_attn.o_proj, layer.mlp.down_proj
                xs = [o_input(layer, h, k) for h, k in zip(hs, kw, strict=True)]
                cov_o, mean_o = _cov(xs, op.in_features, op.weight.device)
                order_o = greedy_obs(op.weight, damped(cov_o, self.damping), arch.group_size * arch.head_dim,
                                     g_max, o.obs_batch, f"layer {i} o_proj").removed
                hs = [h + block_output(layer, arch.fam.attn_out_norm, op(x)) for h, x in zip(hs, xs, strict=True)]
                xs = [down_input(layer, h, arch.fam) for h in hs]
                cov_d, mean_d = _cov(xs, dp.in_features, dp.weight.device)
                order_d = greedy_obs(dp.weight, damped(cov_d, self.damping), 1, c_max, o.obs_batch,
                                     f"layer {i} down_proj").removed
                hs = [h + block_output(layer, arch.fam.mlp_out_norm, dp(x)) for h, x in zip(hs, xs, strict=True)]
                del xs
            self.moments.append((cov_o, mean_o, cov_d, mean_d))
            self.orders.append((order_o, order_d))
        self.cache: OrderedDict = OrderedDict()
        self.cache_bytes = 0

    @torch.no_grad()
    def get(self, i: int, layer, level: float):
        if level <= 0:
            return None
        key = (i, round(level, 9))
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        (g, c), = layer_counts(self.arch, [level], *self.floors)
        cov_o, mean_o, cov_d, mean_d = self.moments[i]
        out = []
        for lin, cov, mean, order, n, unit in ((layer.self_attn.o_proj, cov_o, mean_o, self.orders[i][0], g,
                                                self.arch.group_size * self.arch.head_dim),
                                               (layer.mlp.down_proj, cov_d, mean_d, self.orders[i][1], c, 1)):
            if n > len(order):
                raise FlapError(f"kl_search: level {level:g} of layer {i} is outside the database's levels")
            keep = torch.ones(lin.in_features // unit, dtype=torch.bool)
            keep[order[:n]] = False
            cols = keep.repeat_interleave(unit).to(lin.weight.device)
            w_k, b = lsq_solve(lin.weight, cov, mean, cols, self.damping, name=f"layer {i} variant {level:g}")
            w = torch.zeros_like(lin.weight)
            w[:, cols] = w_k.to(w.dtype)
            own = 0 if lin.bias is None else lin.bias.detach().double()
            out += [w, (b + own).to(w.dtype)]
        self.cache[key] = tuple(out)
        self.cache_bytes += sum(t.numel() * t.element_size() for t in out)
        while self.cache_bytes > VARIANT_CACHE_BYTES and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.cache_bytes -= sum(t.numel() * t.element_size() for t in old)
        return self.cache[key]


def _run(layer, hs: list, kw: list, variant) -> list:
    """The layer on each batch, with `variant`'s projections swapped in for the call (then restored)."""
    if variant is None:
        outs = [layer(h, **k) for h, k in zip(hs, kw, strict=True)]
    else:
        op, dp = layer.self_attn.o_proj, layer.mlp.down_proj
        saved = (op.weight, op.bias, dp.weight, dp.bias)
        try:
            for lin, w, b in ((op, *variant[:2]), (dp, *variant[2:])):
                lin.weight, lin.bias = torch.nn.Parameter(w, False), torch.nn.Parameter(b, False)
            outs = [layer(h, **k) for h, k in zip(hs, kw, strict=True)]
        finally:
            op.weight, op.bias, dp.weight, dp.bias = saved
    return [o[0] if isinstance(o, tuple) else o for o in outs]


class KLFitness:
    """fitness(offsets, base) -> (mean token KL(dense || candidate), the candidate's inputs to every layer)."""

    @torch.no_grad()
    def __init__(self, store: LayerStore, windows: torch.Tensor, batch_size: int, variants: Variants,
                 ratio: float, step: float):
        self.store, self.variants, self.ratio, self.step = store, variants, ratio, step
        self.softcap = getattr(store.config, "final_logit_softcapping", None)
        self.h0, self.kws = layer_inputs(store, windows, batch_size)
        final, _ = self._forward(None, [self.h0], 0)
        self.dense_lp = [self._logprobs(h) for h in final]

    def _logprobs(self, h: torch.Tensor) -> torch.Tensor:
        with self.store.head() as (norm, head):
            z = head(norm(h)).float()
        if self.softcap:  # the model's own head caps its logits (Gemma)
            z = torch.tanh(z / self.softcap) * self.softcap
        return torch.log_softmax(z, -1)

    def _forward(self, offsets, states: list, first: int) -> tuple[list, list]:
        """Layers first.. of the candidate (None: the dense model) from states[first], the inputs of layer
        `first`; returns (its final hidden states, its inputs to every layer: states' own before `first`)."""
        states = list(states[:first + 1])
        levels = None if offsets is None else levels_of(offsets, self.ratio, self.step)
        for i in range(first, self.store.num_layers):
            with self.store.layer(i) as layer:
                v = None if levels is None else self.variants.get(i, layer, levels[i])
                states.append(_run(layer, states[i], [k[i] for k in self.kws], v))
        return states[-1], states[:-1]

    @torch.no_grad()
    def __call__(self, offsets, base) -> tuple[float, list]:
        first, states = 0, [self.h0]
        if base is not None:  # the parent's inputs up to the first layer this candidate changes
            parent, states = base
            first = next((i for i, (a, b) in enumerate(zip(offsets, parent, strict=True)) if a != b), len(offsets))
            if first == len(offsets):
                first, states = 0, [self.h0]
        final, states = self._forward(offsets, states, first)
        total, n = 0.0, 0
        for h, lp in zip(final, self.dense_lp, strict=True):
            lq = self._logprobs(h)
            total += float((lp.exp() * (lp - lq)).sum(-1).double().sum())
            n += lp.shape[0] * lp.shape[1]
        return total / n, states


@torch.no_grad()
def search_allocation(store: LayerStore, windows: torch.Tensor, cfg: PruneConfig,
                      progress: bool = True) -> tuple[SearchResult, dict]:
    """The searched levels of cfg (structure kl_search) on the calibration windows, and the seconds spent
    (database, search). The fitness reads the first `search_windows` of them; the database all of them."""
    o = cfg.options
    lo, hi = level_bounds(store.arch, cfg.ratio, o.search_step, o.min_groups, o.min_channels)
    t0 = time.perf_counter()
    variants = Variants(store, windows, cfg, levels_of(range(min(lo), max(hi) + 1), cfg.ratio, o.search_step),
                        progress)
    fitness = KLFitness(store, windows[:o.search_windows], cfg.batch_size, variants, cfg.ratio, o.search_step)
    t1 = time.perf_counter()
    best, kl, uniform, used, history = evolve(fitness, lo, hi, o.search_candidates, o.search_seed, progress)
    res = SearchResult(levels_of(best, cfg.ratio, o.search_step), list(best), kl, uniform, used, history)
    return res, {"database": t1 - t0, "search": time.perf_counter() - t1,
                 "windows": min(o.search_windows, windows.shape[0])}
