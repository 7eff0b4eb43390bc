"""`prune` for a model that does not fit in memory: streamed calibration, then one layer at a time
loaded, compensated, cut and written to its own shard, with the manifest of `persist.save_pruned`.

Compensations: none, bias, and lsq. lsq's pass runs inside the cutting loop: layer i is loaded once, its
least-squares fit is computed on the pruned stream (`compensation.lsq.LsqPass`, the in-memory code), then
the layer is cut and written, so lsq adds one pass over the windows and no extra read of the weights. The
pass recomputes gate/up instead of holding the kept MLP inputs (bounded memory; ~1/4 more of its compute).

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
from tqdm.auto import tqdm

from .atomic import atomic_dir
from .calibrate import layer_inputs
from .compensation.base import LayerComp
from .compensation.bias import compensation_bias
from .compensation.lsq import LsqPass, lsq_extra_bytes
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


def _bias(sm: StreamedModel, layer: DecoderLayer, i: int, sel: Selection, stats) -> LayerComp:
    """FLAP's baseline bias of decoder layer i (its dense weights and the calibration means)."""
    return LayerComp(compensation_bias(layer.self_attn.o_proj.weight, sel.channel_mask(i, sm.arch), stats[i].attn.mean),
                     compensation_bias(layer.mlp.down_proj.weight, sel.keep_channels[i], stats[i].mlp.mean))


def _cut_layer(sm: StreamedModel, layer: DecoderLayer, i: int, sel: Selection, comp: LayerComp | None) -> None:
    """Apply `comp` and physically prune decoder layer i in place (the in-memory code, on a one-layer view)."""
    view = nn.Module()
    view.layers, view.config = nn.ModuleList([layer]), sm.config
    prune_model(view, Selection([sel.keep_groups[i]], [sel.keep_channels[i]]), None if comp is None else [comp],
                sm.arch)


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
    comp_cfg = cfg.resolved_compensation()
    method = comp_cfg.method
    if method not in ("none", "bias", "lsq"):
        raise FlapError(f"--stream supports the compensations none, bias and lsq, not {method!r}")
    needs_stats = metric.needs_data or method == "bias"
    if (needs_stats or method == "lsq") and windows is None:
        raise FlapError(f"metric {cfg.metric!r} / compensation {method!r} needs calibration windows")
    n, t = windows.shape[:2] if windows is not None and (needs_stats or method == "lsq") else (0, 0)
    elem = torch.empty(0, dtype=sm.dtype).element_size()
    extra = lsq_extra_bytes(sm.arch, n, t, elem, comp_cfg.form, store=False) if method == "lsq" else 0
    sm.check_budget(budget, n, t, "streamed pruning" + (f" with lsq ({comp_cfg.form})" if extra else ""), extra)
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
    try:
        _write(sm, windows, cfg, sel, stats, method, comp_cfg, out, manifest, tokenizer, progress, (t0, t1, t2))
    finally:
        sm.cut = True  # the skeleton's layers were cut in place: `sm` is spent for another run
    t3 = time.perf_counter()
    return PruneResult(sel, sel.achieved_ratio(arch), stats, None,  # comps: written into the shards, not kept
                       {"calibrate": t1 - t0, "score_select": t2 - t1, "compensate_cut": t3 - t2}, comp_cfg)


def _write(sm: StreamedModel, windows, cfg: PruneConfig, sel: Selection, stats, method: str, comp_cfg, out,
           manifest: dict, tokenizer, progress: bool, times: tuple[float, float, float]) -> None:
    """Compensate, cut and write every layer, then the embedding, head, config, index and manifest."""
    arch, (t0, t1, t2) = sm.arch, times
    n_shards, total = len(sm.layers) + 1, 0
    weight_map: dict[str, str] = {}
    shard = lambda k: f"model-{k:05d}-of-{n_shards:05d}.safetensors"  # noqa: E731
    lsq = None
    if method == "lsq":  # its pass starts from the dense embedding of the windows (checked not None above)
        with sm.embedding():
            hs, kws = layer_inputs(sm.model, windows, cfg.batch_size, sm.device)
        lsq = LsqPass(hs, kws, sel, arch, comp_cfg, store_budget=0)
        del hs
    with atomic_dir(out) as tmp:
        for i in tqdm(range(len(sm.layers)), desc=f"{'lsq + ' if lsq else ''}cut (streamed)", unit="layer",
                      disable=not progress):
            with sm.layer(i) as layer:  # dense weights: the compensation is computed before the cut
                comp = lsq.step(i, layer) if lsq else _bias(sm, layer, i, sel, stats) if method == "bias" else None
                _cut_layer(sm, layer, i, sel, comp)
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
