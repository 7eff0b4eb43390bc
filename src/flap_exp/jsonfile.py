"""Reading a JSON object written by flap-exp, with one-line errors (torch-free: the floor of the package)."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import FlapError


def parse_json_file(p: Path, fix: str) -> dict:
    """The JSON object in `p`, or a one-line FlapError (with `fix`) if it is not valid JSON or not an object."""
    try:
        obj = json.loads(p.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as err:
        raise FlapError(f"{p} is not valid JSON (not UTF-8 at byte {err.start}); {fix}") from None
    except ValueError as err:  # json.JSONDecodeError, and NaN/Infinity (parse_constant)
        msg = f"{err.msg} at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else err
        raise FlapError(f"{p} is not valid JSON ({msg}); {fix}") from None
    if not isinstance(obj, dict):
        raise FlapError(f"{p} is not a JSON object (it holds a {type(obj).__name__}); {fix}")
    return obj


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")
