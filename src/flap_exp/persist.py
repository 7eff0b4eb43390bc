"""Save a pruned model as safetensors + config + manifest, and reload it (no pickle anywhere).

Two writers, one format: `save_pruned` writes an in-memory pruned model; `write_streamed` runs `prune` on a
streamed store with a ShardSink, which writes every decoder layer to its own shard as soon as it is cut
(`model-0000k-of-N.safetensors`, plus one shard for the embedding, final norm and head, and the index).
Both write the directory atomically (temporary sibling, rename) with the manifest (manifest.py); loading
checks the weights against it and refuses a directory where they disagree.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from . import modeling  # noqa: F401  (registers the pruned types with the Auto classes)
from .arch import decoder_layers
from .atomic import atomic_dir
from .errors import FlapError
from .families import PRUNED
from .manifest import FILES_KEY, MANIFEST, read_manifest, record_files, verify_weights, weight_files
from .shards import INDEX
from .surgery import flap_config

if TYPE_CHECKING:
    from .arch import DecoderLayer
    from .prune import PruneConfig, PruneResult
    from .streaming import StreamedModel


def _finish(tmp: Path, tokenizer, manifest: dict) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    m = dict(manifest)
    m[FILES_KEY] = record_files(tmp)  # every file: config.json and the tokenizer change numbers as much as weights
    m["weights_sha256"] = {p.name: m[FILES_KEY][p.name] for p in weight_files(tmp)}
    (tmp / MANIFEST).write_text(json.dumps(m, indent=1))


def save_pruned(model: PreTrainedModel, tokenizer, manifest: dict, out: str | Path) -> Path:
    """Write `out` atomically: a half-written directory never appears under that name."""
    if getattr(model.config, "model_type", None) not in PRUNED:
        raise FlapError("save_pruned expects a physically pruned model (prune_model sets its config)")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        _finish(tmp, tokenizer, manifest)
    return Path(out)


class ShardSink:
    """prune's sink for a streamed store: each cut decoder layer to its own shard in `folder`."""

    def __init__(self, folder: Path, num_layers: int):
        self.folder, self.n_shards, self.total = folder, num_layers + 1, 0
        self.weight_map: dict[str, str] = {}

    def _save(self, tensors: dict[str, torch.Tensor], k: int) -> None:
        name = f"model-{k:05d}-of-{self.n_shards:05d}.safetensors"
        save_file({n: v.detach().to("cpu").contiguous() for n, v in tensors.items()}, str(self.folder / name),
                  metadata={"format": "pt"})
        self.weight_map.update({n: name for n in tensors})
        self.total += sum(v.numel() * v.element_size() for v in tensors.values())

    def write_layer(self, i: int, layer: DecoderLayer) -> None:
        self._save({f"model.layers.{i}.{k}": v for k, v in layer.state_dict().items()}, i + 1)

    def write_rest(self, sm: StreamedModel) -> None:
        """The embedding, final norm and (untied) head, then the index."""
        rest = {}
        with sm.embedding() as emb:
            rest["model.embed_tokens.weight"] = emb.weight.detach().clone()
        with sm.head() as (norm, head):
            rest["model.norm.weight"] = norm.get_parameter("weight").detach().clone()
            if not sm.tied:
                rest["lm_head.weight"] = head.weight.detach().clone()
        self._save(rest, self.n_shards)
        (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                     "weight_map": self.weight_map}, indent=1))


def write_streamed(sm: StreamedModel, windows: torch.Tensor | None, cfg: PruneConfig, out: str | Path,
                   manifest: dict, tokenizer=None, progress: bool = True) -> PruneResult:
    """Prune the model behind `sm` into `out`, one layer resident at a time; the same directory contents (and
    the same result) as pruning in memory and `save_pruned`. `manifest` holds what the caller knows (base
    model, settings, calibration); the selection, achieved ratio and weights' sha256 are added here."""
    from .prune import prune
    cfg.validate()
    with atomic_dir(out) as tmp:
        sink = ShardSink(tmp, sm.num_layers)
        res = prune(sm, windows, cfg, progress, sink)
        sink.write_rest(sm)
        config = flap_config(sm.config, res.selection)
        config.dtype = sm.dtype
        config.save_pretrained(tmp)
        _finish(tmp, tokenizer, {**manifest, "achieved_ratio": res.achieved_ratio,
                                 "selection": res.selection.to_json(), "seconds": res.seconds, "streamed": True})
    return res


def check_against_manifest(model: PreTrainedModel, manifest: dict, folder: str | Path) -> None:
    kept_g, kept_c = manifest["selection"].get("kept_groups"), manifest["selection"].get("kept_channels")
    if not (isinstance(kept_g, list) and isinstance(kept_c, list) and len(kept_g) == len(kept_c)
            and all(isinstance(x, list) for x in kept_g + kept_c)):
        raise FlapError(f"{folder}/{MANIFEST}: its selection is not a per-layer list of kept groups and channels; "
                        "the directory is damaged: prune again")
    layers = decoder_layers(model)
    if len(layers) != len(kept_g):
        raise FlapError(f"{folder}: manifest lists {len(kept_g)} layers, the weights have {len(layers)}")
    hd = model.config.head_dim
    for i, layer in enumerate(layers):
        kv, ch = layer.self_attn.k_proj.out_features // hd, layer.mlp.down_proj.in_features
        if kv != len(kept_g[i]) or ch != len(kept_c[i]):
            raise FlapError(f"{folder}: layer {i} has {kv} k/v groups and {ch} MLP channels, the manifest says "
                            f"{len(kept_g[i])} and {len(kept_c[i])}")
        kept_h = manifest["selection"].get("kept_heads")  # query-head units (selection.py)
        q = layer.self_attn.q_proj.out_features // hd
        if isinstance(kept_h, list) and i < len(kept_h) and q != len(kept_h[i]):
            raise FlapError(f"{folder}: layer {i} has {q} query heads, the manifest says {len(kept_h[i])}")


def load_pruned(folder: str | Path, dtype=None, device: str = "cpu", verify: bool = True):
    """(model, tokenizer, manifest) of a directory written by save_pruned or write_streamed."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if verify:
        verify_weights(folder, manifest)
    try:  # safetensors only: a pruned directory is never unpickled; verified just above
        # (the ignore: typeshed's functools.wraps, which transformers puts on PreTrainedModel.to, drops self)
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, flap_verify=False,
                                                     **({"dtype": dtype} if dtype else {})).to(device).eval()  # type: ignore[arg-type]
    except (OSError, ValueError, RuntimeError) as err:
        raise FlapError(f"{folder}: weights do not match their config/manifest: {str(err).splitlines()[0]}") from None
    check_against_manifest(model, manifest, folder)
    tok = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model, tok, manifest
