"""Write artifacts to a temporary sibling path and rename, so a crash never leaves a half-written one.

Temporaries carry the owning pid (see tempfiles.py): a later run sweeps those of dead processes. Outputs
get the user's umask (mkdtemp/mkstemp alone would make them 0700/0600).
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import FlapError
from .tempfiles import honour_umask, honour_umask_tree, sweep_stale, temp_prefix

# How writers that are not Python's own (safetensors' Rust writer: SafetensorError) report a full disk.
_FULL = {errno.ENOSPC: ("No space left on device", "StorageFull", "os error 28"),
         errno.EDQUOT: ("Disk quota exceeded", "QuotaExceeded", "os error 122")}


def _full(err: BaseException) -> str | None:
    """The strerror of a full disk or quota behind `err`, else None."""
    if isinstance(err, OSError) and err.errno in _FULL:
        return err.strerror or os.strerror(err.errno)
    text = str(err)
    return next((os.strerror(code) for code, marks in _FULL.items() if any(m in text for m in marks)), None)


def _refuse_full(err: BaseException, target: Path) -> None:
    """A full disk (or quota) while writing `target` becomes one line; its temporary is already removed."""
    why = _full(err)
    if why:
        raise FlapError(f"{target}: the disk filled up while writing it ({why}); nothing was written "
                        "and the temporaries are removed: free some space and run again") from None


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `target`; on success it replaces `target` whole.
    Callers decide whether `target` may be replaced (validate.check_out_dir for user paths)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), dir=target.parent))
    try:
        honour_umask(tmp, is_dir=True)
        yield tmp
        honour_umask_tree(tmp)
        if target.exists():
            # a pid-named aside: a kill -9 between the renames leaves a name the next run can put back
            old = target.with_name(temp_prefix(target.name, "old") + secrets.token_hex(4))
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _refuse_full(err, target)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it is renamed onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target.parent)
    fd, name = tempfile.mkstemp(prefix=temp_prefix(target.name), dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        honour_umask(tmp, is_dir=False)
        yield tmp
        os.replace(tmp, target)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        _refuse_full(err, target)
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def scratch_dir(folder: str | os.PathLike, name: str) -> Iterator[Path]:
    """A pid-named working directory in `folder` (e.g. a download), always removed afterwards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sweep_stale(folder)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(name), dir=folder))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
