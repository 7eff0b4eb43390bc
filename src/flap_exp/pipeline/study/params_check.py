"""Validate a composed params.yaml before it is written: every number a number in range, every required
value set (`???` in conf/ means "the user must give it", e.g. model=local's model.name), one line each.

Pure Python (no torch): compose calls it, so does anything that reads params from elsewhere.
"""
from __future__ import annotations

import re

from ...catalogue import DTYPE_SPECS, floor_fraction
from ...errors import FlapError
from ...units import parse_bytes
from ...validate import check_int

MISSING = "???"  # OmegaConf's mark of a mandatory value left unset
PROTOCOLS = ("quick", "smoke", "paper")  # conf/protocol/


def _get(params: dict, dotted: str):
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _set(params: dict, dotted: str, hint: str) -> None:
    v = _get(params, dotted)
    if v is None or v == MISSING or (isinstance(v, str) and not v.strip()):
        raise FlapError(f"{dotted} is not set: {hint}")


def _int(params: dict, dotted: str, minimum: int, allow_none: bool = False, why: str = "") -> None:
    check_int(dotted, _get(params, dotted), minimum, why, allow_none)


def _bool(params: dict, dotted: str, allow_none: bool = True) -> None:
    v = _get(params, dotted)
    if not (isinstance(v, bool) or (v is None and allow_none)):
        raise FlapError(f"{dotted} must be true or false{' or null' if allow_none else ''}, got {v!r}")


def _corpus(params: dict, dotted: str) -> None:
    c = _get(params, dotted) or {}
    if not isinstance(c, dict):
        raise FlapError(f"{dotted} must be a mapping {{corpus, split, path}}, got {c!r}")
    _set(params, f"{dotted}.corpus", "name a corpus (wikitext2, ptb, wiki, c4, text)")
    if c.get("path") == MISSING or (c.get("corpus") == "text" and not c.get("path")):
        raise FlapError(f"{dotted}.path is not set: corpus {c.get('corpus')!r} needs {dotted}.path=FILE")


def _device_and_dtype(params: dict) -> None:
    """model.device and model.dtype spelled as flap_exp.runtime accepts them (whether this machine has the
    GPU or can run the dtype is checked when a stage loads the model: compose may run elsewhere)."""
    device, dtype = _get(params, "model.device") or "cpu", _get(params, "model.dtype") or "float32"
    if not (device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", str(device))):
        raise FlapError(f"model.device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dtype not in DTYPE_SPECS:
        raise FlapError(f"model.dtype must be {', '.join(DTYPE_SPECS[:-1])} or {DTYPE_SPECS[-1]}, got {dtype!r}")


def _streaming(params: dict) -> None:
    """model.stream (one decoder layer resident at a time) and its memory_budget; a streamed study measures
    perplexity only, so a table asking for zero-shot accuracy or speed is refused before any stage runs."""
    _bool(params, "model.stream")
    parse_bytes(_get(params, "model.memory_budget"))
    if not _get(params, "model.stream"):
        if _get(params, "model.memory_budget") is not None:
            raise FlapError("model.memory_budget applies to model.stream=true only")
        return
    asking = sorted(t for t, table in (params.get("tables") or {}).items() if (table or {}).get("measure"))
    if asking:
        raise FlapError(f"model.stream=true measures perplexity only; table(s) {', '.join(asking)} ask for "
                        "zero-shot or speed (run them in memory, or experiment=compensation / ablation)")


def check_params(params: dict) -> dict:
    """Raise FlapError on the first bad value; return `params` unchanged."""
    _set(params, "model.name", "model=local needs model.name=/path/to/model (or a Hub id)")
    _device_and_dtype(params)
    _streaming(params)
    _corpus(params, "data.calib")
    _int(params, "data.calib.nsamples", 2, why=" (the variance of one sample is undefined)")
    _int(params, "data.calib.seqlen", 2, why=" (a window of one token predicts nothing)")
    _int(params, "data.calib.seed", 0)
    _int(params, "data.calib.batch_size", 1)
    _corpus(params, "data.eval")
    for name in (_get(params, "data.eval_extra") or {}):
        _corpus(params, f"data.eval_extra.{name}")
    _int(params, "eval.seqlen", 2, why=" (a window of one token predicts nothing)")
    _int(params, "eval.batch_size", 1)
    _int(params, "eval.max_windows", 1, allow_none=True)
    if params.get("protocol") not in PROTOCOLS:
        raise FlapError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {params.get('protocol')!r}")
    if _get(params, "eval.zeroshot") is not None:
        _int(params, "eval.zeroshot.limit", 1, allow_none=True)
        _int(params, "eval.zeroshot.batch_size", 1)
    if _get(params, "eval.throughput") is not None:
        for key, minimum in (("repeats", 1), ("warmup", 0), ("prompt_len", 1), ("new_tokens", 1)):
            _int(params, f"eval.throughput.{key}", minimum)
        for i, shape in enumerate(_get(params, "eval.throughput.prefill_shapes") or []):
            if not (isinstance(shape, list) and len(shape) == 2):
                raise FlapError(f"eval.throughput.prefill_shapes[{i}] must be [batch, seq_len], got {shape!r}")
            for v in shape:
                check_int(f"eval.throughput.prefill_shapes[{i}]", v, 1)
        for i, b in enumerate(_get(params, "eval.throughput.decode_batches") or []):
            check_int(f"eval.throughput.decode_batches[{i}]", b, 1)
    for m in (_get(params, "metrics") or {}):
        for key in ("square_attn", "sequential"):
            _bool(params, f"metrics.{m}.{key}")
    for s in (_get(params, "structures") or {}):
        for floor in ("min_groups", "min_channels"):  # a count, or a share of the layer's units in (0, 1)
            name = f"structures.{s}.{floor}"
            if floor_fraction(name, _get(params, name)) is None:
                _int(params, name, 0)
        _int(params, f"structures.{s}.remove_groups", 0, allow_none=True)
    return params
