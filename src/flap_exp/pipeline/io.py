"""Atomic JSON and safetensors files (metadata as one JSON string), and content hashes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..atomic import atomic_file
from ..errors import FlapError


def write_json(path: str | Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: str | Path):
    p = Path(path)
    if not p.exists():
        raise FlapError(f"{p} is missing; run the stage that writes it (dvc repro)")
    return json.loads(p.read_text(encoding="utf-8"))


def save_tensors(path: str | Path, tensors: dict, meta: dict | None = None) -> None:
    from safetensors.torch import save_file
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"flap": json.dumps(meta or {}, sort_keys=True)})


def load_tensors(path: str | Path) -> tuple[dict, dict]:
    """(tensors, metadata dict) of a file written by save_tensors."""
    from safetensors import safe_open
    p = Path(path)
    if not p.exists():
        raise FlapError(f"{p} is missing; run the stage that writes it (dvc repro)")
    with safe_open(str(p), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("flap", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def sha256_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_tensor(t) -> str:
    return sha256_bytes(str(t.dtype).encode(), str(tuple(t.shape)).encode(), t.contiguous().cpu().numpy().tobytes())
