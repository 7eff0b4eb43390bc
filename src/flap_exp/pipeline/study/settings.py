"""The study's params as typed frozen objects, built once from a params.yaml that `check_params` validated.

A step reads `settings.calib.batch_size`, never `params["data"]["calib"].get("batch_size", 8)`: every default
lives in conf/ (compose writes every key), and a key missing here is a params.yaml that did not come from
compose, refused in one line. The method tables (metrics, structures, compensations) stay mappings: each
method's registry owns its options and their checks.
Pure Python (no torch): the reporting stages read these too.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ...catalogue import floor_fraction
from ...errors import FlapError
from ...units import parse_bytes


def _need(node: Mapping, key: str, where: str) -> Any:
    if not isinstance(node, Mapping) or key not in node:
        raise FlapError(f"params.yaml has no {where}.{key}: compose it again (make compose)")
    return node[key]


@dataclass(frozen=True)
class CorpusSettings:
    corpus: str
    split: str
    path: str | None

    @classmethod
    def of(cls, node: Mapping, where: str) -> CorpusSettings:
        return cls(_need(node, "corpus", where), _need(node, "split", where), _need(node, "path", where))

    @classmethod
    def given(cls, node: Mapping, where: str) -> CorpusSettings:
        """A corpus the user writes whole on the command line (data.eval_extra.NAME={corpus: c4}): no conf/ file
        fills it, so split and path take data.Corpus's defaults (the test split; the corpus's own source)."""
        return cls(_need(node, "corpus", where), node.get("split") or "test", node.get("path"))

    def conf(self) -> dict:
        """The conf/ mapping {corpus, split, path} (what the calibration manifests record)."""
        return {"corpus": self.corpus, "split": self.split, "path": self.path}


@dataclass(frozen=True)
class ModelSettings:
    name: str
    dtype: str = "float32"
    device: str = "cpu"
    stream: bool = False
    memory_budget: int | None = None  # bytes; None: the streamed store's own default

    @classmethod
    def of(cls, node: Mapping) -> ModelSettings:
        return cls(_need(node, "name", "model"), _need(node, "dtype", "model"), _need(node, "device", "model"),
                   bool(_need(node, "stream", "model")), parse_bytes(_need(node, "memory_budget", "model")))


@dataclass(frozen=True)
class CalibSettings:
    corpus: CorpusSettings
    nsamples: int
    seqlen: int
    seed: int
    batch_size: int

    @classmethod
    def of(cls, node: Mapping) -> CalibSettings:
        w = "data.calib"
        return cls(CorpusSettings.of(node, w), _need(node, "nsamples", w), _need(node, "seqlen", w),
                   _need(node, "seed", w), _need(node, "batch_size", w))

    def corpus_for(self, corpus: str) -> CorpusSettings:
        """A calibration corpus: data.calib's own (split, path) for its corpus, the train split of another."""
        return self.corpus if corpus == self.corpus.corpus else CorpusSettings(corpus, "train", None)


@dataclass(frozen=True)
class ZeroshotSettings:
    tasks: tuple[str, ...]
    limit: int | None  # documents per task; None: all
    batch_size: int
    source: str  # "local": the registry-shipped benchmarks; "hub": lm-eval's own download

    @classmethod
    def of(cls, node: Mapping) -> ZeroshotSettings:
        w = "eval.zeroshot"
        return cls(tuple(_need(node, "tasks", w)), _need(node, "limit", w), _need(node, "batch_size", w),
                   _need(node, "source", w))


@dataclass(frozen=True)
class ThroughputSettings:
    repeats: int
    warmup: int
    prefill_shapes: tuple[tuple[int, int], ...]
    decode_batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int

    @classmethod
    def of(cls, node: Mapping) -> ThroughputSettings:
        w = "eval.throughput"
        return cls(_need(node, "repeats", w), _need(node, "warmup", w),
                   tuple((int(b), int(t)) for b, t in _need(node, "prefill_shapes", w) or ()),
                   tuple(_need(node, "decode_batches", w) or ()), _need(node, "prompt_len", w),
                   _need(node, "new_tokens", w))


@dataclass(frozen=True)
class EvalSettings:
    corpus: CorpusSettings  # data.eval: the perplexity corpus of the tables
    extra: Mapping[str, CorpusSettings]  # data.eval_extra: more perplexity corpora, by name
    seqlen: int
    batch_size: int
    max_windows: int | None  # None: the whole split
    zeroshot: ZeroshotSettings | None
    throughput: ThroughputSettings | None

    @classmethod
    def of(cls, data: Mapping, node: Mapping) -> EvalSettings:
        extra = _need(data, "eval_extra", "data") or {}
        zs, tp = node.get("zeroshot"), node.get("throughput")  # absent: the study measures no zero-shot/speed
        return cls(CorpusSettings.of(_need(data, "eval", "data"), "data.eval"),
                   {k: CorpusSettings.given(v, f"data.eval_extra.{k}") for k, v in extra.items()},
                   _need(node, "seqlen", "eval"), _need(node, "batch_size", "eval"), _need(node, "max_windows", "eval"),
                   ZeroshotSettings.of(zs) if zs is not None else None,
                   ThroughputSettings.of(tp) if tp is not None else None)


@dataclass(frozen=True)
class StudySettings:
    protocol: str
    model: ModelSettings
    calib: CalibSettings
    eval: EvalSettings
    metrics: Mapping[str, dict]
    structures: Mapping[str, dict]
    compensations: Mapping[str, dict]
    mlflow_experiment: str | None  # None: flap-MODEL

    @classmethod
    def of(cls, params: Mapping) -> StudySettings:
        data = _need(params, "data", "params")
        return cls(_need(params, "protocol", "params"), ModelSettings.of(_need(params, "model", "params")),
                   CalibSettings.of(_need(data, "calib", "data")),
                   EvalSettings.of(data, _need(params, "eval", "params")),
                   _need(params, "metrics", "params"), _need(params, "structures", "params"),
                   _need(params, "compensations", "params"), (params.get("mlflow") or {}).get("experiment"))


FLOORS = ("min_groups", "min_channels")  # a count of units, or a share of the layer's in (0, 1)


def structure_options(opts: Mapping, arch=None):
    """structures.StructureOptions of a conf/structure block. A floor given as a fraction in (0, 1) is a share of
    the layer's units (min_channels: 0.25 keeps a quarter of each MLP), so one conf fits every model; without
    `arch` (compose's check) only its range is checked. A key left null takes StructureOptions' default, so the
    defaults are written in one place."""
    from ...structures import StructureOptions  # imports torch: compose pays for it only when it checks

    known = {f.name for f in fields(StructureOptions)}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise FlapError(f"unknown structure option {unknown[0]!r}; known: {', '.join(sorted(known))}")

    def floor(name: str, units: str) -> int:
        v = opts.get(name) or 0
        share = floor_fraction(name, v)
        if share is None:
            return int(v)
        return 0 if arch is None else max(1, round(share * getattr(arch, units)))
    given = {k: v for k, v in opts.items() if v is not None and k not in FLOORS}
    return StructureOptions(floor("min_groups", "num_kv_heads"), floor("min_channels", "intermediate_size"), **given)
