"""Stage calibrate: dense per-channel statistics of the prepared model on N x T calibration windows."""
from __future__ import annotations

from ...calibrate import collect_stats
from ...data import calibration_windows
from ...stats import stats_to_tensors
from ...token_cache import cached_tokenize
from ..artifacts.io import sha256_tensor
from ..artifacts.records import calib_record, checked_text, load_prepared_model
from ..study.settings import CalibSettings, ModelSettings
from .stage import versions


def calibrate(model: ModelSettings, calib: CalibSettings, corpus: str, nsamples: int, record: dict,
              progress: bool = True):
    """(stats tensors, windows [N, T], manifest) of N windows of `corpus`; `calib` is data.calib (T, seed,
    batch size, and the default corpus's split/path). The manifest is also the stats file's metadata."""
    lm = load_prepared_model(model, record)
    data = calib_record(record, corpus)
    text = checked_text(calib.corpus_for(corpus), data, join=" ")
    windows = calibration_windows(cached_tokenize(lm.tokenizer, text.text), nsamples, calib.seqlen, calib.seed)
    stats = collect_stats(lm.model, windows, calib.batch_size, progress=progress)
    # the hash of the weights actually loaded (load_prepared_model refuses any other than prepare's)
    manifest = {"model": record["model"]["identity"], "weights_sha256": lm.weights_sha256,
                "data": data, "nsamples": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
                "seed": calib.seed, "dtype": str(lm.dtype).removeprefix("torch."),
                "windows_sha256": sha256_tensor(windows), "versions": versions()}
    return stats_to_tensors(stats), windows, manifest
