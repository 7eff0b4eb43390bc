"""`prune` for a model that does not fit in memory: streamed calibration, then one layer at a time
loaded, compensated, cut and written to its own shard, with the manifest of `persist.save_pruned`.

Shards: `model-0000k-of-N.safetensors`, one per decoder layer plus one for the embedding, final norm and
head, and `model.safetensors.index.json`; the directory loads with `from_pretrained` after `import flap_exp`
(and with `persist.load_pruned`). The whole directory is written atomically (temporary sibling, rename).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .atomic import atomic_dir
from .compensation.bias import compensation_bias
from .errors import FlapError
from .metrics import get_metric, layer_channel_scores
from .persist import MANIFEST
from .prune import PruneConfig, PruneResult, _sequential_pass
from .selection import Selection
from .shards import INDEX
from .sources import sha256_file
from .streaming import StreamedModel, stream_stats
from .structures import get_structure
from .surgery import flap_config, prune_model

if TYPE_CHECKING:
    from .arch import DecoderLayer


def _scores(sm: StreamedModel, metric, stats, square_attn):
    """Per-layer channel scores, reading only o_proj and down_proj weights from the shards."""
    out = []
    for i in range(len(sm.layers)):
        o, d = f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"
        w = sm.ckpt.load([o, d], sm.dtype, torch.device("cpu"))
        out.append(layer_channel_scores(metric, w[o], w[d], stats[i] if stats is not None else None, square_attn))
    return out


def _cut_layer(sm: StreamedModel, layer: DecoderLayer, i: int, sel: Selection, stats, compensate: bool) -> None:
    """Compensate and physically prune decoder layer i in place (the in-memory code, on a one-layer view)."""
    arch = sm.arch
    biases = None
    if compensate:
        biases = [(compensation_bias(layer.self_attn.o_proj.weight, sel.channel_mask(i, arch), stats[i].attn.mean),
                   compensation_bias(layer.mlp.down_proj.weight, sel.keep_channels[i], stats[i].mlp.mean))]
    view = nn.Module()
    view.layers, view.config = nn.ModuleList([layer]), sm.config
    prune_model(view, Selection([sel.keep_groups[i]], [sel.keep_channels[i]]), biases, arch)


def _save_shard(tensors: dict[str, torch.Tensor], path: Path, weight_map: dict) -> int:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    weight_map.update({k: path.name for k in tensors})
    return sum(v.numel() * v.element_size() for v in tensors.values())


@torch.no_grad()
def prune_streamed(sm: StreamedModel, windows: torch.Tensor | None, cfg: PruneConfig, out: str | Path,
                   manifest: dict, tokenizer=None, budget: int | None = None, progress: bool = True) -> PruneResult:
    """Prune the model behind `sm` into `out` (directory written shard by shard); same result as `prune`.

    `manifest` holds what the caller knows (base model, settings, calibration); the selection, the achieved
    ratio and the weights' sha256 are added here, as `persist.save_pruned` expects them."""
    cfg.validate()
    metric, arch = get_metric(cfg.metric), sm.arch
    method = cfg.resolved_compensation().method
    if method not in ("none", "bias"):
        raise FlapError(f"--stream supports the compensations none and bias, not {method!r} (run lsq in memory)")
    compensate = method == "bias"
    needs_stats = metric.needs_data or compensate
    if needs_stats and windows is None:
        raise FlapError(f"metric {cfg.metric!r} / compensation needs calibration windows")
    n, t = windows.shape[:2] if needs_stats and windows is not None else (0, 0)  # (not None: checked above)
    sm.check_budget(budget, n, t, "streamed pruning")
    t0 = time.perf_counter()
    sequential = cfg.sequential if cfg.sequential is not None else metric.sequential

    def collect(_model, w, batch_size, on_layer=None, progress=True):
        return stream_stats(sm, w, batch_size, on_layer, progress)

    if sequential:
        stats, sel = _sequential_pass(sm.model, windows, cfg, arch, progress, collect=collect)
    else:
        stats = collect(None, windows, cfg.batch_size, progress=progress) if needs_stats else None
    t1 = time.perf_counter()
    if not sequential:
        sel = get_structure(cfg.structure)(_scores(sm, metric, stats, cfg.square_attn), arch, cfg.ratio, cfg.options)
    t2 = time.perf_counter()
    n_shards, total = len(sm.layers) + 1, 0
    weight_map: dict[str, str] = {}
    shard = lambda k: f"model-{k:05d}-of-{n_shards:05d}.safetensors"  # noqa: E731
    with atomic_dir(out) as tmp:
        for i in range(len(sm.layers)):
            with sm.layer(i) as layer:
                _cut_layer(sm, layer, i, sel, stats, compensate)
                total += _save_shard({f"model.layers.{i}.{k}": v for k, v in layer.state_dict().items()},
                                     tmp / shard(i + 1), weight_map)
        rest = {}
        with sm.embedding() as emb:
            rest["model.embed_tokens.weight"] = emb.weight.detach().clone()
        with sm.head() as head:
            rest["model.norm.weight"] = head[0].get_parameter("weight").detach().clone()
            if not sm.tied:
                rest["lm_head.weight"] = head[1].get_parameter("weight").detach().clone()
        total += _save_shard(rest, tmp / shard(n_shards), weight_map)
        del rest
        config = flap_config(sm.config, sel)
        config.dtype = sm.dtype
        config.save_pretrained(tmp)
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        m = {**manifest, "achieved_ratio": sel.achieved_ratio(arch), "selection": sel.to_json(),
             "seconds": {"calibrate": t1 - t0, "score_select": t2 - t1}, "streamed": True}
        m["weights_sha256"] = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))}
        (tmp / MANIFEST).write_text(json.dumps(m, indent=1))
    t3 = time.perf_counter()
    return PruneResult(sel, sel.achieved_ratio(arch), stats, None,
                       {"calibrate": t1 - t0, "score_select": t2 - t1, "surgery": t3 - t2})
