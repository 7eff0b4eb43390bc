"""The manifest of a pruned directory and the checks of its files against it (torch-free).

The manifest records the base model's identity, the pruning settings, the achieved ratio, the kept
k/v groups and MLP channels of every layer (indices into the dense model), the weights' sha256, and the
sha256 of EVERY file of the directory but itself (`files_sha256`: weights, config.json,
generation_config.json, tokenizer files). Loading refuses a directory with a file missing, added or changed.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import FlapError
from .jsonfile import parse_json_file
from .sources import sha256_file

MANIFEST = "flap_manifest.json"
FILES_KEY = "files_sha256"
PRUNE_AGAIN = "refusing it: prune again (flap-exp prune ... --out DIR)"


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def files_sha256(folder: str | Path, names) -> dict[str, str]:
    folder = Path(folder)
    return {n: sha256_file(folder / n) for n in sorted(names)}


def dir_files(folder: str | Path) -> list[str]:
    """Every file under `folder` (relative posix paths, hidden ones and subfolders included) but the manifest."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.relative_to(folder).as_posix() != MANIFEST)


def record_files(folder: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file of `folder` but the manifest: what `files_sha256` records."""
    return files_sha256(folder, dir_files(folder))


def unrecorded_files(folder: str | Path, manifest: dict) -> list[str]:
    """Entries of `folder` (files, and folders holding nothing recorded) its manifest does not record: added
    by someone other than flap-exp."""
    folder = Path(folder)
    recorded = manifest.get(FILES_KEY)
    if not isinstance(recorded, dict):  # an older manifest: its weights and what save_pretrained writes
        weights = manifest.get("weights_sha256")
        recorded = {**(weights if isinstance(weights, dict) else {}), **dict.fromkeys(_OLD_NAMES, "")}
    names = {MANIFEST, *recorded}
    out: list[str] = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if rel in names or any(n.startswith(rel + "/") for n in names):
            continue
        if not any(rel.startswith(o + "/") for o in out):  # a folder's contents go with it
            out.append(rel)
    return out


# What an older flap-exp (before files_sha256) wrote beside the weights: never called user files.
_OLD_NAMES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
              "vocab.json", "merges.txt", "added_tokens.json")


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
    """Every file of `folder` (weights, config, generation config, tokenizer files) is recorded in the
    manifest and matches its sha256: a missing, added or changed file is one FlapError naming it."""
    folder, weights = Path(folder), manifest["weights_sha256"]
    if not weights:
        raise FlapError(f"{folder}/{MANIFEST} records no weights hashes; the directory is damaged: prune again")
    recorded = manifest.get(FILES_KEY)
    if recorded is None:
        raise FlapError(f"{folder}/{MANIFEST} records no hashes of the config and tokenizer files (written by an "
                        f"older flap-exp); {PRUNE_AGAIN}")
    if (not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values())
            or any(recorded.get(n) != d for n, d in weights.items())):
        raise FlapError(f"{folder}/{MANIFEST}: its {FILES_KEY!r} record does not cover its weights; the directory "
                        "is damaged: prune again")
    extra = [n for n in dir_files(folder) if n not in recorded]
    if extra:
        raise FlapError(f"{folder}/{extra[0]} is not recorded in {MANIFEST} (a file was added"
                        f"{f', and {len(extra) - 1} more' if len(extra) > 1 else ''}); {PRUNE_AGAIN}")
    verify_files(folder, recorded, MANIFEST, PRUNE_AGAIN)
