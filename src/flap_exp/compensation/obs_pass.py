"""The OBS selection pass: greedy structured OBS on each layer's o_proj and down_proj, sequentially.

For decoder layer l, on the pruned model's own stream (layers < l already pruned and refit by lsq):
the full covariance Σ of o_proj's input (float64, d_attn^2), greedy OBS over the k/v groups (the o_proj
column block of a group) with H = Σ + λI, the kept groups' columns refit by `lsq_solve` (so the stream is
exactly what the lsq compensation of the same selection computes), then the same for down_proj over MLP
channels with the compensated attention. The pass gives the selection, the per-layer error curves (the
curve allocation's input) and the stream's channel statistics (what Wanda-sp's sequential pass records).

The dense layers are never changed: a kept head's context and a kept MLP channel do not depend on the
removed ones, so the pruned stream is the dense layer's inputs to o_proj/down_proj, restricted to the kept
columns, through the refit projections (as in compensation/lsq.py). Memory beyond lsq's: one full d_in^2
float64 Σ and H^-1 per projection (SmolLM2's MLP: 2 x 19 MB; LLaMA-7B's: 2 x 0.97 GB).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..arch import ArchView, block_output
from ..stats import ChannelStats, LayerStats
from .base import LayerComp
from .covariance import CovAccumulator
from .layer_io import apply_kept, check_decomposition, down_input, o_input
from .lsq_solve import lsq_solve
from .obs import damped, greedy_obs

if TYPE_CHECKING:
    from ..allocation import Counts, Curve
    from ..arch import DecoderLayer


@dataclass
class ObsLayer:
    keep_groups: torch.Tensor  # bool [num_kv_heads]
    keep_channels: torch.Tensor  # bool [intermediate_size]
    stats: LayerStats  # the pruned stream's o_proj / down_proj input statistics
    curves: tuple[Curve, Curve]  # (attention over groups, MLP over channels): (units removed, loss)
    refit: LayerComp | None = None  # the kept columns' lsq refit (keep_refit): lsq's LayerComp for this selection


class ObsPass:
    """step(i, dense layer i) in layer order -> ObsLayer. counts: per layer (groups, channels) to remove;
    full_curves: run each greedy to the last unit (the curve allocation's first pass), keeping only the counts'
    first units; store_budget: bytes of MLP inputs held to avoid recomputing gate/up (0 when streamed); keep_refit:
    return each layer's refit (the o_proj/down_proj kept columns and biases: lsq's LayerComp, which a cell then
    need not recompute; off when the layers' refits would not fit in memory, as when streamed)."""

    def __init__(self, hs: list[torch.Tensor], kws: list[list[dict]], arch: ArchView, counts: Counts, damping: float,
                 batch: int = 1, full_curves: bool = False, store_budget: int = 2 * 2**30, keep_refit: bool = False):
        self.hs, self.kws, self.arch, self.counts = list(hs), kws, arch, counts
        self.damping, self.batch, self.full, self.store_budget = damping, batch, full_curves, store_budget
        self.keep_refit = keep_refit
        self.next = 0

    def _project(self, i: int, name: str, w: torch.Tensor, xs: Iterator[torch.Tensor], unit: int, n: int,
                 n_units: int, hold: bool):
        """Statistics of one projection's input, greedy OBS, the lsq refit of the kept columns (and the inputs
        themselves when `hold`, for the layer's output)."""
        acc = CovAccumulator(w.shape[1], w.device)
        cs = ChannelStats.empty(w.shape[1], w.device)
        held = []
        for x in xs:
            acc.update(x)
            cs = cs.update(x)
            if hold:
                held.append(x)
        cov, _ = acc.finish()
        label = f"layer {i} {name}"
        res = greedy_obs(w, damped(cov, self.damping), unit, n_units if self.full else n, self.batch, label)
        keep = torch.ones(n_units, dtype=torch.bool)
        keep[res.removed[:n]] = False
        cols = keep.repeat_interleave(unit).to(w.device)
        w_k, b = lsq_solve(w, cov, acc.mean, cols, self.damping, name=label)
        return keep, cols, w_k, b, cs, (res.counts, res.loss), held

    @torch.no_grad()
    def step(self, i: int, layer: DecoderLayer) -> ObsLayer:
        if i != self.next:
            raise ValueError(f"the OBS pass is at layer {self.next}, not {i}")
        self.next += 1
        arch, kws = self.arch, [k[i] for k in self.kws]  # kws[batch][layer]: each layer's own mask and rotary
        if i == 0:
            check_decomposition(layer, self.hs[0], kws[0], arch.fam)
        o, down = layer.self_attn.o_proj, layer.mlp.down_proj
        n_g, n_c = self.counts[i]
        xs = (o_input(layer, h, kw) for h, kw in zip(self.hs, kws, strict=True))
        keep_g, cols, w_o, b_o, s_a, c_a, held = self._project(i, "o_proj", o.weight, xs,
                                                              arch.group_size * arch.head_dim, n_g, arch.num_kv_heads,
                                                              True)
        # the family's output norms (Gemma's post-norms; none for LLaMA) as the lsq pass applies them
        hs = [h + block_output(layer, arch.fam.attn_out_norm, apply_kept(x, cols, o, w_o, b_o))
              for h, x in zip(self.hs, held, strict=True)]
        del held
        per = sum(h[..., :1].numel() for h in hs) * arch.intermediate_size * hs[0].element_size()
        xs = (down_input(layer, h, arch.fam) for h in hs)
        hold = per <= self.store_budget  # above the budget the MLP inputs are recomputed for the layer's output
        keep_c, cols, w_d, b_d, s_m, c_m, held = self._project(i, "down_proj", down.weight, xs, 1, n_c,
                                                              arch.intermediate_size, hold)
        if not hold:
            held = [down_input(layer, h, arch.fam) for h in hs]
        self.hs = [h + block_output(layer, arch.fam.mlp_out_norm, apply_kept(x, cols, down, w_d, b_d))
                   for h, x in zip(hs, held, strict=True)]
        refit = LayerComp(b_o, b_d, w_o, w_d) if self.keep_refit else None  # what LsqPass.step returns
        return ObsLayer(keep_g, keep_c, LayerStats(s_a, s_m), (c_a, c_m), refit)
