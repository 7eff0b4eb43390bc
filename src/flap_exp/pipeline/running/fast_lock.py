"""`dvc` with a faster dvc.lock writer: the same command line, the same dvc.lock contents.

After every stage DVC rewrites the whole dvc.lock: it parses it with ruamel's pure-Python round-trip loader (kept
for comments and layout, which a generated lock file does not have) and dumps it again. On the quick study's lock
(~365 KB, ~280 stages) that is ~1.7 s of every stage's time outside its own clock, paid 213 times a study (measured
in docs/development.md). Here dvc.lock alone is read by ruamel's C loader and written by its C emitter in DVC's
layout (keys in insertion order, a null as an empty value), except that a long command stays on one line where
DVC folds it at 80 columns: DVC reads back the same data (tests/test_fast_lock.py), and a plain `dvc` after this
one (or before it) sees nothing changed. dvc.yaml, params and everything else go through DVC's own code.

`make run` calls `python -m flap_exp.pipeline.running.fast_lock repro`; a plain `dvc repro` gives the same results,
only slower per stage.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, TextIO

LOCK_NAME = "dvc.lock"
# the command line of this entry point, for the runners that start `dvc repro` themselves
DVC = (sys.executable, "-m", "flap_exp.pipeline.running.fast_lock")
# The C emitter writes `key: ` / `- ` for an empty (null) value where DVC's round-trip dumper writes `key:` / `-`.
_TRAILING_SPACE = re.compile(r"(:|^\s*-) $", re.M)
# libyaml and ruamel's Python emitter fold a long plain scalar at different spaces; not folding at all is simplest
# to read back (and to grep), and the YAML means the same.
_NO_FOLD = 1 << 20


@functools.cache
def _representer() -> type:
    from ruamel.yaml.representer import SafeRepresenter  # deferred on purpose: only DVC's entry point needs it

    class LockRepresenter(SafeRepresenter):
        """A subclass, so that ruamel's class-wide representer table is not changed for the rest of DVC."""

    LockRepresenter.add_representer(OrderedDict, SafeRepresenter.represent_dict)
    LockRepresenter.add_representer(
        type(None), lambda rep, _value: rep.represent_scalar("tag:yaml.org,2002:null", ""))
    return LockRepresenter


def _yaml() -> Any:
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=False)
    yaml.Representer = _representer()
    yaml.default_flow_style = False
    yaml.width = _NO_FOLD
    yaml.representer.sort_base_mapping_type_on_output = False  # DVC keeps insertion order
    return yaml


def dumps(data: Any) -> str:
    """`data` as DVC's dvc.lock writer lays it out."""
    stream = io.StringIO()
    _yaml().dump(data, stream)
    return _TRAILING_SPACE.sub(r"\1", stream.getvalue())


def _parse(text: Any, path: Any) -> dict[str, Any]:
    # deferred on purpose, as every DVC import here: the runners import DVC only to start it
    from dvc.utils.serialize._yaml import YAMLFileCorruptedError
    from funcy import reraise
    from ruamel.yaml import YAMLError

    with reraise(YAMLError, YAMLFileCorruptedError(path)):
        return _yaml().load(text) or {}


def _dump(data: Any, stream: TextIO) -> None:
    stream.write(dumps(data))


def install() -> None:
    """Route DVC's read-modify-write of dvc.lock (and only of it) through the C loader and emitter."""
    import dvc.dvcfile
    from dvc.utils.serialize._common import _modify_data

    original = dvc.dvcfile.modify_yaml

    @contextlib.contextmanager
    def modify_yaml(path: Any, fs: Any = None) -> Iterator[dict[str, Any]]:
        if os.path.basename(os.fspath(path)) != LOCK_NAME:
            with original(path, fs=fs) as data:
                yield data
            return
        with _modify_data(path, _parse, _dump, fs=fs) as data:
            yield data

    dvc.dvcfile.modify_yaml = modify_yaml


def main(argv: list[str] | None = None) -> int:
    install()
    from dvc.cli import main as dvc_main

    return int(dvc_main(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
