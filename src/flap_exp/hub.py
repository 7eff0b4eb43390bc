"""Whether the Hugging Face Hub can be reached, checked once per process and fast, so that a corpus that only
the Hub has fails in one line instead of after the datasets library's retries (~25 s offline)."""
from __future__ import annotations

import functools
import os
import socket
import threading
import urllib.parse

#: Seconds the check waits for name resolution + a TCP connect: the Hub answers in well under a second where it
#: is reachable at all, and a newcomer offline should not wait longer than this for the one-line error.
HUB_TIMEOUT = 2.0

_TRUE = ("1", "true", "yes", "on")


def _offline_env() -> str | None:
    """The environment variable that declares the Hub offline (huggingface_hub's and datasets' own), if set."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return var
    return None


def _target() -> tuple[str, int]:
    """(host, port) the check connects to: an HTTPS proxy when one is configured (the Hub is reached through
    it, and a direct connect would fail behind it), else the Hub's endpoint (HF_ENDPOINT, default huggingface.co)."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    parts = urllib.parse.urlsplit(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    default = 443 if parts.scheme == "https" else 80
    try:
        port = parts.port or default
    except ValueError:
        port = default
    return parts.hostname or "huggingface.co", port


def _connect(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection opens within `timeout` (resolution included), else why not. Resolution runs
    in a daemon thread: getaddrinfo takes no timeout of its own and can hang on a broken resolver."""
    result: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as err:
            result.append(err.strerror or type(err).__name__)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else f"no answer in {timeout:g} s"


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """None when the Hub looks reachable, else a short reason ("HF_HUB_OFFLINE is set", "huggingface.co:443:
    Name or service not known"). Checked once per process (cached)."""
    var = _offline_env()
    if var:
        return f"{var} is set"
    host, port = _target()
    why = _connect(host, port, HUB_TIMEOUT)
    return None if why is None else f"{host}:{port}: {why}"
