"""Apply a selection to a model: masked (dense shapes, zeroed rows) or physically pruned.

Both add the compensation biases to o_proj and down_proj (and, for a reconstructing compensation such as
`lsq`, write its new weights into the kept input columns) and give the same outputs. Masking zeroes the
q/k/v rows of removed groups and the gate/up rows of removed channels, as the official `--unstr` does:
a removed head's context is then zero (its values are zero), and silu(0) * 0 = 0. PrunedView cuts the
layers of a store as they are read, for measuring a pruned model that is never built whole.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .arch import ArchView, decoder_layers
from .compensation.base import LayerComp, from_biases
from .families import family_of
from .modeling import PRUNED_CLASSES, EmptyAttention, new_linear
from .selection import Selection

if TYPE_CHECKING:
    from .arch import DecoderLayer
    from .store import LayerStore

# Per-layer LayerComps, or per-layer (o_proj bias, down_proj bias) pairs (compensation_biases), or None.
Biases = list[LayerComp] | list[tuple[torch.Tensor, torch.Tensor]] | None


def as_comps(biases: Biases) -> list[LayerComp] | None:
    if biases is None:
        return None
    return [c if isinstance(c, LayerComp) else from_biases([c])[0] for c in biases]


def set_kept_columns(linear: nn.Linear, keep: torch.Tensor | None, weight: torch.Tensor | None) -> None:
    """Write a compensation's weights into the kept input columns (all columns if keep is None)."""
    if weight is None:
        return
    w = weight.to(linear.weight.device, linear.weight.dtype)
    if keep is None:
        linear.weight.data.copy_(w)
    else:
        linear.weight.data[:, keep.to(linear.weight.device)] = w


def add_bias(linear: nn.Linear, extra: torch.Tensor | None) -> nn.Linear:
    """Return `linear` with `extra` added to its bias (a new Linear with a bias if it had none)."""
    if extra is None:
        return linear
    if linear.bias is None:
        new = new_linear(linear.in_features, linear.out_features, True, linear.weight)
        new.weight = linear.weight
        new.bias.data.zero_()
        linear = new
    linear.bias.data += extra.to(linear.bias.device, linear.bias.dtype)
    return linear


def slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding the kept output rows / input columns (bool masks) of `linear`."""
    w = linear.weight.data
    if rows is not None:
        w = w[rows.to(w.device)]
    if cols is not None:
        w = w[:, cols.to(w.device)]
    new = new_linear(w.shape[1], w.shape[0], linear.bias is not None, linear.weight)
    new.weight.data.copy_(w)
    if linear.bias is not None:
        b = linear.bias.data
        new.bias.data.copy_(b[rows.to(b.device)] if rows is not None else b)
    return new


def _q_keep(keep_groups: torch.Tensor, keep_heads: torch.Tensor | None, arch: ArchView) -> torch.Tensor:
    """Keep-mask over q_proj's rows (= o_proj's columns): the kept query heads, or the kept groups' heads."""
    heads = keep_groups.repeat_interleave(arch.group_size) if keep_heads is None else keep_heads
    return heads.repeat_interleave(arch.head_dim)


@torch.no_grad()
def mask_layer(layer: DecoderLayer, keep_groups: torch.Tensor, keep_channels: torch.Tensor, comp: LayerComp | None,
               arch: ArchView, keep_heads: torch.Tensor | None = None) -> None:
    """Zero the removed units' q/k/v and gate/up rows of one decoder layer (dense shapes) and apply `comp`.
    A removed query head of a kept group still attends (its q is zero, not its values): its o_proj columns
    are zeroed too."""
    attn, mlp = layer.self_attn, layer.mlp
    q_keep, kv_keep = _q_keep(keep_groups, keep_heads, arch), keep_groups.repeat_interleave(arch.head_dim)
    for lin, keep in ((attn.q_proj, q_keep), (attn.k_proj, kv_keep), (attn.v_proj, kv_keep),
                      (mlp.gate_proj, keep_channels), (mlp.up_proj, keep_channels)):
        lin.weight.data[~keep.to(lin.weight.device)] = 0
        if lin.bias is not None:
            lin.bias.data[~keep.to(lin.bias.device)] = 0
    if keep_heads is not None:
        attn.o_proj.weight.data[:, ~q_keep.to(attn.o_proj.weight.device)] = 0
    if comp is not None:
        set_kept_columns(attn.o_proj, q_keep, comp.o_weight)
        set_kept_columns(mlp.down_proj, keep_channels, comp.down_weight)
        attn.o_proj = add_bias(attn.o_proj, comp.o_bias)
        mlp.down_proj = add_bias(mlp.down_proj, comp.down_bias)


@torch.no_grad()
def cut_layer(layer: DecoderLayer, keep_groups: torch.Tensor, keep_channels: torch.Tensor, comp: LayerComp | None,
              arch: ArchView, keep_heads: torch.Tensor | None = None) -> None:
    """Remove the unselected units of one decoder layer in place and apply `comp`."""
    attn, mlp = layer.self_attn, layer.mlp
    q_keep, kv_keep = _q_keep(keep_groups, keep_heads, arch), keep_groups.repeat_interleave(arch.head_dim)
    # A pruned layer always carries both biases (zero without compensation): one layout to reload.
    zero = torch.zeros(arch.hidden_size)
    o_proj = slice_linear(attn.o_proj, cols=q_keep)
    set_kept_columns(o_proj, None, comp.o_weight if comp else None)
    o_proj = add_bias(o_proj, comp.o_bias if comp else zero)
    if not bool(keep_groups.any()):
        layer.self_attn = EmptyAttention(  # type: ignore[assignment]  # an attention without heads
            arch.hidden_size, arch.head_dim, attn.layer_idx, o_proj)
    else:
        attn.q_proj = slice_linear(attn.q_proj, rows=q_keep)
        attn.k_proj = slice_linear(attn.k_proj, rows=kv_keep)
        attn.v_proj = slice_linear(attn.v_proj, rows=kv_keep)
        attn.o_proj = o_proj
        attn.num_key_value_groups = int(q_keep.sum()) // int(kv_keep.sum())  # G' (query heads per kept group)
    mlp.gate_proj = slice_linear(mlp.gate_proj, rows=keep_channels)
    mlp.up_proj = slice_linear(mlp.up_proj, rows=keep_channels)
    down = slice_linear(mlp.down_proj, cols=keep_channels)
    set_kept_columns(down, None, comp.down_weight if comp else None)
    mlp.down_proj = add_bias(down, comp.down_bias if comp else zero)


def mask_model(model: nn.Module, sel: Selection, biases: Biases, arch: ArchView) -> None:
    comps = as_comps(biases)
    for i, layer in enumerate(decoder_layers(model)):
        mask_layer(layer, sel.keep_groups[i], sel.keep_channels[i], comps[i] if comps else None, arch,
                   sel.keep_heads[i] if sel.keep_heads else None)


def prune_model(model: nn.Module, sel: Selection, biases: Biases, arch: ArchView) -> None:
    """Remove the unselected units in place; the config becomes its family's pruned config (per-layer widths)."""
    comps = as_comps(biases)
    for i, layer in enumerate(decoder_layers(model)):
        cut_layer(layer, sel.keep_groups[i], sel.keep_channels[i], comps[i] if comps else None, arch,
                  sel.keep_heads[i] if sel.keep_heads else None)
    model.config = flap_config(model.config, sel)


def flap_config(config, sel: Selection):
    """The pruned config of the model's family (families.py): the dense config plus per-layer widths."""
    cfg_class, model_class = PRUNED_CLASSES[family_of(config.model_type).pruned_type]
    d = config.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "layer_kv_heads", "layer_q_heads",
              "layer_intermediate_size"):
        d.pop(k, None)
    arch = ArchView.from_config(config)
    cfg = cfg_class(layer_kv_heads=[int(g.sum()) for g in sel.keep_groups],
                    layer_q_heads=[int(sel.head_mask(i, arch).sum()) for i in range(len(sel.keep_groups))],
                    layer_intermediate_size=[int(c.sum()) for c in sel.keep_channels], **d)
    cfg.architectures = [model_class.__name__]
    return cfg


class PrunedView:
    """A layer store whose layers are another store's, cut by `sel` (with `comps`) as each is yielded: a pruned
    model measured without being built, so a streamed model is never held whole. The cut is made on a copy
    of the loaded layer (one more layer in memory while it runs), leaving the base store's layers intact."""

    def __init__(self, base: LayerStore, sel: Selection, comps: list[LayerComp] | None):
        self.base, self.sel, self.comps = base, sel, comps
        self.model, self.arch, self.device, self.dtype = base.model, base.arch, base.device, base.dtype
        self.config, self.cut = flap_config(base.config, sel), False

    @property
    def num_layers(self) -> int:
        return self.base.num_layers

    @contextlib.contextmanager
    def layer(self, i: int) -> Iterator[DecoderLayer]:
        with self.base.layer(i) as dense:
            layer = copy.deepcopy(dense)
        cut_layer(layer, self.sel.keep_groups[i], self.sel.keep_channels[i],
                  self.comps[i] if self.comps else None, self.arch,
                  self.sel.keep_heads[i] if self.sel.keep_heads else None)
        yield layer

    def embedding(self) -> contextlib.AbstractContextManager[nn.Module]:
        return self.base.embedding()

    def head(self) -> contextlib.AbstractContextManager[tuple[nn.Module, nn.Linear]]:
        return self.base.head()

    def check_budget(self, windows: int, seqlen: int, what: str, extra: int = 0) -> object:
        return self.base.check_budget(windows, seqlen, what, extra)

    def chunk_windows(self, windows: int, batch: int, seqlen: int, what: str, extra: int = 0) -> int:
        return self.base.chunk_windows(windows, batch, seqlen, what, extra)

    def layer_numels(self) -> list[tuple[int, int]]:
        """Per layer (attention + MLP weights, all parameters) of the pruned layers (each read once more)."""
        out = []
        for i in range(self.num_layers):
            with self.layer(i) as layer:
                weights = sum(p.numel() for mod in (layer.self_attn, layer.mlp)
                              for name, p in mod.named_parameters() if name.endswith("weight"))
                out.append((weights, sum(p.numel() for p in layer.parameters())))
        return out
