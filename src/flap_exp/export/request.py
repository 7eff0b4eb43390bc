"""What `flap-exp export` is asked to do, checked before any weight is read (torch-free, one-line errors)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import FlapError
from ..manifest import MANIFEST, read_manifest, verify_weights

#: --to name -> the module (in flap_exp.export) whose `export(req)` writes it.
FORMATS = {"hf": "hf", "gguf": "gguf"}
#: --gguf-type values: llama.cpp tensor types this writer produces (q8_0 falls back to f16 for a tensor whose
#: rows are not a multiple of 32 values, as llama.cpp's own quantizer does).
GGUF_TYPES = ("f32", "f16", "q8_0")


@dataclass(frozen=True)
class ExportRequest:
    src: Path
    to: str
    out: Path
    gguf_type: str = "f32"


def check_out_path(out: str, src: Path, is_dir: bool) -> Path:
    """OUT is a new path (or, for a directory, an empty one) in a writable place outside the input directory.
    An export never replaces anything: the same refusals as `prune --out`, and no --overwrite."""
    from ..validate import check_out_dir
    p = Path(os.path.abspath(out))
    if not p.is_symlink() and (p / MANIFEST).is_file():  # check_out_dir would offer --overwrite, export has none
        raise FlapError(f"OUT {out} is an existing directory that is not empty; refusing to replace it "
                        "(choose a new path)")
    path = check_out_dir(out, str(src), overwrite=False)  # new/empty, writable, not the input's directory
    if os.path.lexists(path) and not is_dir:
        raise FlapError(f"OUT {out} is an existing directory; a GGUF is a file: choose a new path")
    return path


def check_request(src: str, to: str, out: str, gguf_type: str | None = None) -> ExportRequest:
    if to not in FORMATS:
        raise FlapError(f"unknown export format {to!r}; use one of {', '.join(FORMATS)}")
    if gguf_type is not None and to != "gguf":
        raise FlapError("--gguf-type is for --to gguf only")
    gtype = (gguf_type or "f32").lower()
    if gtype not in GGUF_TYPES:
        raise FlapError(f"GGUF type {gguf_type!r} is not supported by this writer; use one of {', '.join(GGUF_TYPES)}")
    folder = Path(src)
    if not folder.is_dir():
        raise FlapError(f"{src} is not a directory (expected a pruned model written by flap-exp prune --out)")
    if not (folder / MANIFEST).is_file():
        raise FlapError(f"{src} is not a flap-exp pruned model directory (no {MANIFEST})")
    verify_weights(folder, read_manifest(folder))  # a tampered directory is refused before OUT is touched
    return ExportRequest(folder, to, check_out_path(out, folder, is_dir=(to == "hf")), gtype)
