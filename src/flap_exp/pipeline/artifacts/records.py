"""The prepared model and data, and statistics checked against them (refuses mismatched or tampered files).

`results/prepare.json` records what the model and the calibration corpora are (identity, weights sha256,
text sha256 per corpus). Every later stage that loads the model or reads text or statistics checks them
against that record.
"""
from __future__ import annotations

from pathlib import Path

from ...errors import FlapError
from ...sources import sha256_file
from ..study.settings import CorpusSettings, ModelSettings
from . import paths
from .io import load_tensors, read_json, sha256_bytes, sha256_tensor, weights_sha256
from .paths import PREPARE, PREPARE_EVAL


def calib_record(record: dict, corpus: str) -> dict:
    rec = record["calib"].get(corpus)
    if rec is None:
        raise FlapError(f"calibration corpus {corpus!r} is not in {PREPARE}; rerun: dvc repro prepare")
    return rec


def eval_record() -> dict:
    """prepare.json merged with prepare_eval.json: what the evaluate and track stages check against."""
    return {**read_json(PREPARE), **read_json(PREPARE_EVAL)}


def model_dtype(model: ModelSettings) -> str:
    """The dtype conf/model's settings run in here: model.dtype, with auto resolved for model.device (what
    prepare, the calibration manifests and MLflow record, so that a cached result says which one ran)."""
    from ...runtime import resolve_device, resolve_dtype  # torch: the reporting stages import this module
    return str(resolve_dtype(model.dtype, resolve_device(model.device))).removeprefix("torch.")


def open_model(model: ModelSettings):
    """models.LoadedModel of conf/model's settings: in memory, or (`stream: true`) a StreamedModel within
    `memory_budget` (one decoder layer resident at a time)."""
    # models, runtime (and streaming): torch and transformers; the reporting stages import this module
    from ...models import load_model
    from ...runtime import resolve_device, resolve_dtype
    device = resolve_device(model.device)  # "auto": the GPU when there is one
    dtype = resolve_dtype(model.dtype, device)
    if model.stream:
        from ...streaming import open_streamed  # the streamed store: only for model.stream
        return open_streamed(model.name, dtype, device, model.memory_budget)
    return load_model(model.name, dtype, str(device))


def load_prepared_model(model: ModelSettings, record: dict):
    """Open the model named in params and check it is the one `prepare` recorded, in the dtype it recorded
    (model.dtype auto may resolve otherwise on another machine: the weights' hash would differ too)."""
    ran, want_dtype = model_dtype(model), record["model"].get("dtype", "float32")
    if ran != want_dtype:
        raise FlapError(f"model.dtype {model.dtype} runs in {ran} here, but prepare recorded "
                        f"{want_dtype}; rerun: dvc repro -f prepare (or set model.dtype={want_dtype})")
    lm = open_model(model)
    want = record["model"]["identity"]
    if lm.identity != want:
        raise FlapError(f"model {model.name!r} is not the one prepare recorded ({want.get('name')}, "
                        f"{want.get('source')}); rerun: dvc repro -f prepare")
    return verify_prepared_weights(lm, record, model.name)


def verify_prepared_weights(lm, record: dict, name: str):
    """Refuse weights that are not finite or differ from the sha256 prepare recorded (a model directory
    edited in place): statistics and results are never labelled with another weights' hash. (A streamed
    model's weights are checked finite as each layer is read.)"""
    from ...integrity import check_finite_weights  # torch: the reporting stages import this module
    if not lm.streamed:
        check_finite_weights(lm.model, f"model {name!r}")
    lm.weights_sha256 = weights_sha256(lm.model)
    want = record["model"]["weights_sha256"]
    if lm.weights_sha256 != want:
        raise FlapError(f"model {name!r}: its weights changed since prepare recorded them (sha256 "
                        f"{lm.weights_sha256[:12]} != {want[:12]}); rerun: dvc repro prepare")
    return lm


def load_corpus(corpus: CorpusSettings, join: str):
    """data.LoadedText of a conf/ corpus (`join`: how its documents are joined, per the official protocol)."""
    from ...data import Corpus, load_text  # data imports torch; the reporting stages import this module
    return load_text(Corpus(corpus.corpus, corpus.split, corpus.path), join=join)


def checked_text(corpus: CorpusSettings, record: dict, join: str):
    """The corpus text, refused if it is not byte-identical to what prepare recorded."""
    text = load_corpus(corpus, join)
    got = sha256_bytes(text.text.encode("utf-8"))
    if got != record["text_sha256"]:
        raise FlapError(f"corpus {corpus.corpus!r} changed since prepare recorded it (sha256 {got[:12]} != "
                        f"{record['text_sha256'][:12]}); rerun: dvc repro -f prepare")
    return text


def check_stats_origin(meta: dict, record: dict, where: str) -> None:
    m = record["model"]
    texts = {r["text_sha256"] for r in record["calib"].values()}
    if meta.get("model") != m["identity"] or meta.get("weights_sha256") != m["weights_sha256"]:
        raise FlapError(f"{where}: statistics were computed for model {meta.get('model', {}).get('name')!r} "
                        f"(weights {str(meta.get('weights_sha256'))[:12]}), not the prepared model "
                        f"{m['identity'].get('name')!r} (weights {m['weights_sha256'][:12]}); refusing them")
    if (meta.get("data") or {}).get("text_sha256") not in texts:
        raise FlapError(f"{where}: statistics were computed on other calibration data (sha256 "
                        f"{str((meta.get('data') or {}).get('text_sha256'))[:12]} is none of the prepared "
                        "corpora's); refusing them")


def load_checked_stats(path: str | Path, record: dict, manifest: str | Path | None = None):
    """LayerStats from `path`, refused unless they match the prepared model/data (and their manifest)."""
    from ...stats import stats_from_tensors  # torch: the reporting stages import this module
    tensors, meta = load_tensors(path)
    if manifest is not None:
        mj = read_json(manifest)
        if mj.get("stats_sha256") != sha256_file(path):
            raise FlapError(f"{path} does not match its manifest {manifest} (sha256 differs); "
                            "refusing tampered statistics: rerun dvc repro -f calibrate@CALIB")
        core = {k: v for k, v in mj.items() if k in meta}
        if core != meta:
            bad = sorted(k for k in meta if mj.get(k) != meta[k])
            raise FlapError(f"{manifest} disagrees with the statistics it describes on {', '.join(bad)}; "
                            "refusing tampered statistics: rerun dvc repro -f calibrate@CALIB")
    check_stats_origin(meta, record, str(path))
    from ...integrity import check_finite_tensors  # torch, as above
    check_finite_tensors(tensors, str(path))  # a sequential cell's statistics have no manifest hash
    stats = stats_from_tensors(tensors)
    arch = record["model"]["arch"]
    attn = arch["num_heads"] * arch["head_dim"]
    if len(stats) != arch["num_layers"] or any(s.attn.mean.numel() != attn or
                                               s.mlp.mean.numel() != arch["intermediate_size"] for s in stats):
        raise FlapError(f"{path}: statistics shapes do not fit the prepared model; refusing them")
    return stats, meta


def arch_of(record: dict):
    from ...arch import ArchView  # torch: the reporting stages import this module
    return ArchView(**record["model"]["arch"])


def load_checked_windows(calib: str):
    """(windows [N, T], manifest) of calibration `calib`, refused unless the windows are the ones its
    manifest names."""
    manifest = read_json(paths.manifest(calib))
    windows = load_tensors(paths.windows(calib))[0]["windows"]
    if sha256_tensor(windows) != manifest["windows_sha256"]:
        raise FlapError(f"{paths.windows(calib)} does not match {paths.manifest(calib)}; refusing it: "
                        f"rerun dvc repro -f calibrate@{calib}")
    return windows, manifest
