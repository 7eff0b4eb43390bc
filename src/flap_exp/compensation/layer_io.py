"""A decoder layer split at its output projections, for the passes that refit them (lsq, OBS): the input of
o_proj and of down_proj for given hidden states (a forward stopped by a pre-hook right there), the refit
projection applied, and a check that h + post(o(attn)) then + post(down(mlp(norm))) is what the layer computes.
Its own module so that the OBS selection does not depend on the lsq compensation's pass (dvc.yaml's deps)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..arch import block_output, mlp_input
from ..errors import FlapError
from ..families import FAMILIES, Family

if TYPE_CHECKING:
    from ..arch import DecoderLayer


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


def down_input(layer: DecoderLayer, h_mid: torch.Tensor, fam: Family = FAMILIES["llama"]) -> torch.Tensor:
    """down_proj's input for the residual stream h_mid after the attention block (through the family's MLP norm)."""
    return _input_of(layer.mlp.down_proj, lambda: layer.mlp(mlp_input(layer, fam, h_mid)))


def apply_kept(x: torch.Tensor, keep: torch.Tensor | slice, linear: nn.Linear, w_kept: torch.Tensor,
           bias: torch.Tensor) -> torch.Tensor:
    """The compensated projection: x[..., K] W'_K^T + (own bias + b)."""
    total = bias if linear.bias is None else bias + linear.bias.to(torch.float64)
    return x[..., keep] @ w_kept.to(x.dtype).T + total.to(x.dtype)


def check_decomposition(layer: DecoderLayer, h: torch.Tensor, kw: dict, fam: Family) -> None:
    """The pass splits a layer as h + post(o(attn)) then + post(down(mlp(norm))) (post: the family's output
    norm or nothing); check that it is what the layer does."""
    mid = h + block_output(layer, fam.attn_out_norm, layer.self_attn.o_proj(o_input(layer, h, kw)))
    out = mid + block_output(layer, fam.mlp_out_norm, layer.mlp.down_proj(down_input(layer, mid, fam)))
    ref = layer(h, **kw)
    ref = ref[0] if isinstance(ref, tuple) else ref
    if not torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max().clamp_min(1))):
        raise FlapError(f"{type(layer).__name__} is not a pre-norm residual attention + MLP layer; lsq/OBS cannot "
                        "refit it")
