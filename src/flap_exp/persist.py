"""Save a pruned model as safetensors + config + manifest, and reload it (no pickle anywhere).

The manifest records the base model's identity, the pruning settings, the achieved ratio, the kept
k/v groups and MLP channels of every layer (indices into the dense model) and the weights' sha256;
loading checks the weights against it and refuses a directory where they disagree.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from . import modeling  # noqa: F401  (registers flap_llama with the Auto classes)
from .arch import decoder_layers
from .atomic import atomic_dir
from .errors import FlapError
from .sources import sha256_file

MANIFEST = "flap_manifest.json"


def _weights(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def save_pruned(model: PreTrainedModel, tokenizer, manifest: dict, out: str | Path) -> Path:
    """Write `out` atomically: a half-written directory never appears under that name."""
    if getattr(model.config, "model_type", None) != "flap_llama":
        raise FlapError("save_pruned expects a physically pruned model (prune_model sets its config)")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        m = dict(manifest)
        m["weights_sha256"] = {p.name: sha256_file(p) for p in _weights(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(m, indent=1))
    return Path(out)


def read_manifest(folder: str | os.PathLike[str]) -> dict:
    from .pipeline.io import parse_json_file
    f = Path(folder) / MANIFEST
    if not f.exists():
        raise FlapError(f"{folder} is not a pruned model directory (no {MANIFEST})")
    m = parse_json_file(f, "the directory is damaged: prune again (flap-exp prune ... --out DIR)")
    for key in ("selection", "weights_sha256"):
        if not isinstance(m.get(key), dict):
            raise FlapError(f"{f} has no {key!r} record; the directory is damaged: prune again")
    return m


def verify_weights(folder: str | os.PathLike[str], manifest: dict) -> None:
    """Every weights file in `folder` is recorded in the manifest and matches its sha256 (else FlapError)."""
    from .integrity import verify_files
    folder, recorded = Path(folder), manifest["weights_sha256"]
    if not recorded:
        raise FlapError(f"{folder}/{MANIFEST} records no weights hashes; the directory is damaged: prune again")
    extra = sorted(p.name for p in _weights(folder) if p.name not in recorded)
    if extra:
        raise FlapError(f"{folder}/{extra[0]} is not recorded in {MANIFEST} (a weights file was added); refusing "
                        "it: prune again")
    verify_files(folder, recorded, MANIFEST, "refusing it: prune again (flap-exp prune ... --out DIR)")


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


def load_pruned(folder: str | Path, dtype=None, device: str = "cpu", verify: bool = True):
    """(model, tokenizer, manifest) of a directory written by save_pruned."""
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
