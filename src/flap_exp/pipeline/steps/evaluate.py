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

from ...arch import decoder_layers
from ...errors import FlapError
from ...evaluation import compare_throughput, evaluate_zeroshot
from ...ppl import perplexity
from ...selection import Selection
from ...surgery import PrunedView, prune_model
from ...token_cache import cached_tokenize
from ..artifacts.records import arch_of, checked_text
from ..study.settings import CorpusSettings, EvalSettings, ThroughputSettings


def layer_params(model) -> int:
    """Attention + MLP weights of the decoder layers (the pruning ratio's denominator when dense)."""
    n = 0
    for layer in decoder_layers(model):
        for mod in (layer.self_attn, layer.mlp):
            n += sum(p.numel() for name, p in mod.named_parameters() if name.endswith("weight"))
    return n


def _streamed_params(store) -> tuple[int, int]:
    """(attention + MLP weights, all parameters) of a streamed model or a PrunedView of one."""
    rest = sum(p.numel() for name, p in store.model.named_parameters() if not name.startswith("model.layers."))
    if hasattr(store, "layer_numels"):
        layers = store.layer_numels()
        return sum(w for w, _ in layers), rest + sum(n for _, n in layers)
    skeleton = [store.model.model.layers[i] for i in range(store.num_layers)]  # meta tensors: shapes only
    weights = sum(p.numel() for layer in skeleton for mod in (layer.self_attn, layer.mlp)
                  for name, p in mod.named_parameters() if name.endswith("weight"))
    return weights, rest + sum(p.numel() for layer in skeleton for p in layer.parameters())


def _throughput(model, tp: ThroughputSettings, load_dense: Callable[[], Any] | None) -> dict:
    """Median tokens/s per workload, and (for a pruned model) the median paired speedup over dense."""
    models = {"model": model}
    if load_dense is not None:
        models = {"dense": load_dense(), "model": model}  # the first is the speedup's reference
    kwargs: dict[str, Any] = {k: v for k, v in (("prefill_shapes", tp.prefill_shapes),
                                                 ("decode_batches", tp.decode_batches)) if v}
    res = compare_throughput(models, repeats=tp.repeats, prompt_len=tp.prompt_len, new_tokens=tp.new_tokens,
                             warmup=tp.warmup, **kwargs)
    out = {"throughput": res, "throughput_tokens_per_s": {
        name: w["tokens_per_s"]["median"] for name, w in res["models"]["model"]["workloads"].items()}}
    if load_dense is not None:
        out["speedup"] = {name: s["median"] for name, s in res["speedup"]["model"].items()}
    return out


def _perplexity(lm, corpus: CorpusSettings, record: dict, ev: EvalSettings):
    text = checked_text(corpus, record, join="\n\n")
    return perplexity(lm.model, cached_tokenize(lm.tokenizer, text.text), ev.seqlen, ev.batch_size, ev.max_windows,
                      progress=True)


def evaluate(lm, selection: dict | None, comps: list | None, what: str, ev: EvalSettings, record: dict,
             load_dense: Callable[[], Any] | None = None, extra: bool = False) -> dict:
    """Prune `lm.model` in place when a selection is given (with `comps`, a list[LayerComp] or None),
    then measure `what` (ppl, zeroshot or speed, each its own stage and file); returns the record.

    ev: the eval settings (ppl: ev.corpus, and with `extra` also ev.extra, data.eval_extra);
    load_dense: returns a fresh dense model, the throughput reference for a pruned one."""
    arch = arch_of(record)
    if lm.streamed:  # never built whole: each layer cut as it is read
        if what != "ppl":
            raise FlapError(f"{what} needs the model in memory; with model.stream only perplexity is measured")
        if selection is not None:
            lm.model = PrunedView(lm.model, Selection.from_json(selection, arch), comps)
        kept, model_params = _streamed_params(lm.model)
    else:
        if selection is not None:
            prune_model(lm.model, Selection.from_json(selection, arch), comps, arch)
        kept, model_params = layer_params(lm.model), sum(p.numel() for p in lm.model.parameters())
    out = {"params_kept": kept, "params_total": arch.total_params, "achieved_ratio": 1 - kept / arch.total_params,
           "model_params": model_params}
    if what == "ppl":
        ppl = _perplexity(lm, ev.corpus, record["eval"], ev)
        out |= {"perplexity": ppl.ppl, "ppl_windows": ppl.windows, "ppl_tokens": ppl.tokens, "seqlen": ppl.seqlen,
                "eval_data": record["eval"], "ppl_nll_mean": ppl.nll_mean, "ppl_nll_std": ppl.nll_std,
                "ppl_ci95": None if ppl.interval95 is None else list(ppl.interval95),
                # per window, in order: two cells scored on the same windows can be compared pairwise
                "ppl_window_nll": ppl.window_nll}
        if extra and ev.extra:
            known = record.get("eval_extra") or {}
            missing = sorted(set(ev.extra) - set(known))
            if missing:
                raise FlapError(f"corpora {', '.join(missing)} are not in results/prepare_eval.json; "
                                "rerun: dvc repro prepare_eval")
            out["perplexity_extra"] = {name: _perplexity(lm, c, known[name], ev).ppl for name, c in ev.extra.items()}
    elif what == "zeroshot":
        zs = ev.zeroshot
        if zs is None:
            raise FlapError("eval.zeroshot is not set in params.yaml: this study measures no zero-shot accuracy")
        res = evaluate_zeroshot(lm.model, lm.tokenizer, list(zs.tasks), zs.limit, zs.batch_size, source=zs.source)
        out |= {"zeroshot": res, "zeroshot_avg": res["average"]}
    elif what == "speed":
        if ev.throughput is None:
            raise FlapError("eval.throughput is not set in params.yaml: this study measures no throughput")
        out |= _throughput(lm.model, ev.throughput, load_dense if selection is not None else None)
    else:
        raise FlapError(f"unknown measurement {what!r}; known: ppl, zeroshot, speed")
    return out
