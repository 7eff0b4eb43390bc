"""Export a pruned directory to formats other programs read: `hf` (a stock transformers directory of the base
type, for a model whose layers all keep the same widths) and `gguf` (llama.cpp, any per-layer widths).

`FORMATS` maps each `--to` name to its writer module; `check_request` validates everything a user gives
(format, GGUF type, input directory and its hashes, output path) before any weight is read. Torch-free.
"""
from __future__ import annotations

from .request import FORMATS, GGUF_TYPES, ExportRequest, check_request

__all__ = ["FORMATS", "GGUF_TYPES", "ExportRequest", "check_request"]
