"""Refuse a checkpoint whose tensors do not cover the model exactly (torch-free).

transformers' from_pretrained re-initialises a parameter the checkpoint lacks and drops a tensor the model has
no place for, with a log line at most; a pruned or base model loaded that way is silently wrong. Every load
path asks it for its loading info and passes it here.
"""
from __future__ import annotations

from .errors import FlapError

SHOWN = 3  # names listed in the one-line message; the rest are counted


def _names(keys) -> str:
    keys = sorted(str(k) for k in keys)
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def refuse_incomplete(info: dict, where: object) -> None:
    """FlapError when `info` (from_pretrained's output_loading_info) has missing, unexpected or mismatched keys."""
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing {_names(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected {_names(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        problems.append(f"wrong shape {_names(k[0] if isinstance(k, tuple) else k for k in info['mismatched_keys'])}")
    if problems:
        raise FlapError(f"{where}: the checkpoint's tensors do not match the model ({'; '.join(problems)}); refusing "
                        "it rather than re-initialising parameters")
