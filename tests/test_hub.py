"""`flap-exp ppl DIR` offline: the Hub is checked once and fast, and a corpus only the Hub has fails in one
line naming --data-path (and FLAP_EXP_WIKITEXT2), without the datasets library's retries and without
another corpus silently put in its place."""
import socket
import time

import pytest

from flap_exp import hub


@pytest.fixture(autouse=True)
def fresh_check(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    check = hub.hub_unreachable
    check.cache_clear()
    yield
    check.cache_clear()  # the real one (a test may have replaced the module's attribute)


def test_offline_variable_is_respected_without_touching_the_network(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the network was tried although HF_HUB_OFFLINE is set")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_unreachable() == "HF_HUB_OFFLINE is set"


def test_a_hanging_connection_is_given_up_after_the_timeout_and_checked_once(monkeypatch):
    calls = []

    def hang(address, timeout=None):
        calls.append(address)
        time.sleep(5)
        raise OSError("unreachable")
    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(hub, "HUB_TIMEOUT", 0.2)
    t = time.perf_counter()
    why = hub.hub_unreachable()
    assert time.perf_counter() - t < 1.0 and why == "huggingface.co:443: no answer in 0.2 s"
    t = time.perf_counter()
    assert hub.hub_unreachable() == why and time.perf_counter() - t < 0.01 and calls == [("huggingface.co", 443)]


def test_the_check_connects_to_the_proxy_or_endpoint_configured(monkeypatch):
    seen = []
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: seen.append(address) or _Closed())
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080")
    assert hub.hub_unreachable() is None and seen == [("mirror.example", 8080)]
    hub.hub_unreachable.cache_clear()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub.hub_unreachable() is None and seen[-1] == ("proxy.example", 3128)


class _Closed:
    def close(self):
        pass


def test_the_real_check_answers_within_its_timeout_here():
    """Whatever the network (offline here: name resolution fails at once), one check costs at most ~2 s."""
    t = time.perf_counter()
    hub.hub_unreachable()
    assert time.perf_counter() - t < hub.HUB_TIMEOUT + 1.0


def test_ppl_with_the_default_corpus_fails_fast_in_one_line_naming_data_path(monkeypatch, capsys):
    """`flap-exp ppl DIR` exactly as the README shows it, outside make (no FLAP_EXP_WIKITEXT2), Hub unreachable:
    one line, exit 2, well under a second, naming --data-path and the variable; datasets is never asked."""
    import datasets

    from flap_exp.cli import main
    monkeypatch.delenv("FLAP_EXP_WIKITEXT2", raising=False)
    monkeypatch.setattr(hub, "hub_unreachable", lambda: "huggingface.co:443: Name or service not known")

    def no_hub(*a, **k):
        raise AssertionError("datasets.load_dataset was called although the Hub is known to be unreachable")
    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    t = time.perf_counter()
    assert main(["ppl", "smollm2-135m", "--device", "cpu"]) == 2
    elapsed = time.perf_counter() - t
    err = capsys.readouterr().err
    assert elapsed < 1.0 and err.count("\n") == 1 and err.startswith("flap-exp: error: WikiText-2 ")
    assert "--data-path DIR" in err and "FLAP_EXP_WIKITEXT2=DIR" in err and "wiki.test.raw" in err
    assert "unreachable (huggingface.co:443: Name or service not known)" in err and "--data wiki" in err


def test_a_local_wikitext_directory_never_asks_the_hub(monkeypatch, tmp_path):
    from flap_exp.data import Corpus, load_text
    monkeypatch.setattr(hub, "hub_unreachable", lambda: pytest.fail("the Hub was checked for a local directory"))
    (tmp_path / "wiki.test.raw").write_text(" \n = A =\n \n text .\n", encoding="utf-8")
    text = load_text(Corpus("wikitext2", "test", str(tmp_path)))
    assert "= A =" in text.text and text.identity["source"].startswith("file:")
