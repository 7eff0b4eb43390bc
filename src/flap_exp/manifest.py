"""The manifest of a pruned directory and the checks of its files against it (torch-free).

The manifest records the base model's identity, the pruning settings, the achieved ratio, the kept
k/v groups and MLP channels of every layer (indices into the dense model) and the weights' sha256.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import FlapError
from .jsonfile import parse_json_file
from .sources import sha256_file

MANIFEST = "flap_manifest.json"


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def files_sha256(folder: str | Path, names) -> dict[str, str]:
    folder = Path(folder)
    return {n: sha256_file(folder / n) for n in sorted(names)}


def verify_files(folder: str | Path, recorded: dict[str, str], record: str, fix: str) -> None:
    """Refuse `folder` if a file recorded (name -> sha256) in `record` is missing or differs; `fix` says what to do."""
    folder = Path(folder)
    for name, digest in sorted(recorded.items()):
        f = folder / name
        if not f.is_file():
            raise FlapError(f"{f} is missing but recorded in {record}; {fix}")
        if sha256_file(f) != digest:
            raise FlapError(f"{f} does not match the sha256 recorded in {record} (it was changed); {fix}")


def read_manifest(folder: str | os.PathLike[str]) -> dict:
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
    folder, recorded = Path(folder), manifest["weights_sha256"]
    if not recorded:
        raise FlapError(f"{folder}/{MANIFEST} records no weights hashes; the directory is damaged: prune again")
    extra = sorted(p.name for p in weight_files(folder) if p.name not in recorded)
    if extra:
        raise FlapError(f"{folder}/{extra[0]} is not recorded in {MANIFEST} (a weights file was added); refusing "
                        "it: prune again")
    verify_files(folder, recorded, MANIFEST, "refusing it: prune again (flap-exp prune ... --out DIR)")
