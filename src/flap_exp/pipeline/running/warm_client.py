"""`python` for DVC's stage commands, with the imports already done: the client of warm_server.py.

`make run` puts a `python` first on PATH that runs this file (standard library only, `python -I -S`: ~20 ms). A
command `python stages/X.py ARGS` is handed to a warm server of this environment, which forks a process that
already imported torch, transformers and the library (1.2-4 s per stage otherwise), runs the script there with
this process's arguments, directory, environment and standard streams, and reports its exit status. Anything
else (`python -m ...`), or no server answering, runs the real interpreter exactly as asked (exec); the first
stage also starts a server for the next ones. Signals (DVC's Ctrl-C, SIGTERM) are passed to the stage. Off:
FLAP_WARM=0 (or `make run WARM=0`).
"""
from __future__ import annotations

import array
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

#: Variables that differ between the stages of one `dvc repro` and that no import reads: a server is shared by
#: every environment equal but for these (DVC_STAGE names the stage; the shell's own bookkeeping).
VOLATILE = frozenset({"DVC_STAGE", "_", "PWD", "OLDPWD", "SHLVL"})


def socket_path(python: str, env: dict) -> Path:
    """One server per interpreter and environment (the imports it did depend on both)."""
    key = json.dumps([python, sorted((k, v) for k, v in env.items() if k not in VOLATILE)])
    folder = Path(env.get("FLAP_WARM_DIR") or f"/tmp/flap-exp-warm-{os.getuid()}")
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.sock"


def is_stage(args: list[str]) -> bool:
    return len(args) >= 1 and args[0].endswith(".py") and Path(args[0]).parent.name == "stages"


def send_msg(conn: socket.socket, obj: dict, fds: tuple[int, ...] = ()) -> None:
    data = json.dumps(obj).encode()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    conn.sendmsg([struct.pack("!I", len(data)) + data], anc)


def recv_msg(conn: socket.socket) -> dict | None:
    """One message, or None when the other side closed."""
    head = _recv_exact(conn, 4)
    if head is None:
        return None
    body = _recv_exact(conn, struct.unpack("!I", head)[0])
    return None if body is None else json.loads(body)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            return None
        buf += part
    return buf


def _start_server(python: str, path: Path) -> None:
    """A server for the next stages, detached (its own session, no streams of ours)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = open(path.with_suffix(".log"), "ab")  # noqa: SIM115 (handed to the child)
    subprocess.Popen([python, "-m", "flap_exp.pipeline.running.warm_server", str(path)], stdin=subprocess.DEVNULL,
                     stdout=log, stderr=log, start_new_session=True, close_fds=True)


def _run_warm(python: str, args: list[str]) -> int | None:
    """The stage's exit status from a warm server, or None when no server took it (nothing ran)."""
    env = dict(os.environ)
    path = socket_path(python, env)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        if env.get("FLAP_WARM_START", "1") != "0":
            _start_server(python, path)
        return None
    with conn:
        send_msg(conn, {"argv": args, "cwd": os.getcwd(), "env": env}, (0, 1, 2))
        reply = recv_msg(conn)
        if reply is None or not reply.get("ok"):
            return None  # a stale or refusing server: nothing ran
        pid = int(reply["pid"])
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda s, _f: os.kill(pid, s))
        end = recv_msg(conn)
    if end is None:
        print(f"flap-exp: error: the warm stage server lost {args[0]} (pid {pid})", file=sys.stderr)
        return 1
    return int(end["status"])


def install(folder: Path, python: str = sys.executable, client: Path = Path(__file__)) -> Path:
    """Write FOLDER/python, the `python` to put first on PATH (the Makefile's .venv/warm/python): this file run
    by `python` (the real interpreter: FLAP_WARM_PYTHON) with -I -S (no site, ~70 ms)."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "python"
    shim.write_text(f"#!/bin/sh\n# python for the stages of make run: {client.resolve()}\n"
                    f'FLAP_WARM_PYTHON={python} exec {python} -I -S {client.resolve()} "$@"\n')
    shim.chmod(0o755)
    return shim


def stop_servers(folder: Path) -> None:
    """End the servers whose sockets are in `folder` (each holds its lock file, with its pid in it)."""
    for lock in folder.glob("*.lock"):
        try:
            os.kill(int(lock.read_text().split()[0]), signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            pass  # gone already, or still starting (it has not written its pid: it ends when idle)


def main() -> None:
    if "FLAP_WARM_PYTHON" not in os.environ:  # python -m flap_exp.pipeline.running.warm_client --install FOLDER
        if len(sys.argv) != 3 or sys.argv[1] != "--install":
            sys.exit("usage: python -m flap_exp.pipeline.running.warm_client --install FOLDER")
        install(Path(sys.argv[2]))
        return
    python, args = os.environ["FLAP_WARM_PYTHON"], sys.argv[1:]
    if os.environ.get("FLAP_WARM", "1") != "0" and is_stage(args):
        status = _run_warm(python, args)
        if status is not None:
            if status < 0:  # killed by a signal: end the same way, as the shell expects
                signal.signal(-status, signal.SIG_DFL)
                os.kill(os.getpid(), -status)
            sys.exit(status)
    os.execv(python, [python, *args])


if __name__ == "__main__":
    main()
