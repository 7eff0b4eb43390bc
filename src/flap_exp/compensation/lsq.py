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
covariance of one projection (d_in^2 float64; twice that for drift).

Cost per layer, sequential: one attention pass (stopped at o_proj), gate/up once (their kept outputs are
held for the new down_proj when they fit in `store_budget`, else gate/up run twice), no dense
o_proj/down_proj output: about one plain layer forward plus the d_in^2 outer products and the solves.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..arch import ArchView, decoder_layers
from ..calibrate import layer0_inputs
from ..errors import FlapError
from ..selection import Selection
from .base import CompensationConfig, LayerComp
from .covariance import CovAccumulator
from .lsq_solve import lsq_solve

if TYPE_CHECKING:
    from ..arch import DecoderLayer

FORMS = ("sequential", "dense", "drift")

#: Optional observer of the statistics, called as on_moments(layer, "o_proj" | "down_proj", accumulator).
OnMoments = Callable[[int, str, CovAccumulator], None]


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _stop_before(module: nn.Module) -> Iterator[dict]:
    """Record `module`'s input and abort the forward there (what follows would be wasted work)."""
    store: dict = {}

    def pre(_m, args):
        store["x"] = args[0]
        raise _Stop

    handle = module.register_forward_pre_hook(pre)
    try:
        yield store
    finally:
        handle.remove()


def _input_of(module: nn.Module, run: Callable[[], object]) -> torch.Tensor:
    with _stop_before(module) as store:
        try:
            run()
        except _Stop:
            pass
    if "x" not in store:
        raise FlapError(f"the forward pass never reached {type(module).__name__}; not a LLaMA-shaped decoder layer")
    return store["x"]


def o_input(layer: DecoderLayer, h: torch.Tensor, kw: dict) -> torch.Tensor:
    """o_proj's input (the concatenated head contexts) for hidden states h entering `layer`."""
    return _input_of(layer.self_attn.o_proj, lambda: layer(h, **kw))


def down_input(layer: DecoderLayer, h_mid: torch.Tensor) -> torch.Tensor:
    """down_proj's input for the residual stream h_mid after the attention block."""
    return _input_of(layer.mlp.down_proj, lambda: layer.mlp(layer.post_attention_layernorm(h_mid)))


def _apply(x: torch.Tensor, keep: torch.Tensor | slice, linear: nn.Linear, w_kept: torch.Tensor,
           bias: torch.Tensor) -> torch.Tensor:
    """The compensated projection: x[..., K] W'_K^T + (own bias + b)."""
    total = bias if linear.bias is None else bias + linear.bias.to(torch.float64)
    return x[..., keep] @ w_kept.to(x.dtype).T + total.to(x.dtype)


def _check_decomposition(layer: DecoderLayer, h: torch.Tensor, kw: dict) -> None:
    """The pass splits a layer as h + o(attn) then + down(mlp(norm)); check that it is what the layer does."""
    mid = h + layer.self_attn.o_proj(o_input(layer, h, kw))
    out = mid + layer.mlp.down_proj(down_input(layer, mid))
    ref = layer(h, **kw)
    ref = ref[0] if isinstance(ref, tuple) else ref
    if not torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max().clamp_min(1))):
        raise FlapError(f"{type(layer).__name__} is not a pre-norm residual attention + MLP layer; lsq cannot "
                        "compensate it")


def check_form(cfg: CompensationConfig) -> None:
    if cfg.form not in FORMS:
        raise FlapError(f"unknown lsq form {cfg.form!r}; known: {', '.join(FORMS)}")
    d = cfg.damping
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not (d >= 0 and d != float("inf")):
        raise FlapError(f"lsq damping must be a finite number >= 0, got {d!r}")


@torch.no_grad()
def lsq_compensation(model: nn.Module, sel: Selection, arch: ArchView, windows: torch.Tensor,
                     cfg: CompensationConfig, batch_size: int = 8, progress: bool = True,
                     on_moments: OnMoments | None = None, store_budget: int = 2 * 2**30) -> list[LayerComp]:
    """Per-layer LayerComps (float64, with new kept-column weights) for `sel` on the DENSE `model`.

    store_budget: bytes of kept MLP inputs (N x T x |K|) the pass may hold to avoid recomputing gate/up.

    The model is left unchanged; apply the result with surgery.mask_model / prune_model.
    """
    check_form(cfg)
    if windows.ndim != 2 or windows.shape[0] < 1:
        raise FlapError(f"lsq needs calibration windows of shape N x T, got {tuple(windows.shape)}")
    if len(sel.keep_groups) != arch.num_layers or len(sel.keep_channels) != arch.num_layers:
        raise FlapError(f"the selection has {len(sel.keep_groups)} layers, the model {arch.num_layers}")
    device = next(model.parameters()).device
    batches = [layer0_inputs(model, b.to(device)) for b in windows.split(batch_size)]
    kws = [kw for _, kw in batches]
    dense = [h for h, _ in batches]  # the dense stream (dense and drift forms)
    pruned = list(dense)  # the pruned, reconstructed stream (sequential and drift forms)
    layers = decoder_layers(model)
    _check_decomposition(layers[0], dense[0], kws[0])
    if cfg.form == "sequential":  # only one stream is needed: drop the other's references
        dense = []
    elif cfg.form == "dense":
        pruned = []
    d_attn = arch.attn_channels
    out = []
    for i, layer in enumerate(tqdm(layers, desc=f"lsq ({cfg.form})", unit="layer", disable=not progress)):
        o, down = layer.self_attn.o_proj, layer.mlp.down_proj
        keep_a, keep_m = sel.channel_mask(i, arch).to(device), sel.keep_channels[i].to(device)
        drift = cfg.form == "drift"

        # attention: statistics of o_proj's input, then the solve
        acc = CovAccumulator(d_attn, device, d_attn if drift else None)
        kept_x, dense_mid = [], []
        for b, kw in enumerate(kws):
            src = dense[b] if cfg.form == "dense" else pruned[b]
            x = o_input(layer, src, kw)
            if drift:
                xd = o_input(layer, dense[b], kw)
                acc.update(x, target=xd)
                dense_mid.append(dense[b] + o(xd))
            else:
                acc.update(x)
                if cfg.form == "dense":
                    dense_mid.append(dense[b] + o(x))
            if cfg.form != "dense":
                kept_x.append(x[..., keep_a])
        if on_moments is not None:
            on_moments(i, "o_proj", acc)
        w_o, b_o = lsq_solve(o.weight, acc.cov, acc.mean, keep_a, cfg.damping, cross=acc.cross_cov,
                             target_mean=acc.target_mean, name=f"layer {i} o_proj")
        del acc
        if cfg.form != "dense":
            pruned = [h + _apply(xk, slice(None), o, w_o, b_o) for h, xk in zip(pruned, kept_x, strict=True)]
        del kept_x

        # MLP: statistics of down_proj's input with the compensated attention, then the solve
        acc = CovAccumulator(arch.intermediate_size, device, arch.intermediate_size if drift else None)
        # Keeping the kept MLP inputs saves recomputing gate/up for the layer's output (~1/4 of the pass);
        # above the budget they are recomputed instead, so memory stays bounded on large models/N.
        kept_bytes = sum(h[..., :1].numel() for h in pruned) * int(keep_m.sum()) * pruned[0].element_size() \
            if pruned else 0
        store = cfg.form != "dense" and kept_bytes <= store_budget
        kept_x = []
        for b in range(len(kws)):
            src = dense_mid[b] if cfg.form == "dense" else pruned[b]
            x = down_input(layer, src)
            if store:
                kept_x.append(x[..., keep_m])
            if drift:
                xd = down_input(layer, dense_mid[b])
                acc.update(x, target=xd)
                dense_mid[b] = dense_mid[b] + down(xd)
            else:
                acc.update(x)
                if cfg.form == "dense":
                    dense_mid[b] = dense_mid[b] + down(x)
        if on_moments is not None:
            on_moments(i, "down_proj", acc)
        w_d, b_d = lsq_solve(down.weight, acc.cov, acc.mean, keep_m, cfg.damping, cross=acc.cross_cov,
                             target_mean=acc.target_mean, name=f"layer {i} down_proj")
        del acc
        if store:  # the pruned stream's layer output, with the new down_proj
            pruned = [h + _apply(xk, slice(None), down, w_d, b_d) for h, xk in zip(pruned, kept_x, strict=True)]
        elif cfg.form != "dense":
            pruned = [h + _apply(down_input(layer, h), keep_m, down, w_d, b_d) for h in pruned]
        del kept_x
        if cfg.form != "sequential":
            dense = dense_mid
        out.append(LayerComp(b_o, b_d, w_o, w_d))
    return out
