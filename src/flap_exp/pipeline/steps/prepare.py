"""Stage prepare: convert/cache the base model, fetch the corpora, record what they are."""
from __future__ import annotations

from dataclasses import asdict, replace

from ...integrity import check_finite_weights
from ...validate import check_not_pruned
from ..artifacts.io import sha256_bytes, weights_sha256
from ..artifacts.records import load_corpus, model_dtype, open_model
from ..study.settings import CalibSettings, CorpusSettings, EvalSettings, ModelSettings
from .stage import versions


def _text_record(corpus: CorpusSettings, join: str) -> dict:
    text = load_corpus(corpus, join)
    return {**text.identity, "text_sha256": sha256_bytes(text.text.encode("utf-8")), "chars": len(text.text)}


def prepare(model: ModelSettings, calib: CalibSettings, corpora: list[str]) -> dict:
    """The base model's record and the calibration corpora's (results/prepare.json), by corpus name;
    evaluation corpora are recorded apart (prepare_eval) so that adding one never invalidates calibration."""
    check_not_pruned(model.name, "model.name")  # its ratios would count against the dense widths
    dtype = model_dtype(model)  # auto resolved for the device the stages run on; hashed on the CPU
    lm = open_model(replace(model, device="cpu", dtype=dtype))
    if not lm.streamed:  # (streamed: each layer is checked as it is read, by the hash below)
        check_finite_weights(lm.model, f"model {model.name!r}")  # refused before any stage uses it
    record = {"spec": model.name, "identity": lm.identity, "arch": asdict(lm.arch),
             "weights_sha256": weights_sha256(lm.model), "dtype": dtype,
             "params": sum(p.numel() for p in (lm.model.model if lm.streamed else lm.model).parameters())}
    return {"model": record,
            # the official calibration join
            "calib": {c: _text_record(calib.corpus_for(c), join=" ") for c in corpora},
            "versions": versions()}


def prepare_eval(ev: EvalSettings) -> dict:
    """The perplexity corpora's records (results/prepare_eval.json): data.eval and data.eval_extra."""
    return {"eval": _text_record(ev.corpus, join="\n\n"),  # the perplexity join
            "eval_extra": {name: _text_record(c, join="\n\n") for name, c in ev.extra.items()}}
