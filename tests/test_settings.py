"""pipeline/study/settings.py: the composed params as typed frozen settings, built once; every default from conf/."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from flap_exp.errors import FlapError
from flap_exp.pipeline.study.compose import compose as compose_text
from flap_exp.pipeline.study.settings import CorpusSettings, StudySettings, structure_options

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str], conf: Path) -> dict:
    return yaml.safe_load(compose_text(overrides, conf))


def test_composed_params_become_typed_frozen_settings():
    params = compose(["data.calib.batch_size=4", "+data.eval_extra.c4={corpus: c4}"], CONF)
    s = StudySettings.of(params)
    assert s.calib.batch_size == 4 and s.calib.nsamples == params["data"]["calib"]["nsamples"]
    assert s.model.name == "smollm2-135m" and s.model.stream is False and s.protocol == "quick"
    assert s.eval.extra == {"c4": CorpusSettings("c4", "test", None)}  # a corpus written whole takes Corpus's defaults
    assert s.eval.zeroshot is not None and s.eval.zeroshot.tasks[0] == "boolq"
    assert s.eval.throughput is not None and s.eval.throughput.prefill_shapes == ((1, 128), (8, 128))
    assert s.calib.corpus_for("c4") == CorpusSettings("c4", "train", None)  # another calibration corpus: train
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.calib.batch_size = 8  # type: ignore[misc]


def test_a_params_file_not_from_compose_is_one_line():
    params = compose([], CONF)
    del params["data"]["calib"]["batch_size"]
    with pytest.raises(FlapError, match=r"^params.yaml has no data.calib.batch_size: compose it again"):
        StudySettings.of(params)


def test_structure_options_defaults_in_one_place_and_unknown_keys_refused():
    assert structure_options({"obs_batch": None, "min_channels": 0.25}).obs_batch == 1  # null: the dataclass default
    with pytest.raises(FlapError, match="unknown structure option 'obs_bach'"):
        structure_options({"obs_bach": 8})
