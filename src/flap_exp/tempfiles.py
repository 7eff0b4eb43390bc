"""Temporaries that say who owns them, stale ones swept, signals turned into a clean exit, the umask.

Every temporary path flap-exp writes is named `.NAME.tmp-PID-HOST-XXXX` (or `.NAME.old-PID-HOST-XXXX` for
the previous output during a replacement) beside its target. A later run removes those whose process is
gone (kill -9, power loss) and says so; it never touches one whose process is alive, or one made on
another host (a shared filesystem: its pid means nothing here). HOST is a short hash of the hostname.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-")


def temp_prefix(target_name: str, kind: str = "tmp") -> str:
    """The name prefix of a temporary for `target_name` owned by this process."""
    return f".{target_name}.{kind}-{os.getpid()}-{HOST}-"


def pid_alive(pid: int) -> bool:
    """True when a process `pid` exists (ours, or another user's: EPERM still means it exists)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def sweep_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove flap-exp temporaries in `folder` whose owning process (on this host) is gone; one stderr line
    each. An interrupted replacement (`.old-` left, target missing) is put back instead of removed."""
    folder = Path(folder)
    try:
        entries = sorted(folder.iterdir())
    except OSError:  # missing, not a directory, unreadable: nothing of ours to sweep
        return []
    done = []
    for p in entries:
        m = _NAME.match(p.name)
        if not m or m["host"] != HOST or pid_alive(int(m["pid"])):
            continue
        target = folder / m["name"]
        if m["kind"] == "old" and not os.path.lexists(target):
            with contextlib.suppress(OSError):
                p.rename(target)
                print(f"flap-exp: restored {target} from an interrupted replacement (process {m['pid']} is gone)",
                      file=sys.stderr)
                done.append(p)
            continue
        _remove(p)
        print(f"flap-exp: removed stale temporary {p} (process {m['pid']} is gone)", file=sys.stderr)
        done.append(p)
    return done


def umask() -> int:
    """The process umask (read from /proc where possible: os.umask can only read it by setting it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def honour_umask(path: str | os.PathLike, is_dir: bool) -> None:
    """mkdtemp/mkstemp create 0700/0600; give the path the mode a plain mkdir/open would have."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~umask())


def honour_umask_tree(root: str | os.PathLike[str]) -> None:
    """Give `root` and everything under it the modes the umask implies (some writers, e.g. safetensors,
    create 0600 files regardless); executables keep their x bits."""
    mask = umask()
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for f in files:
            p = os.path.join(folder, f)
            if not os.path.islink(p):
                os.chmod(p, (0o777 if os.stat(p).st_mode & 0o100 else 0o666) & ~mask)


class Terminated(SystemExit):
    """SIGTERM/SIGINT as an exception: `except BaseException` cleanups run, the exit status is 128+signal."""

    code: int  # SystemExit's, always an int here

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


@contextlib.contextmanager
def signals_as_exit(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Within the block, the first SIGTERM/SIGINT raises Terminated (later ones are ignored so that the
    cleanup it triggers is not cut short); the previous handlers come back on exit."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return

    def handler(signum, frame):
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
