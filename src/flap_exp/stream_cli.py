"""The `--stream` forms of `flap-exp prune` and `flap-exp ppl`: one decoder layer resident at a time.

Kept out of cli.py so that the command line only parses; everything is checked (device, dtype, budget,
every shard) before the calibration text is read or any layer runs.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoTokenizer

from .compensation import config_record
from .errors import FlapError
from .persist import MANIFEST, read_manifest
from .runtime import parse_bytes
from .sources import sha256_file
from .streaming import StreamedModel, stream_perplexity


def _tokenizer(folder):
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise FlapError(f"{folder}: no usable tokenizer ({str(err).strip().splitlines()[0]})") from None


def prune_streamed_cmd(a: argparse.Namespace, cfg, device: torch.device, dtype: torch.dtype) -> dict:
    from .data import Corpus, calibration_windows, load_text, tokenize
    from .models import local_model_dir
    from .stream_prune import prune_streamed
    budget = parse_bytes(a.memory_budget)
    folder, identity = local_model_dir(a.model)
    sm = StreamedModel(folder, dtype, device)
    identity.setdefault("revision", getattr(sm.config, "_commit_hash", None))  # as models.load_model records it
    sm.check_budget(budget, a.nsamples, a.seqlen, f"calibrating {a.nsamples} windows")
    tok = _tokenizer(folder)
    calib = load_text(Corpus(a.calib, a.calib_split, a.calib_path), join=" ")  # official: train rows joined by " "
    windows = calibration_windows(tokenize(tok, calib.text), a.nsamples, a.seqlen, a.seed)
    manifest = {"base_model": identity, "settings": cfg.to_dict(),
                "compensation": config_record(cfg.resolved_compensation()),
                "calibration": {"data": calib.identity, "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": a.seed},
                "dtype": str(dtype).removeprefix("torch."),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    res = prune_streamed(sm, windows, cfg, a.out, manifest, tok, budget)
    out = {"out": a.out, "achieved_ratio": round(res.achieved_ratio, 6), "seconds": res.seconds, "streamed": True}
    if a.eval:
        out["perplexity"] = _ppl(StreamedModel(a.out, dtype, device), tok, a.eval_data, a.eval_data_split,
                                 a.eval_data_path, a.seqlen, a.batch_size, None, budget)
    return out


def _ppl(sm, tok, corpus, split, path, seqlen, batch_size, max_windows, budget) -> dict:
    from .data import Corpus, load_text, tokenize
    text = load_text(Corpus(corpus, split, path))
    res = stream_perplexity(sm, tokenize(tok, text.text), seqlen, batch_size, max_windows, budget)
    return {**res.to_dict(), "data": text.identity, "streamed": True}


def ppl_streamed_cmd(a: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    from pathlib import Path

    from .models import local_model_dir
    budget = parse_bytes(a.memory_budget)
    folder = Path(a.model) if (Path(a.model) / MANIFEST).exists() else local_model_dir(a.model)[0]
    if (folder / MANIFEST).exists():  # a pruned directory: its weights must be the ones the manifest names
        for name, digest in read_manifest(folder).get("weights_sha256", {}).items():
            if not (folder / name).exists() or sha256_file(folder / name) != digest:
                raise FlapError(f"{folder}/{name} does not match the sha256 in {MANIFEST}: the weights were changed")
    sm = StreamedModel(folder, dtype, device)
    sm.check_budget(budget, 1, a.seqlen, "perplexity")
    return _ppl(sm, _tokenizer(folder), a.data, a.data_split, a.data_path, a.seqlen, a.batch_size, a.max_windows,
                budget)
