"""Stage prepare: convert/cache the base model, fetch the corpora, record what they are."""
from __future__ import annotations

from dataclasses import asdict

from ..artifacts.io import sha256_bytes, weights_sha256
from .stage import versions


def _text_record(corpus: dict, join: str) -> dict:
    from ...data import Corpus, load_text
    text = load_text(Corpus(corpus["corpus"], corpus.get("split", "test"), corpus.get("path")), join=join)
    return {**text.identity, "text_sha256": sha256_bytes(text.text.encode("utf-8")), "chars": len(text.text)}


def prepare(model_params: dict, data_params: dict, corpora: list[str]) -> dict:
    """The base model's record and the calibration corpora's (results/prepare.json), by corpus name;
    evaluation corpora are recorded apart (prepare_eval) so that adding one never invalidates calibration."""
    from ...integrity import check_finite_weights
    from ...validate import check_not_pruned
    from ..artifacts.records import calib_corpus, model_dtype, open_model
    check_not_pruned(model_params["name"], "model.name")  # its ratios would count against the dense widths
    dtype = model_dtype(model_params)  # auto resolved for the device the stages run on; hashed on the CPU
    lm = open_model({**model_params, "device": "cpu", "dtype": dtype})
    if not lm.streamed:  # (streamed: each layer is checked as it is read, by the hash below)
        check_finite_weights(lm.model, f"model {model_params['name']!r}")  # refused before any stage uses it
    model = {"spec": model_params["name"], "identity": lm.identity, "arch": asdict(lm.arch),
             "weights_sha256": weights_sha256(lm.model), "dtype": dtype,
             "params": sum(p.numel() for p in (lm.model.model if lm.streamed else lm.model).parameters())}
    return {"model": model,
            # the official calibration join
            "calib": {c: _text_record(calib_corpus(data_params["calib"], c), join=" ") for c in corpora},
            "versions": versions()}


def prepare_eval(data_params: dict) -> dict:
    """The perplexity corpora's records (results/prepare_eval.json): data.eval and data.eval_extra."""
    return {"eval": _text_record(data_params["eval"], join="\n\n"),  # the perplexity join
            "eval_extra": {name: _text_record(c, join="\n\n")
                           for name, c in (data_params.get("eval_extra") or {}).items()}}
