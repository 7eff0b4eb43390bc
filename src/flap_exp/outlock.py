"""One writer per output: a lock file beside the target, created with O_EXCL, naming its holder (torch-free).

`.NAME.lock` beside `NAME` records the holder's pid, host and start time. A second run that wants the same
target fails at once in one line naming the holder. A lock left by a process that is gone (kill -9) on this
host is taken over, with a stderr line; one from another host (a shared filesystem) is never guessed about.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import FlapError
from .tempfiles import pid_alive


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(os.path.abspath(target))
    return target.with_name(f".{target.name}.lock")


def _holder(lock: Path) -> dict:
    try:
        h = json.loads(lock.read_text(encoding="utf-8"))
        return h if isinstance(h, dict) else {}
    except (OSError, ValueError):
        return {}  # being written right now, or damaged: reported as an unknown holder


def _create(lock: Path) -> bool:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                   time.gmtime())}
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    except OSError as err:
        raise FlapError(f"cannot create the lock {lock} ({err.strerror})") from None
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(me))
    return True


def acquire(target: str | os.PathLike, what: str = "--out") -> Path:
    """Create the lock of `target` or raise a one-line FlapError naming who holds it."""
    lock = lock_path(target)
    for _ in range(2):  # a second try after taking over a dead holder's lock
        if _create(lock):
            return lock
        h = _holder(lock)
        pid, host = h.get("pid"), h.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            print(f"flap-exp: took over the stale lock {lock} (process {pid} is gone)", file=sys.stderr)
            continue
        who = f"process {pid} on {host} since {h.get('since')}" if pid else "another process"
        raise FlapError(f"{what} {target} is being written by {who} (lock {lock}); wait for it to finish, or "
                        "remove the lock if that process is gone")
    raise FlapError(f"{what} {target}: could not take the lock {lock} (another run keeps taking it)")


def release(lock: Path) -> None:
    """Remove the lock if it is still ours."""
    if _holder(lock).get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; the directories it created, deepest first."""
    made = []
    while not os.path.lexists(folder) and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    for d in reversed(made):
        try:
            d.mkdir()
        except FileExistsError:
            pass
        except OSError as err:
            raise FlapError(f"cannot create {d} ({err.strerror})") from None
    return made


@contextlib.contextmanager
def out_lock(target: str | os.PathLike, what: str = "--out") -> Iterator[Path]:
    """Hold the lock of `target` (its missing parent directories created, and removed again if still empty
    at the end, so a failed run leaves no trace)."""
    made = _make_parents(lock_path(target).parent)
    try:
        lock = acquire(target, what)
        try:
            yield lock
        finally:
            release(lock)
    finally:
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()  # only while empty: a finished output keeps its parents
