import pytest

from flap_exp.data import Corpus, load_text, tokenize, wikitext_rows
from flap_exp.errors import FlapError
from flap_exp.models import load_model


def test_wikitext_rows_are_the_hugging_face_rows(wikitext_dir):
    rows = wikitext_rows((wikitext_dir / "wiki.test.raw").read_text(encoding="utf-8"))
    assert len(rows) == 4358
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]
    assert all(r == "" or r.endswith("\n") for r in rows)


@pytest.mark.slow
def test_reference_token_count_with_smollm2(wikitext_dir):
    """offline-sources.md: 304,986 tokens and 2,382 windows of 128 for the test split."""
    tok = load_model("smollm2-135m").tokenizer
    ids = tokenize(tok, load_text(Corpus("wikitext2", "test", str(wikitext_dir))).text)
    assert ids.numel() == 304986 and ids.numel() // 128 == 2382


def test_registry_corpora_are_pinned_and_parsed():
    wiki = load_text(Corpus("wiki"))
    assert wiki.identity["source"] == "pypi:exllamav2==0.3.2/wiki.utf8"
    assert "<doc" not in wiki.text and wiki.text.count("\n\n") > 2000
    c4 = load_text(Corpus("c4"))
    assert len(c4.text) > 100_000 and len(c4.identity["sha256"]) == 64


def test_text_file_corpus(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello world\n")
    t = load_text(Corpus("text", path=str(f)))
    assert t.text == "hello world\n" and t.identity["source"].endswith("a.txt")


def test_ptb_directory_joins_stripped_sentences(tmp_path):
    # Mikolov's files: one sentence a line, with a leading space; ptb_text_only's rows are the lines stripped.
    (tmp_path / "ptb.test.txt").write_text(" no it was n't black monday \n but while the new york stock exchange \n")
    t = load_text(Corpus("ptb", "test", str(tmp_path)))
    assert t.text == "no it was n't black monday but while the new york stock exchange"
    assert t.identity["name"] == "ptb" and t.identity["split"] == "test" and len(t.identity["sha256"]) == 64
    with pytest.raises(FlapError, match="ptb.valid.txt"):
        load_text(Corpus("ptb", "validation", str(tmp_path)))
    with pytest.raises(FlapError, match="known: train"):
        load_text(Corpus("ptb", "dev", str(tmp_path)))


def test_concurrent_cache_fill_downloads_once(tmp_path, monkeypatch):
    """Two processes (here threads, each with its own lock file handle) needing one wheel member at once:
    one downloads, the other waits for the lock and finds the entry complete."""
    import threading
    import time
    import zipfile

    from flap_exp import sources
    monkeypatch.setenv("FLAP_EXP_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_download(src, dest):
        calls.append(src.ident)
        time.sleep(0.5)  # both threads are inside fetch_members by now
        wheel = dest / "pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr("pkg/data.txt", "hello")
        return wheel

    monkeypatch.setattr(sources, "_download_wheel", fake_download)
    src = sources.WheelSource("pkg", "1.0", "0" * 64)
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(sources.fetch_members(src, ["pkg/data.txt"])))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and got[0] == got[1] and (got[0] / "pkg" / "data.txt").read_text() == "hello"
    assert calls == ["pkg==1.0"]
