"""Atomic JSON and safetensors files (metadata as one JSON string), and content hashes."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from safetensors import safe_open

from ...atomic import atomic_file
from ...errors import FlapError
from ...jsonfile import parse_json_file


def write_json(path: str | Path, obj) -> None:
    """Never writes NaN/Infinity (not JSON, and a NaN is an error, never a result): refused before the file."""
    try:
        text = json.dumps(obj, indent=1, sort_keys=True, allow_nan=False)
    except ValueError:
        raise FlapError(f"refusing to write {path}: {_first_non_finite(obj) or 'a value'} is NaN or infinite") from None
    with atomic_file(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def _first_non_finite(obj, at: str = "") -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return at or "the value"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        hit = _first_non_finite(v, f"{at}.{k}" if at else str(k))
        if hit:
            return hit
    return None


def read_json(path: str | Path):
    p = Path(path)
    if not p.exists():
        raise FlapError(f"{p} is missing; run the stage that writes it (dvc repro)")
    return parse_json_file(p, "rerun the stage that writes it (dvc repro -f STAGE)")


def save_tensors(path: str | Path, tensors: dict, meta: dict | None = None) -> None:
    # safetensors.torch, integrity: torch; the reporting stages import this module
    from safetensors.torch import save_file

    from ...integrity import check_finite_tensors
    check_finite_tensors(tensors, f"refusing to write {path}")
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"flap": json.dumps(meta or {}, sort_keys=True)})


def load_tensors(path: str | Path) -> tuple[dict, dict]:
    """(tensors, metadata dict) of a file written by save_tensors."""
    p = Path(path)
    if not p.exists():
        raise FlapError(f"{p} is missing; run the stage that writes it (dvc repro)")
    fix = "rerun the stage that writes it (dvc repro -f STAGE)"
    try:
        with safe_open(str(p), framework="pt") as f:
            raw, tensors = (f.metadata() or {}).get("flap", "{}"), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) on a damaged file
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FlapError(f"{p} is not a readable safetensors file ({why}); {fix}") from None
    try:
        meta = json.loads(raw)
    except ValueError:
        raise FlapError(f"{p}: its metadata is not valid JSON; {fix}") from None
    return tensors, meta


def sha256_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_tensor(t) -> str:
    return sha256_bytes(str(t.dtype).encode(), str(tuple(t.shape)).encode(), t.contiguous().cpu().numpy().tobytes())


def weights_sha256(model) -> str:
    """Content hash of the state dict (names, dtypes, shapes, bytes): independent of paths and files; the same
    for a model in memory and its StreamedModel (read a tensor at a time)."""
    import torch  # torch: the reporting stages import this module
    h = hashlib.sha256()
    tensors = model.named_tensors() if hasattr(model, "named_tensors") else sorted(model.state_dict().items())
    for name, t in tensors:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()
