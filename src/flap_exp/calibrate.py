"""One pass over the model, layer by layer, recording the inputs of o_proj and down_proj.

As in wanda/sparsegpt, the calibration windows are embedded once, then pushed through one decoder layer
at a time: peak memory is the model plus two copies of one layer's hidden states for the calibration
set (N x T x d each), never the whole model's activations. Every layer sees the dense model's
activations unless `on_layer` changes a layer (sequential pruning, as the Wanda-sp baseline does).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .arch import decoder_layers
from .errors import FlapError
from .hooks import input_hooks
from .stats import ChannelStats, LayerStats
from .store import LayerStore, as_store

if TYPE_CHECKING:
    from .arch import DecoderLayer

#: Called after layer i's statistics are known; returns None, or the layer (e.g. a masked copy) whose outputs
#: feed layer i+1 instead (sequential pruning).
OnLayer = Callable[[int, "DecoderLayer", LayerStats], "nn.Module | None"]

# The kwargs a decoder layer needs besides its hidden states; anything else (caches) is dropped.
_LAYER_KWARGS = ("attention_mask", "position_embeddings", "position_ids")


class _Caught(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its hidden states (layer 0) and kwargs, passes the states on;
    the last one stops the forward (norm and head are never run)."""

    def __init__(self, store: dict, last: bool):
        super().__init__()
        self.store, self.last = store, last

    def forward(self, hidden_states, *args, **kwargs):
        self.store.setdefault("h", hidden_states)
        self.store.setdefault("kw", []).append({k: v for k, v in kwargs.items() if k in _LAYER_KWARGS})
        if self.last:
            raise _Caught
        return hidden_states


@torch.no_grad()
def layer0_inputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """The hidden states entering decoder layer 0, and per decoder layer the kwargs it is called with (mask,
    rotary embeddings, positions): they differ between layers where a family mixes sliding-window and
    global layers (Gemma 2/3, Qwen2 with layer_types), each with its own mask and rotary base."""
    layers = decoder_layers(model)
    store: dict = {}
    real = list(layers)
    for i in range(len(real)):
        layers[i] = _Recorder(store, i == len(real) - 1)  # type: ignore[call-overload]  # put back below
    try:
        getattr(model, "model", model)(input_ids=input_ids, use_cache=False)
    except _Caught:
        pass
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer
    return store["h"], store["kw"]


def layer_inputs(store: LayerStore, windows: torch.Tensor, batch_size: int) -> tuple[list, list]:
    """Per batch of windows: the hidden states entering decoder layer 0 (on the store's device), and the
    per-layer kwargs (`kws[batch][layer]`)."""
    hs, kws = [], []
    with store.embedding():
        for batch in windows.split(batch_size):
            h, kw = layer0_inputs(store.model, batch.to(store.device))
            hs.append(h)
            kws.append(kw)
    return hs, kws


@torch.no_grad()
def stats_over_layers(store: LayerStore, hs: list, kws: list, on_layer: OnLayer | None = None,
                      progress: bool = True) -> list[LayerStats]:
    """The layer-by-layer pass: each layer's o_proj/down_proj input statistics, its outputs feeding the next."""
    result = []
    for i in tqdm(range(store.num_layers), desc="calibrate", unit="layer", disable=not progress):
        with store.layer(i) as layer:
            targets = {"attn": layer.self_attn.o_proj, "mlp": layer.mlp.down_proj}
            acc = {k: ChannelStats.empty(m.in_features, store.device) for k, m in targets.items()}

            def record(name: str, x: torch.Tensor, acc: dict[str, ChannelStats] = acc) -> None:  # this layer's acc
                acc[name] = acc[name].update(x)

            with input_hooks(targets, record):
                outs = [layer(h, **kw[i]) for h, kw in zip(hs, kws, strict=True)]
            stats = LayerStats(acc["attn"], acc["mlp"])
            for name, s in acc.items():
                if not (torch.isfinite(s.mean).all() and torch.isfinite(s.m2).all()):
                    raise FlapError(f"non-finite activations (NaN/Inf) at layer {i} {targets[name].__class__.__name__} "
                                    f"input ({name}); check the model's dtype and weights")
            changed = on_layer(i, layer, stats) if on_layer is not None else None
            if changed is not None:
                outs = [changed(h, **kw[i]) for h, kw in zip(hs, kws, strict=True)]
        hs = outs
        result.append(LayerStats(*(ChannelStats(s.count, s.mean.cpu(), s.m2.cpu(), s.meansq.cpu())
                                   for s in (stats.attn, stats.mlp))))
    return result


def check_windows(windows: torch.Tensor) -> None:
    if windows.ndim != 2 or windows.shape[0] < 2:
        raise FlapError(f"calibration needs at least 2 windows of tokens, got shape {tuple(windows.shape)}")


@torch.no_grad()
def collect_stats(source: nn.Module | LayerStore, windows: torch.Tensor, batch_size: int = 8,
                  on_layer: OnLayer | None = None, progress: bool = True) -> list[LayerStats]:
    """Per-layer float64 statistics of the o_proj and down_proj inputs over all N x T window tokens."""
    check_windows(windows)
    store = as_store(source)
    store.check_budget(windows.shape[0], windows.shape[1], f"calibrating {windows.shape[0]} windows")
    hs, kws = layer_inputs(store, windows, batch_size)
    return stats_over_layers(store, hs, kws, on_layer, progress)
