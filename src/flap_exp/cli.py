"""Command line: `flap-exp prune`, `ppl` and `export`. argparse stays here; the library gets typed configs.

The parser reads only the torch-free catalogue; every command body imports the engine (torch, transformers)
inside the function, on purpose, so that `flap-exp --help` and a bad option answer at once."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import FlapError


def _add_corpus(p: argparse.ArgumentParser, prefix: str, name: str, split: str) -> None:
    from .catalogue import CORPORA
    p.add_argument(f"--{prefix}", default=name, choices=CORPORA, help=f"corpus (default {name})")
    p.add_argument(f"--{prefix}-split", default=split, help=f"WikiText-2 split (default {split})")
    p.add_argument(f"--{prefix}-path", default=None, help="WikiText-2 directory or text file")


def _add_compensation(p: argparse.ArgumentParser) -> None:
    from .catalogue import COMPENSATIONS
    from .methods.compensation.lsq import FORMS as LSQ_FORMS
    p.add_argument("--compensation", default=None, metavar="{" + ",".join(COMPENSATIONS) + "}",
                   help="what the surviving output projections become (default: the metric's, flap_exp.catalogue: "
                        "bias for FLAP's metrics, none for wanda_sp/weight_magnitude)")
    p.add_argument("--no-compensate", action="store_true", help="alias of --compensation none")
    p.add_argument("--lsq-damping", type=float, default=None,
                   help="lsq: ridge damping relative to the mean diagonal of the kept inputs' covariance")
    p.add_argument("--lsq-form", default=None, metavar="{" + ",".join(LSQ_FORMS) + "}",
                   help="lsq: statistics of the pruned model (sequential), the dense one, or drift-correcting")


def compensation_config(a: argparse.Namespace):
    """CompensationConfig of the prune options, or None for the metric's default; validated."""
    from .compensation import CompensationConfig, check_config
    method = a.compensation
    if a.no_compensate:
        if method not in (None, "none"):
            raise FlapError(f"--no-compensate contradicts --compensation {method}")
        method = "none"
    lsq = {k: v for k, v in (("damping", a.lsq_damping), ("form", a.lsq_form)) if v is not None}
    if lsq and method != "lsq":
        raise FlapError(f"{' and '.join(f'--lsq-{k}' for k in lsq)} {'is' if len(lsq) == 1 else 'are'} "
                        "for --compensation lsq only")
    return None if method is None else check_config(CompensationConfig(method, **lsq))


def _add_runtime(p: argparse.ArgumentParser) -> None:
    from .catalogue import DEVICES, DTYPE_SPECS
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)} or cuda:N (auto: a GPU if any)")
    p.add_argument("--dtype", default="float32", help=f"weights' dtype, one of {', '.join(DTYPE_SPECS)} (auto: "
                   "bfloat16 where the device multiplies it natively, else float32; statistics are float64 "
                   "whatever it is)")
    p.add_argument("--stream", action="store_true",
                   help="keep one decoder layer in memory at a time, read from the safetensors shards")
    p.add_argument("--memory-budget", default=None,
                   help="with --stream: bytes for weights + activations, e.g. 768MiB (refused if one layer won't fit)")


def _runtime(a: argparse.Namespace):
    """(device, dtype) checked before any model is loaded."""
    from .runtime import resolve_device, resolve_dtype
    from .units import parse_bytes
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    if a.memory_budget is not None and not a.stream:
        raise FlapError("--memory-budget applies to --stream runs only")
    parse_bytes(a.memory_budget)
    return device, dtype


def _parser() -> argparse.ArgumentParser:
    from .catalogue import METHODS as METRICS, STRUCTURES
    ap = argparse.ArgumentParser(prog="flap-exp", description="FLAP structured pruning of LLaMA-family models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prune", help="prune a model and save it")
    p.add_argument("--model", default="smollm2-135m", help="embedded name, local directory or Hub id")
    p.add_argument("--metric", default="wifv", help=f"one of {', '.join(METRICS)}")
    p.add_argument("--structure", default="al_am", help=f"one of {', '.join(STRUCTURES)}")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of attention+MLP weights to remove")
    _add_compensation(p)
    p.add_argument("--square-attn", choices=["default", "on", "off"], default="default")
    p.add_argument("--min-groups", type=int, default=0, help="k/v groups every layer keeps")
    p.add_argument("--min-channels", type=int, default=0, help="MLP channels every layer keeps")
    p.add_argument("--remove-groups", type=int, default=None, help="MM structures: groups removed in total")
    p.add_argument("--ul-rounding", choices=["fill", "floor"], default="fill",
                   help="UL structures: fill (MLP channels take the share whole groups cannot meet, default) "
                        "or floor (official floor(p x units) per layer)")
    p.add_argument("--head-cost", choices=["exact", "official"], default="exact",
                   help="AL-AM group cost: exact, or official (the official code's truncated integer cost)")
    p.add_argument("--attn-unit", choices=["group", "query"], default="group",
                   help="attention units: whole k/v groups (default), or query heads inside a group (al_am, ul_um; "
                        "k/v go once all their query heads have)")
    p.add_argument("--obs-batch", type=int, default=1, help="metric obs: units removed per greedy step")
    p.add_argument("--obs-damping", type=float, default=0.01,
                   help="metric obs: λ of H = Σ + λI relative to the mean diagonal of Σ")
    p.add_argument("--search-candidates", type=int, default=32,
                   help="structure kl_search: fitness evaluations of the level search (1: uniform)")
    p.add_argument("--search-windows", type=int, default=8, help="structure kl_search: calibration windows of the KL")
    p.add_argument("--search-step", type=float, default=0.05, help="structure kl_search: the levels' grid step")
    p.add_argument("--search-seed", type=int, default=0, help="structure kl_search: the search's seed")
    _add_corpus(p, "calib", "wiki", "train")
    p.add_argument("--nsamples", type=int, default=1024, help="N calibration windows (the paper's 1024)")
    p.add_argument("--seqlen", type=int, default=128, help="T tokens per window (the paper's 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    _add_runtime(p)
    p.add_argument("--out", required=True, help="directory to write the pruned model to (a new path)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds a flap-exp pruned model")
    p.add_argument("--eval", action="store_true", help="also print the pruned model's perplexity")
    _add_corpus(p, "eval-data", "wikitext2", "test")
    q = sub.add_parser("ppl", help="perplexity of a model or pruned directory")
    q.add_argument("model", help="pruned directory, embedded name, local directory or Hub id")
    _add_corpus(q, "data", "wikitext2", "test")
    q.add_argument("--seqlen", type=int, default=128)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--max-windows", type=int, default=None, help="evaluate only the first windows")
    _add_runtime(q)
    e = sub.add_parser("export", help="write a pruned directory for another program (transformers, llama.cpp)")
    e.add_argument("model", help="pruned directory (written by flap-exp prune --out)")
    e.add_argument("--to", required=True, help="hf (a stock transformers directory; every layer the same widths) "
                   "or gguf (llama.cpp, any widths)")
    e.add_argument("out", help="a new path: a directory for hf, a file for gguf")
    e.add_argument("--gguf-type", default=None, help="gguf tensor type: f32 (default), f16 or q8_0")
    return ap


def _ppl(model, tokenizer, text, seqlen: int, batch_size: int, max_windows=None, streamed: bool = False) -> dict:
    """Perplexity on `text` (a data.Text, read before the model is loaded so that a bad corpus fails fast) of an
    in-memory model or a layer store."""
    from .data import tokenize
    from .ppl import perplexity
    return {**perplexity(model, tokenize(tokenizer, text.text), seqlen, batch_size, max_windows).to_dict(),
            "data": text.identity, **({"streamed": True} if streamed else {})}


def _warn(lines: list[str]) -> None:
    for line in lines:
        print(f"flap-exp: warning: {line}", file=sys.stderr)


def _check_prune_sizes(a: argparse.Namespace) -> None:
    from .validate import check_int
    check_int("--nsamples", a.nsamples, 2, " (the variance of one sample is undefined)")
    check_int("--seqlen", a.seqlen, 2, " (a window of one token predicts nothing)")
    check_int("--batch-size", a.batch_size, 1)
    check_int("--min-groups", a.min_groups, 0)
    check_int("--min-channels", a.min_channels, 0)
    check_int("--remove-groups", a.remove_groups, 0, allow_none=True)


def _check_prune(a: argparse.Namespace, itemsize: int = 4):
    """Every prune option and path, before any weight is read; the model's ArchView when its config is at hand.
    `itemsize`: bytes per weight written (the --dtype)."""
    from .models import EMBEDDED, IDENTITY
    from .tempfiles import sweep_stale
    from .validate import (
        check_cache_usable,
        check_free_space,
        check_not_pruned,
        check_out_dir,
        check_structure_options,
        estimate_pruned_bytes,
        model_dir,
        peek_arch,
    )
    check_not_pruned(a.model)
    out = check_out_dir(a.out, a.model, a.overwrite)
    sweep_stale(out.parent)  # temporaries of killed runs beside --out
    cached = model_dir(a.model) if a.model in EMBEDDED else None
    if cached is not None and not (cached / IDENTITY).exists():
        check_cache_usable()  # a first use converts the model into the cache
    arch = peek_arch(a.model)
    if arch is not None:
        _warn(check_structure_options(arch, a.structure, a.ratio, a.min_groups, a.min_channels, a.remove_groups))
    need = estimate_pruned_bytes(a.model, a.ratio, itemsize)
    if need is not None:
        check_free_space(out.parent, need, f"--out {a.out}")
    return arch


def prune_config(a: argparse.Namespace):
    """The validated PruneConfig of `prune`'s options (before any model is loaded)."""
    from .prune import PruneConfig
    from .structures import StructureOptions
    sq = {"default": None, "on": True, "off": False}[a.square_attn]
    return PruneConfig(a.metric, a.structure, a.ratio, compensation=compensation_config(a), square_attn=sq,
                       options=StructureOptions(a.min_groups, a.min_channels, a.remove_groups,
                                                ul_rounding=a.ul_rounding, head_cost=a.head_cost,
                                                attn_unit=a.attn_unit, obs_batch=a.obs_batch,
                                                obs_damping=a.obs_damping, search_step=a.search_step,
                                                search_candidates=a.search_candidates,
                                                search_windows=a.search_windows, search_seed=a.search_seed),
                       batch_size=a.batch_size).validate()


def _streamed(spec: str, device, dtype, budget):
    """(StreamedModel, tokenizer, identity) of a pruned directory, an embedded name or a local directory."""
    from pathlib import Path

    from .manifest import MANIFEST
    from .streaming import open_streamed
    lm = open_streamed(spec, dtype, device, budget)
    return lm.model, lm.tokenizer, {} if (Path(spec) / MANIFEST).exists() else lm.identity


def cmd_prune(a: argparse.Namespace) -> dict:
    from .outlock import out_lock
    from .validate import check_out_dir
    _check_prune_sizes(a)
    cfg = prune_config(a)
    device, dtype = _runtime(a)
    arch = _check_prune(a, dtype.itemsize)
    with out_lock(a.out):  # one writer per --out: a second run fails here at once, naming this one
        check_out_dir(a.out, a.model, a.overwrite)  # again: a run that held the lock may just have written it
        return _prune_locked(a, cfg, device, dtype, arch)


def _prune_locked(a: argparse.Namespace, cfg, device, dtype, arch) -> dict:
    from .compensation import config_record
    from .data import Corpus, calibration_windows, load_text, tokenize
    from .models import load_model
    from .persist import save_pruned, write_streamed
    from .prune import prune
    from .units import parse_bytes
    from .validate import check_out_dir, check_structure_options
    budget = parse_bytes(a.memory_budget)
    if a.stream:  # every shard and the budget checked before the text is read
        sm, tok, identity = _streamed(a.model, device, dtype, budget)
        sm.check_budget(a.nsamples, a.seqlen, f"calibrating {a.nsamples} windows")
    calib = load_text(Corpus(a.calib, a.calib_split, a.calib_path), join=" ")  # official: train rows joined by " "
    ev = load_text(Corpus(a.eval_data, a.eval_data_split, a.eval_data_path)) if a.eval else None
    if not a.stream:
        lm = load_model(a.model, dtype=dtype, device=str(device))
        tok, identity = lm.tokenizer, lm.identity
        if arch is None:  # no config at hand before loading (a Hub id, a first conversion): check now
            _warn(check_structure_options(lm.arch, a.structure, a.ratio, a.min_groups, a.min_channels,
                                          a.remove_groups))
    windows = calibration_windows(tokenize(tok, calib.text), a.nsamples, a.seqlen, a.seed)
    dense_arch = sm.arch if a.stream else lm.arch  # before pruning changes the model's config
    manifest = {"base_model": identity, "settings": cfg.to_dict(),
                "compensation": config_record(cfg.resolved_compensation()),
                "calibration": {"data": calib.identity, "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": a.seed},
                "dtype": str(dtype).removeprefix("torch."),  # what ran: --dtype auto resolved
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if a.stream:
        res = write_streamed(sm, windows, cfg, a.out, manifest, tok)
    else:
        res = prune(lm.model, windows, cfg)
        check_out_dir(a.out, a.model, a.overwrite)  # again: the path may have changed during the long work
        save_pruned(lm.model, tok, {**manifest, "achieved_ratio": res.achieved_ratio,
                                    "selection": res.selection.to_json(), "seconds": res.seconds}, a.out)
    if cfg.resolved_compensation().method == "lsq":  # a warning, not an error (flap_exp/adequacy.py)
        from .adequacy import lsq_warning_for
        _warn([w for w in [lsq_warning_for(res.selection, dense_arch, a.nsamples, a.seqlen)] if w])
    out = {"out": a.out, "achieved_ratio": round(res.achieved_ratio, 6), "compensation": manifest["compensation"],
           "seconds": res.seconds, **({"streamed": True} if a.stream else {})}
    if a.eval:
        model = _streamed(a.out, device, dtype, budget)[0] if a.stream else lm.model
        out["perplexity"] = _ppl(model, tok, ev, a.seqlen, a.batch_size, streamed=a.stream)
    return out


def _check_model_spec(spec: str) -> None:
    """Cheap model checks before the corpus is read: a pruned directory's manifest and weight hashes, and
    a path-like name that does not exist (it is no Hub id either)."""
    import os
    from pathlib import Path

    from .manifest import MANIFEST, read_manifest, verify_weights
    if (Path(spec) / MANIFEST).exists():
        verify_weights(spec, read_manifest(spec))
    elif spec.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(spec)):
        raise FlapError(f"cannot load model {spec!r}: no such directory")


def cmd_ppl(a: argparse.Namespace) -> dict:
    from pathlib import Path

    from .data import Corpus, load_text
    from .manifest import MANIFEST
    from .models import load_model
    from .persist import load_pruned
    from .units import parse_bytes
    from .validate import check_int
    check_int("--seqlen", a.seqlen, 2, " (a window of one token predicts nothing)")
    check_int("--batch-size", a.batch_size, 1)
    check_int("--max-windows", a.max_windows, 1, allow_none=True)
    device, dtype = _runtime(a)
    _check_model_spec(a.model)  # a pruned directory's weights against its manifest, once
    if a.stream:
        model, tok, _ = _streamed(a.model, device, dtype, parse_bytes(a.memory_budget))
        model.check_budget(1, a.seqlen, "perplexity")
    text = load_text(Corpus(a.data, a.data_split, a.data_path))
    if not a.stream and (Path(a.model) / MANIFEST).exists():
        model, tok, _ = load_pruned(a.model, dtype=dtype, device=str(device), verify=False)  # verified above
    elif not a.stream:
        lm = load_model(a.model, dtype=dtype, device=str(device))
        model, tok = lm.model, lm.tokenizer
    return _ppl(model, tok, text, a.seqlen, a.batch_size, a.max_windows, streamed=a.stream)


def cmd_export(a: argparse.Namespace) -> dict:
    import importlib

    from .export import FORMATS, check_request
    req = check_request(a.model, a.to, a.out, a.gguf_type)  # everything checked before a weight is read
    return importlib.import_module(f".export.{FORMATS[req.to]}", __package__).export(req)


def main(argv: list[str] | None = None) -> int:
    from .tempfiles import Terminated, signals_as_exit
    a = _parser().parse_args(argv)
    try:
        with signals_as_exit():  # SIGTERM/SIGINT unwind through the cleanups of temporaries
            out = {"prune": cmd_prune, "ppl": cmd_ppl, "export": cmd_export}[a.cmd](a)
    except FlapError as err:
        print(f"flap-exp: error: {err}", file=sys.stderr)
        return 2
    except Terminated as t:
        import signal
        print(f"flap-exp: stopped by {signal.Signals(t.signum).name}; temporaries removed", file=sys.stderr)
        return t.code
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
