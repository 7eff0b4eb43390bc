"""A process that imports torch, transformers and the library once and forks a stage from it per request.

Started by warm_client.py (`python -m flap_exp.pipeline.running.warm_server SOCKET`), one per interpreter and
environment. Per request: the client's arguments, directory, environment and standard streams (file descriptors
over the socket). A handler process forks the stage, which runs the script as `python stages/X.py` would
(`__main__`, sys.argv, sys.path[0]); the handler returns its exit status, and ends it if the client goes away.
The server refuses (the client then runs the real interpreter) and exits as soon as a file of an imported module
changed since it imported it: a stage never runs code older than what is on disk. It exits after IDLE_SECONDS
without a request. Single-threaded: it forks with no other thread alive.
"""
from __future__ import annotations

import array
import fcntl
import importlib
import io
import json
import os
import runpy
import select
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from .warm_client import send_msg

#: A server ends after this long without a request (it holds the imports: ~0.4 GB resident).
IDLE_SECONDS = 600

#: What the stages import before their clocks start (the heavy part of every stage's startup).
PRELOAD = ("torch", "transformers", "safetensors.torch", "flap_exp.pipeline.steps.stage",
           "flap_exp.pipeline.artifacts.records", "flap_exp.pipeline.steps.calibrate",
           "flap_exp.pipeline.steps.compensate", "flap_exp.pipeline.steps.evaluate", "flap_exp.pipeline.steps.search",
           "flap_exp.pipeline.steps.score", "flap_exp.prune", "flap_exp.ppl")


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    import transformers  # imported here, after the socket is bound (the point of the server is to do it once)
    transformers.AutoModelForCausalLM, transformers.LlamaForCausalLM  # noqa: B018 (the lazy modules' real imports)


def fingerprint() -> dict[str, tuple[int, int]]:
    """(mtime, size) of the file of every imported module."""
    out = {}
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f:
            try:
                st = os.stat(f)
            except OSError:
                continue
            out[f] = (st.st_mtime_ns, st.st_size)
    return out


def stale(prints: dict[str, tuple[int, int]]) -> str | None:
    for f, sig in prints.items():
        try:
            st = os.stat(f)
        except OSError:
            return f
        if (st.st_mtime_ns, st.st_size) != sig:
            return f
    return None


def _stage(req: dict, fds: list[int]) -> None:
    """In the forked stage process: become `python ARGV` in the client's directory, environment and streams."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for i, fd in enumerate(fds[:3]):
        os.dup2(fd, i)
        os.close(fd)
    sys.stdin = io.TextIOWrapper(open(0, "rb", closefd=False))  # noqa: SIM115
    tty = os.isatty(1)
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), line_buffering=tty, write_through=False)  # noqa: SIM115
    sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), line_buffering=True,  # noqa: SIM115
                                  errors="backslashreplace")
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    script = req["argv"][0]
    sys.argv = list(req["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:  # noqa: BLE001 (a stage's crash, reported as python would)
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _handle(conn: socket.socket, req: dict, fds: list[int]) -> None:
    """In the handler process: fork the stage, report its pid and exit status; end it if the client goes."""
    pid = os.fork()
    if pid == 0:
        conn.close()
        _stage(req, fds)
    for fd in fds:
        os.close(fd)
    send_msg(conn, {"ok": True, "pid": pid})
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            send_msg(conn, {"status": code})
            return
        ready, _, _ = select.select([conn], [], [], 0.2)
        if ready and not conn.recv(1, socket.MSG_PEEK):  # the client is gone: so is its stage
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
            return


def _receive(conn: socket.socket) -> tuple[dict | None, list[int]]:
    """The request and the file descriptors sent with it (the client's standard streams)."""
    fds = array.array("i")
    msg, anc, _, _ = conn.recvmsg(4, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if len(msg) < 4:
        return None, list(fds)
    body = conn.recv(int.from_bytes(msg, "big"), socket.MSG_WAITALL)
    return json.loads(body), list(fds)


def serve(path: Path, idle: float = IDLE_SECONDS) -> None:
    lock = open(path.with_suffix(".lock"), "w")  # noqa: SIM115 (held for the server's life)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # another server of this socket is alive (or starting)
    lock.write(f"{os.getpid()}\n")  # who holds it (tests stop it by this pid)
    lock.flush()
    path.unlink(missing_ok=True)  # a server killed without cleaning up left it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))  # before the imports: the next stage waits here instead of starting another server
    listener.listen(16)
    try:
        preload()
        prints = fingerprint()
        last = time.monotonic()
        while time.monotonic() - last < idle:
            _reap()
            if not select.select([listener], [], [], 5.0)[0]:
                continue
            conn, _ = listener.accept()
            last = time.monotonic()
            req, fds = _receive(conn)
            changed = stale(prints)
            if req is None or changed:
                for fd in fds:
                    os.close(fd)
                send_msg(conn, {"ok": False, "why": f"{changed} changed" if changed else "bad request"})
                conn.close()
                if changed:
                    return
                continue
            if os.fork() == 0:
                listener.close()
                try:
                    _handle(conn, req, fds)
                finally:
                    os._exit(0)
            for fd in fds:
                os.close(fd)
            conn.close()
    finally:
        path.unlink(missing_ok=True)  # first: no new client connects to a closing server
        listener.close()


def _reap() -> None:
    """Collect the handlers that finished."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
