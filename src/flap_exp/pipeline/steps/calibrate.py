"""Stage calibrate: dense per-channel statistics of the prepared model on N x T calibration windows."""
from __future__ import annotations

from ..artifacts.io import sha256_tensor
from ..artifacts.records import calib_corpus, calib_record, checked_text, load_prepared_model
from .stage import versions


def calibrate(model_params: dict, calib: dict, corpus: str, nsamples: int, record: dict, progress: bool = True):
    """(stats tensors, windows [N, T], manifest) of N windows of `corpus`; `calib` is data.calib (T, seed,
    batch size, and the default corpus's split/path). The manifest is also the stats file's metadata."""
    from ...calibrate import collect_stats
    from ...data import calibration_windows, tokenize
    from ...stats import stats_to_tensors
    lm = load_prepared_model(model_params, record)
    data = calib_record(record, corpus)
    text = checked_text(calib_corpus(calib, corpus), data, join=" ")
    windows = calibration_windows(tokenize(lm.tokenizer, text.text), nsamples, calib["seqlen"], calib["seed"])
    stats = collect_stats(lm.model, windows, calib.get("batch_size", 8), progress=progress)
    # the hash of the weights actually loaded (load_prepared_model refuses any other than prepare's)
    manifest = {"model": record["model"]["identity"], "weights_sha256": lm.weights_sha256,
                "data": data, "nsamples": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
                "seed": calib["seed"], "dtype": str(lm.dtype).removeprefix("torch."),
                "windows_sha256": sha256_tensor(windows), "versions": versions()}
    return stats_to_tensors(stats), windows, manifest
