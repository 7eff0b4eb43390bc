"""Stages compensate / compensate_lsq: one cell's compensation (registry flap_exp.compensation) as tensors.

The file results/compensate/METRIC-STRUCTURE-RATIO-COMP.safetensors holds the per-layer tensors
(flap_exp.compensation.serialize; empty for `none`) and, as metadata, the method with its options and
the sha256 of the selection it was computed for; evaluate refuses a file that does not match.
"""
from __future__ import annotations

import json
import sys

from safetensors import safe_open

from ...adequacy import lsq_coefficients, lsq_sample_warning
from ...compensation import compensate as run, comps_from_tensors, comps_to_tensors, config_from_params, config_record
from ...errors import FlapError
from ...selection import Selection
from ..artifacts.io import load_tensors, sha256_text


def selection_sha256(selection: dict) -> str:
    return sha256_text(json.dumps(selection, sort_keys=True))


def compensate(model, selection: dict, arch, comp_params: dict, stats=None, windows=None,
               batch_size: int = 8) -> tuple[dict, dict]:
    """(tensors, metadata) of one cell; `model` is the dense base model (None for `none`)."""
    cfg = config_from_params(comp_params)
    comps = run(model, Selection.from_json(selection, arch), arch, cfg, stats, windows, batch_size, progress=True)
    return compensation_tensors(cfg, comps, selection, arch, windows)


def compensation_tensors(cfg, comps, selection: dict, arch, windows=None) -> tuple[dict, dict]:
    """(tensors, metadata) of a compensate stage's file for `comps`, computed by `cfg` for `selection` (the
    record as its selection.json holds it): by the compensate stage, or the OBS pass's own refit (search_seq)."""
    meta = {"compensation": config_record(cfg), "selection_sha256": selection_sha256(selection)}
    warning = _sample_warning(cfg.method, selection, arch, windows)
    if warning is not None:  # a warning, not an error: the calibration ablation runs small N on purpose
        print(f"warning: {warning}", file=sys.stderr, flush=True)
        meta["sample_warning"] = warning
    return comps_to_tensors(comps), meta


def _sample_warning(method: str, selection: dict, arch, windows) -> str | None:
    """flap_exp.adequacy's rule for lsq (calibration tokens per fitted coefficient); None for other methods."""
    if method != "lsq" or windows is None:
        return None
    p = lsq_coefficients(selection["kept_groups_per_layer"], selection["kept_channels_per_layer"],
                         arch.group_size * arch.head_dim)
    return lsq_sample_warning(int(windows.shape[0]), int(windows.shape[1]), p)


def sample_warning(path) -> str | None:
    """The sample-size warning a compensate stage recorded in its file's metadata (None: none, or an older file)."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("flap", "{}")).get("sample_warning")


def load_compensation(path, selection: dict, arch, method: str, record: dict | None = None):
    """(list[LayerComp] or None, the compensation record) of a compensate stage's file, checked against
    the selection it must belong to, the method the cell asks for and (given the prepare record) the
    weights it was computed from; shapes and finiteness are checked by comps_from_tensors."""
    tensors, meta = load_tensors(path)
    rec = meta.get("compensation") or {}
    if rec.get("method") != method:
        raise FlapError(f"{path} holds compensation {rec.get('method')!r}, the cell asks for {method!r}; "
                        "rerun: dvc repro")
    if meta.get("selection_sha256") != selection_sha256(selection):
        raise FlapError(f"{path} was computed for another selection; refusing it: rerun dvc repro")
    if record is not None and meta.get("weights_sha256") != record["model"]["weights_sha256"]:
        raise FlapError(f"{path} was computed for other weights than the prepared model's; refusing it: "
                        "rerun dvc repro")
    return comps_from_tensors(tensors, Selection.from_json(selection, arch), arch, str(path)), rec
