"""pipeline/running/fast_lock.py: `dvc` with dvc.lock read and written by ruamel's C loader and emitter. DVC must
read back the data it would have written itself, and plain `dvc` and the fast entry must agree on what is up to
date in one repository, in either order."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flap_exp.pipeline.running import fast_lock

from helpers.pipeline import ran, sh

pytestmark = pytest.mark.pipeline

DVC = [sys.executable, "-m", "dvc"]
FAST = list(fast_lock.DVC)

LOCK_LIKE = {
    "schema": "2.0",
    "stages": {
        "search@wifv-al_am-0.5": {
            # longer than 80 columns: DVC folds it, the fast writer keeps it on one line
            "cmd": "python stages/search.py wifv-al_am-0.5-wiki-128 wifv al_am 0.5 --input "
                   "results/standardize/wiki-128/wifv.safetensors",
            "deps": [{"path": "results/code/search.txt", "hash": "md5", "md5": "0" * 32, "size": 5822}],
            "params": {"params.yaml": {"data.calib.path": None, "ratio": 0.5, "damping": 1e-05,
                                       "flags": [True, False, None], "empty": {}, "word": "yes",
                                       "colon": "a: b", "unicode": "ø", "big": 2 ** 40}},
            "outs": [{"path": "results/search/x/selection.json", "hash": "md5", "md5": "f" * 32,
                      "size": 1, "nfiles": None}],
        },
    },
}


def test_dvc_reads_back_what_it_would_have_written():
    import io

    from dvc.utils.serialize._yaml import _dump, parse_yaml, parse_yaml_for_update

    ours = fast_lock.dumps(LOCK_LIKE)
    theirs = io.StringIO()
    _dump(LOCK_LIKE, theirs)
    for parse in (parse_yaml, parse_yaml_for_update):
        assert parse(ours, "dvc.lock") == parse(theirs.getvalue(), "dvc.lock") == LOCK_LIKE
    lines = ours.splitlines()
    assert not [line for line in lines if line.endswith(" ")]  # a null is `key:`, as DVC writes it
    assert "        data.calib.path:" in lines and "      - md5: " not in ours
    assert list(fast_lock._parse(ours, "dvc.lock")["stages"]["search@wifv-al_am-0.5"]) == [
        "cmd", "deps", "params", "outs"]  # insertion order kept, not sorted


def test_a_corrupt_lock_is_dvcs_one_line_error():
    from dvc.utils.serialize._yaml import YAMLFileCorruptedError

    with pytest.raises(YAMLFileCorruptedError):
        fast_lock._parse("stages: [unclosed", "dvc.lock")


DVC_YAML = """stages:
  first:
    cmd: python -c "import yaml; open('a.txt', 'w').write(str(yaml.safe_load(open('params.yaml'))['n']))"
    params: [n, maybe]
    outs: [a.txt]
  second:
    foreach: [x, y]
    do:
      cmd: python -c "open('b-${item}.txt', 'w').write(open('a.txt').read() + '${item}')" && echo longer than 80
      deps: [a.txt]
      outs:
        - b-${item}.txt
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q")
    sh(repo, *DVC, "init", "-q")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text("n: 1\nmaybe:\n")
    return repo


def test_plain_dvc_and_the_fast_entry_agree_on_one_repository(repo: Path):
    assert ran(sh(repo, *FAST, "repro")) == {"first", "second@x", "second@y"}
    fast = (repo / "dvc.lock").read_text()
    assert "Data and pipelines are up to date." in sh(repo, *DVC, "status").stdout
    assert ran(sh(repo, *DVC, "repro")) == set()  # plain dvc: nothing to do after the fast entry
    (repo / "params.yaml").write_text("n: 2\nmaybe:\n")
    assert ran(sh(repo, *DVC, "repro")) == {"first", "second@x", "second@y"}
    plain = (repo / "dvc.lock").read_text()
    long_cmd = "    cmd: python -c \"open('b-x.txt', 'w').write(open('a.txt').read() + 'x')\" && echo longer than 80\n"
    assert long_cmd in fast and long_cmd not in plain  # each writer wrote its own lock (DVC folds the command)
    assert ran(sh(repo, *FAST, "repro")) == set()  # and the fast entry after plain dvc
    (repo / "params.yaml").write_text("n: 1\nmaybe:\n")
    sh(repo, *FAST, "repro")  # n back to 1: the lock is the first run's, byte for byte
    assert (repo / "dvc.lock").read_text() == fast
    from dvc.utils.serialize._yaml import parse_yaml

    # the two writers' locks differ only where the inputs did (n and the outputs' hashes)
    a, b = parse_yaml(fast, "x")["stages"], parse_yaml(plain, "x")["stages"]
    assert a.keys() == b.keys() and a["first"]["params"]["params.yaml"] == {"n": 1, "maybe": None}
    assert b["first"]["params"]["params.yaml"] == {"n": 2, "maybe": None}
    assert {k: v["cmd"] for k, v in a.items()} == {k: v["cmd"] for k, v in b.items()}
