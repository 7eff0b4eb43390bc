"""Least-squares compensation (`lsq`): one pass over the calibration windows, one layer at a time.

For each decoder layer l, o_proj is solved first (lsq_solve on the covariance of its input), then the
MLP input statistics are gathered with the compensated attention and down_proj is solved. Forms:

    sequential  statistics on the pruned model's own stream: layers < l already pruned and
                reconstructed (the form that works; the default)
    dense       statistics on the dense model's activations (one dense pass)
    drift       target = the dense model's projection output on the dense stream; regressors = the
                pruned stream's kept inputs (two streams side by side, with their cross covariance)

The caller's model is never modified: the pruned stream is computed from the dense layers' weights (a
kept head's context and a kept MLP channel do not depend on the removed ones; k/v groups go as a whole)
with the new projections applied by hand, and every hook is removed on exit. As in calibrate.py the
windows are embedded once and pushed through one layer at a time: the memory is the model, two or three
copies of the hidden states (N x T x d) per stream, the kept o_proj inputs of one layer and the
matrices of one projection: while accumulating, its d_in x |K| float64 moments (only the kept columns are
needed) plus one batch's product in float32; while solving, at most three d_in^2 float64 (four for drift;
`lsq_extra_bytes`).

Cost per layer, sequential: one attention pass (stopped at o_proj), gate/up once (their kept outputs are
held for the new down_proj when they fit in `store_budget`, else gate/up run twice), no dense
o_proj/down_proj output: about one plain layer forward plus the d_in x |K| outer products and the solves.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..arch import ArchView, block_output, decoder_layers
from ..calibrate import layer_inputs
from ..catalogue import check_compensation_params
from ..errors import FlapError
from ..selection import Selection
from ..store import ResidentStore, as_store
from .base import CompensationConfig, CompensationInputs, LayerComp
from .covariance import CovAccumulator
from .layer_io import apply_kept, check_decomposition, down_input, o_input
from .lsq_solve import lsq_solve

if TYPE_CHECKING:
    from ..arch import DecoderLayer


#: Optional observer of the statistics, called as on_moments(layer, "o_proj" | "down_proj", accumulator).
OnMoments = Callable[[int, str, CovAccumulator], None]


def check_form(cfg: CompensationConfig) -> None:
    check_compensation_params({"method": "lsq", "damping": cfg.damping, "form": cfg.form})


def lsq_extra_bytes(arch: ArchView, windows: int, seqlen: int, elem: int, form: str, store: bool) -> int:
    """Memory of the lsq pass beyond two copies of the windows' hidden states (an estimate, for budgets).

    The kept o_proj inputs of one layer (N x T x d_attn at most), the kept MLP inputs when `store`, the
    drift form's two extra hidden-state copies, and one projection's float64 matrices: the covariance (made
    in place from the moments, only its kept columns Σ[:, K]), Σ[K, K] + λI and its Cholesky factor (at
    most three d_in^2; four with drift's cross covariance).
    """
    d_max = max(arch.intermediate_size, arch.attn_channels)
    drift = form == "drift"
    per_token = arch.attn_channels + (arch.intermediate_size if store else 0) + (2 * arch.hidden_size if drift else 0)
    return windows * seqlen * per_token * elem + (4 if drift else 3) * d_max * d_max * 8


class LsqPass:
    """The lsq pass, one decoder layer per `step`, called by the engine on each dense layer as the store
    yields it (in memory, or loaded from its shard), before the layer is cut.

    hs, kws: per batch of windows, the hidden states entering decoder layer 0 and the per-layer kwargs.
    store_budget: bytes of kept MLP inputs (N x T x |K|) the pass may hold to avoid recomputing gate/up.
    on_moments: optional observer of each projection's statistics (tests check them against a plain derivation).
    """

    def __init__(self, hs: list[torch.Tensor], kws: list[list[dict]], sel: Selection, arch: ArchView,
                 cfg: CompensationConfig, store_budget: int = 2 * 2**30, on_moments: OnMoments | None = None):
        check_form(cfg)
        if len(sel.keep_groups) != arch.num_layers or len(sel.keep_channels) != arch.num_layers:
            raise FlapError(f"the selection has {len(sel.keep_groups)} layers, the model {arch.num_layers}")
        self.sel, self.arch, self.cfg, self.kws, self.store_budget = sel, arch, cfg, kws, store_budget
        self.on_moments = on_moments
        # the dense stream (dense and drift forms) and the pruned, reconstructed one (sequential and drift);
        # a form that needs only one stream drops the other's references
        self.dense = [] if cfg.form == "sequential" else list(hs)
        self.pruned = [] if cfg.form == "dense" else list(hs)
        self.next = 0

    @torch.no_grad()
    def step(self, i: int, layer: DecoderLayer) -> LayerComp:
        """Layer i's LayerComp; `layer` is the DENSE layer i (left unchanged). Layers come in order."""
        if i != self.next:
            raise FlapError(f"the lsq pass is at layer {self.next}, not {i}: layers must come in order")
        self.next += 1
        cfg, arch, kws, sel = self.cfg, self.arch, self.kws, self.sel
        dense, pruned = self.dense, self.pruned
        fam = arch.fam
        # what each block adds to the residual stream for its projection's output (a post-norm in Gemma)
        attn_out, mlp_out = (functools.partial(block_output, layer, n) for n in (fam.attn_out_norm, fam.mlp_out_norm))
        if i == 0:
            check_decomposition(layer, (dense or pruned)[0], kws[0][i], fam)
        device = layer.self_attn.o_proj.weight.device
        o, down = layer.self_attn.o_proj, layer.mlp.down_proj
        keep_a, keep_m = sel.channel_mask(i, arch).to(device), sel.keep_channels[i].to(device)
        drift = cfg.form == "drift"

        # attention: statistics of o_proj's input, then the solve
        # only the kept columns of the moments: all the solve reads (Σ[:, K]), at |K|/d of the cost
        acc = CovAccumulator(arch.attn_channels, device, arch.attn_channels if drift else None, cols=keep_a)
        kept_x, dense_mid = [], []
        for b, kw_b in enumerate(kws):
            kw = kw_b[i]
            src = dense[b] if cfg.form == "dense" else pruned[b]
            x = o_input(layer, src, kw)
            if drift:
                xd = o_input(layer, dense[b], kw)
                acc.update(x, target=xd)
                dense_mid.append(dense[b] + attn_out(o(xd)))
            else:
                acc.update(x)
                if cfg.form == "dense":
                    dense_mid.append(dense[b] + attn_out(o(x)))
            if cfg.form != "dense":
                kept_x.append(x[..., keep_a])
        if self.on_moments is not None:
            self.on_moments(i, "o_proj", acc)
        cov, cross = acc.finish()
        w_o, b_o = lsq_solve(o.weight, cov, acc.mean, keep_a, cfg.damping, cross=cross,
                             target_mean=acc.target_mean, name=f"layer {i} o_proj")
        del cov, cross
        del acc
        if cfg.form != "dense":
            pruned = [h + attn_out(apply_kept(xk, slice(None), o, w_o, b_o))
                      for h, xk in zip(pruned, kept_x, strict=True)]
        del kept_x

        # MLP: statistics of down_proj's input with the compensated attention, then the solve
        acc = CovAccumulator(arch.intermediate_size, device, arch.intermediate_size if drift else None, cols=keep_m)
        # Keeping the kept MLP inputs saves recomputing gate/up for the layer's output (~1/4 of the pass);
        # above the budget they are recomputed instead, so memory stays bounded on large models/N.
        kept_bytes = sum(h[..., :1].numel() for h in pruned) * int(keep_m.sum()) * pruned[0].element_size() \
            if pruned else 0
        store = cfg.form != "dense" and kept_bytes <= self.store_budget
        kept_x = []
        for b in range(len(kws)):
            src = dense_mid[b] if cfg.form == "dense" else pruned[b]
            x = down_input(layer, src, fam)
            if store:
                kept_x.append(x[..., keep_m])
            if drift:
                xd = down_input(layer, dense_mid[b], fam)
                acc.update(x, target=xd)
                dense_mid[b] = dense_mid[b] + mlp_out(down(xd))
            else:
                acc.update(x)
                if cfg.form == "dense":
                    dense_mid[b] = dense_mid[b] + mlp_out(down(x))
        if self.on_moments is not None:
            self.on_moments(i, "down_proj", acc)
        cov, cross = acc.finish()
        w_d, b_d = lsq_solve(down.weight, cov, acc.mean, keep_m, cfg.damping, cross=cross,
                             target_mean=acc.target_mean, name=f"layer {i} down_proj")
        del cov, cross
        del acc
        if store:  # the pruned stream's layer output, with the new down_proj
            pruned = [h + mlp_out(apply_kept(xk, slice(None), down, w_d, b_d))
                      for h, xk in zip(pruned, kept_x, strict=True)]
        elif cfg.form != "dense":
            pruned = [h + mlp_out(apply_kept(down_input(layer, h, fam), keep_m, down, w_d, b_d)) for h in pruned]
        del kept_x
        self.pruned = pruned
        if cfg.form != "sequential":
            self.dense = dense_mid
        return LayerComp(b_o, b_d, w_o, w_d)


def begin_lsq(inp: CompensationInputs, store_budget: int = 2 * 2**30,
              on_moments: OnMoments | None = None) -> Callable[[int, DecoderLayer], LayerComp]:
    """The registry's lsq step: the windows embedded once (through the store), then LsqPass.step per layer.

    store_budget: bytes of kept MLP inputs (N x T x |K|) the pass may hold to avoid recomputing gate/up; a
    streamed store holds none (its memory budget counts lsq_extra_bytes with store=False)."""
    check_form(inp.cfg)
    windows = inp.windows
    if windows is None or windows.ndim != 2 or windows.shape[0] < 1:
        shape = None if windows is None else tuple(windows.shape)
        raise FlapError(f"lsq needs calibration windows of shape N x T, got {shape}")
    if not isinstance(inp.store, ResidentStore):
        store_budget = 0  # streamed: lsq_extra_bytes(store=False) is what its memory budget counted
    hs, kws = layer_inputs(inp.store, windows, inp.batch_size)
    return LsqPass(hs, kws, inp.sel, inp.arch, inp.cfg, store_budget, on_moments).step


@torch.no_grad()
def lsq_compensation(model: nn.Module, sel: Selection, arch: ArchView, windows: torch.Tensor,
                     cfg: CompensationConfig, batch_size: int = 8, progress: bool = True,
                     on_moments: OnMoments | None = None, store_budget: int = 2 * 2**30) -> list[LayerComp]:
    """Per-layer LayerComps (float64, with new kept-column weights) for `sel` on the DENSE `model` (left
    unchanged; apply the result with surgery.mask_model / prune_model)."""
    store = as_store(model)
    inputs = CompensationInputs(store, sel, arch, cfg, None, windows, batch_size, progress)
    step = begin_lsq(inputs, store_budget, on_moments)
    return [step(i, layer) for i, layer in enumerate(tqdm(decoder_layers(model), desc=f"lsq ({cfg.form})",
                                                          unit="layer", disable=not progress))]
