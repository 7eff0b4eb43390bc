"""Stage evaluate: rebuild a pruned model in memory (base model + selection + compensation) and measure it.

Three measurements, each its own stage and file (results/evaluate/KEY/{ppl,zeroshot,speed}.json):
perplexity for every cell (the main corpus, plus any in data.eval_extra), zero-shot accuracy and
throughput for the cells of the tables that ask for them (`measure:`), so adding a cell to the
zero-shot table never reruns its perplexity. Throughput of a pruned model is measured against a
fresh dense copy in the same process, interleaved, so the speedup is not skewed by drift between
processes. Nothing is saved but the numbers: no pruned model is cached per cell.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import FlapError
from .records import checked_text


def layer_params(model) -> int:
    """Attention + MLP weights of the decoder layers (the pruning ratio's denominator when dense)."""
    from ..arch import decoder_layers
    n = 0
    for layer in decoder_layers(model):
        for mod in (layer.self_attn, layer.mlp):
            n += sum(p.numel() for name, p in mod.named_parameters() if name.endswith("weight"))
    return n


def _throughput(model, tp: dict, load_dense: Callable[[], Any] | None) -> dict:
    """Median tokens/s per workload, and (for a pruned model) the median paired speedup over dense."""
    from ..evaluation import compare_throughput
    models = {"model": model}
    if load_dense is not None:
        models = {"dense": load_dense(), "model": model}  # the first is the speedup's reference
    kwargs: dict[str, Any] = {k: tuple(tuple(x) if isinstance(x, list) else x for x in tp[k])
              for k in ("prefill_shapes", "decode_batches") if tp.get(k)}
    kwargs |= {k: int(tp[k]) for k in ("prompt_len", "new_tokens", "warmup") if tp.get(k) is not None}
    res = compare_throughput(models, repeats=int(tp.get("repeats", 3)), **kwargs)
    out = {"throughput": res, "throughput_tokens_per_s": {
        name: w["tokens_per_s"]["median"] for name, w in res["models"]["model"]["workloads"].items()}}
    if load_dense is not None:
        out["speedup"] = {name: s["median"] for name, s in res["speedup"]["model"].items()}
    return out


def _perplexity(lm, corpus: dict, record: dict, eval_params: dict):
    from ..data import tokenize
    from ..ppl import perplexity
    text = checked_text(corpus, record, join="\n\n")
    return perplexity(lm.model, tokenize(lm.tokenizer, text.text), eval_params["seqlen"],
                      eval_params["batch_size"], eval_params.get("max_windows"), progress=True)


def evaluate(lm, selection: dict | None, comps: list | None, what: str, eval_params: dict, data: dict,
             record: dict, load_dense: Callable[[], Any] | None = None, extra: dict | None = None) -> dict:
    """Prune `lm.model` in place when a selection is given (with `comps`, a list[LayerComp] or None),
    then measure `what` (ppl, zeroshot or speed, each its own stage and file); returns the record.

    data: the main perplexity corpus (data.eval); extra: more corpora by name (data.eval_extra);
    load_dense: returns a fresh dense model, the throughput reference for a pruned one."""
    from ..selection import Selection
    from ..surgery import prune_model
    from .records import arch_of
    arch = arch_of(record)
    if selection is not None:
        prune_model(lm.model, Selection.from_json(selection, arch), comps, arch)
    kept = layer_params(lm.model)
    out = {"params_kept": kept, "params_total": arch.total_params, "achieved_ratio": 1 - kept / arch.total_params,
           "model_params": sum(p.numel() for p in lm.model.parameters())}
    if what == "ppl":
        ppl = _perplexity(lm, data, record["eval"], eval_params)
        out |= {"perplexity": ppl.ppl, "ppl_windows": ppl.windows, "ppl_tokens": ppl.tokens, "seqlen": ppl.seqlen,
                "eval_data": record["eval"], "ppl_nll_mean": ppl.nll_mean, "ppl_nll_std": ppl.nll_std,
                "ppl_ci95": None if ppl.interval95 is None else list(ppl.interval95),
                # per window, in order: two cells scored on the same windows can be compared pairwise
                "ppl_window_nll": ppl.window_nll}
        if extra:
            known = record.get("eval_extra") or {}
            missing = sorted(set(extra) - set(known))
            if missing:
                raise FlapError(f"corpora {', '.join(missing)} are not in results/prepare_eval.json; "
                                "rerun: dvc repro prepare_eval")
            out["perplexity_extra"] = {name: _perplexity(lm, c, known[name], eval_params).ppl
                                       for name, c in extra.items()}
    elif what == "zeroshot":
        from ..evaluation import evaluate_zeroshot
        zs = eval_params["zeroshot"]
        res = evaluate_zeroshot(lm.model, lm.tokenizer, list(zs["tasks"]), zs.get("limit"), zs.get("batch_size", 8),
                                source=zs.get("source", "local"))
        out |= {"zeroshot": res, "zeroshot_avg": res["average"]}
    elif what == "speed":
        out |= _throughput(lm.model, eval_params["throughput"], load_dense if selection is not None else None)
    else:
        raise FlapError(f"unknown measurement {what!r}; known: ppl, zeroshot, speed")
    return out
