"""The MLflow tracking store: its URI ($MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project root) and
`preflight`, which reaches it cheaply and fails fast, before any expensive stage (calibrate and evaluate call
it first). Apart from tracking.py so that those stages do not run (nor depend on) the runs' and figures' code.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ...errors import FlapError

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
_SCHEMES = "http(s)://host:port, sqlite:///file.db, file:///dir, postgresql://, mysql://, mssql://, databricks"


def _http(uri: str) -> None:
    """An MLflow server: /health answers 200 and the REST API lists experiments (not just any web server)."""
    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            if r.status != 200:
                raise FlapError(f"MLflow server {uri} answered {r.status} on /health")
        with urllib.request.urlopen(base + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=10) as r:
            json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as err:
        raise FlapError(f"{uri} does not answer as an MLflow tracking server (HTTP {err.code} on "
                        f"{urllib.parse.urlsplit(err.url or base).path}); check MLFLOW_TRACKING_URI") from None
    except (urllib.error.URLError, OSError) as err:
        raise FlapError(f"MLflow tracking server {uri} is unreachable ({getattr(err, 'reason', err)}); "
                        "start it (make mlflow-ui) or set MLFLOW_TRACKING_URI") from None
    except ValueError:
        raise FlapError(f"{uri} does not answer as an MLflow tracking server (not JSON); "
                        "check MLFLOW_TRACKING_URI") from None


def _sqlite(uri: str) -> None:
    if not uri.startswith("sqlite:///") or uri == "sqlite:///":
        raise FlapError(f"malformed MLFLOW_TRACKING_URI={uri!r}: a SQLite store is sqlite:///relative.db "
                        "or sqlite:////absolute/path.db")
    db = Path(uri[len("sqlite:///"):])
    folder = db.resolve().parent
    if not (folder.is_dir() and os.access(folder, os.W_OK)):
        raise FlapError(f"MLflow database folder {folder} is missing or not writable (MLFLOW_TRACKING_URI={uri})")
    if db.exists():
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True, timeout=5)) as con:
                con.execute("PRAGMA schema_version").fetchone()
        except sqlite3.Error as err:
            raise FlapError(f"MLflow database {db} is not a usable SQLite database ({err}); "
                            f"MLFLOW_TRACKING_URI={uri}") from None


def _file(uri: str, parts) -> None:
    folder = Path(urllib.request.url2pathname(parts.path))
    if not parts.path or parts.netloc not in ("", "localhost"):
        raise FlapError(f"malformed MLFLOW_TRACKING_URI={uri!r}: a file store is file:///absolute/dir")
    if folder.exists() and not folder.is_dir():
        raise FlapError(f"MLflow file store {folder} is a file, not a directory (MLFLOW_TRACKING_URI={uri})")
    parent = folder if folder.exists() else folder.parent
    if not (parent.is_dir() and os.access(parent, os.W_OK)):
        raise FlapError(f"MLflow file store {folder} cannot be written (MLFLOW_TRACKING_URI={uri})")


def _open(uri: str) -> None:
    """Open the store as `track` will (MlflowClient builds it at once): MLflow's own refusals, e.g. its file
    store in maintenance mode without MLFLOW_ALLOW_FILE_STORE=true, come here as one line, before any stage."""
    try:
        from mlflow.tracking import MlflowClient  # mlflow: slow to import, only when a store is opened
        MlflowClient(uri)
    except Exception as err:  # noqa: BLE001  (MlflowException and whatever the store's constructor raises)
        text = " ".join(str(err).split()) or type(err).__name__
        first = text.split(". ")[0].rstrip(".")
        hint = "; set MLFLOW_ALLOW_FILE_STORE=true or use sqlite:///mlflow.db" if "MLFLOW_ALLOW_FILE_STORE" in text \
            else ""
        raise FlapError(f"MLflow cannot open the store {uri}: {first}{hint}") from None


def _database(uri: str, parts) -> None:
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host:
        raise FlapError(f"malformed MLFLOW_TRACKING_URI={uri!r}: no host")
    scheme = parts.scheme.split("+")[0]
    try:
        socket.create_connection((host, port or _DB_PORTS[scheme]), timeout=5).close()
    except OSError as err:
        raise FlapError(f"MLflow database {host}:{port or _DB_PORTS[scheme]} is unreachable "
                        f"({err.strerror or err}); check MLFLOW_TRACKING_URI") from None


def preflight(uri: str | None = None) -> str:
    """Reach the tracking store named by `uri` (or MLFLOW_TRACKING_URI) cheaply; a one-line FlapError when
    it is malformed or cannot be reached. databricks needs credentials and is left to MLflow."""
    uri = (uri or tracking_uri()).strip()
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise FlapError(f"malformed MLFLOW_TRACKING_URI={uri!r}: no host; e.g. http://127.0.0.1:5000")
        _http(uri)
    elif scheme == "sqlite":
        _sqlite(uri)
    elif scheme == "file":
        _file(uri, parts)
        _open(uri)
    elif scheme.split("+")[0] in _DB_PORTS:
        _database(uri, parts)
    elif scheme != "databricks":
        hint = f"; did you mean http://{uri}?" if scheme and parts.path.isdigit() else ""
        raise FlapError(f"malformed MLFLOW_TRACKING_URI={uri!r}: unknown scheme {scheme or '(none)'!r}; "
                        f"use {_SCHEMES}{hint}")
    return uri
