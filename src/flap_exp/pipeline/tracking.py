"""MLflow: one run per evaluated cell and one for the dense model, in one experiment per model.

Tracking URI: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project root. `preflight` fails
fast (before any expensive stage) when it is unreachable. Runs are keyed by the tag `flap.cell`:
re-logging an unchanged cell keeps its run, a changed one replaces it (never two active runs per cell).
`python -m flap_exp.pipeline.tracking --check` runs the preflight alone.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import FlapError
from .io import sha256_text

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
    import sqlite3
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
        from mlflow.tracking import MlflowClient
        MlflowClient(uri)
    except Exception as err:  # noqa: BLE001  (MlflowException and whatever the store's constructor raises)
        text = " ".join(str(err).split()) or type(err).__name__
        first = text.split(". ")[0].rstrip(".")
        hint = "; set MLFLOW_ALLOW_FILE_STORE=true or use sqlite:///mlflow.db" if "MLFLOW_ALLOW_FILE_STORE" in text \
            else ""
        raise FlapError(f"MLflow cannot open the store {uri}: {first}{hint}") from None


def _database(uri: str, parts) -> None:
    import socket
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


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except OSError:
        return None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif v is not None and not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def run_params(cell: dict | None, params: dict, record: dict, manifests: dict) -> dict:
    """The run's params: the cell (method, structure, ratio, compensation and its options), its calibration
    (corpus, N, T, seed, sha256), the evaluation protocol, versions and the git commit."""
    p = {"model": params["model"]["name"], "model.weights_sha256": record["model"]["weights_sha256"],
         "protocol": params.get("protocol"),
         "eval.corpus": params["data"]["eval"]["corpus"], "eval.sha256": record["eval"]["text_sha256"],
         "eval.max_windows": params["eval"].get("max_windows"), "eval.seqlen": params["eval"]["seqlen"],
         "git_commit": _git_commit(), "dvc_exp_name": os.environ.get("DVC_EXP_NAME"),
         **{f"version.{k}": v for k, v in record["versions"].items()}}
    manifest = manifests.get((cell or {}).get("calib"))
    if manifest is not None and cell is not None:
        p.update({"calib": cell["calib"], "calib.corpus": manifest["data"].get("name"),
                  "calib.sha256": manifest["data"]["text_sha256"], "N": manifest["nsamples"], "T": manifest["seqlen"],
                  "seed": manifest["seed"], "dtype": manifest["dtype"]})
    if cell is not None:
        p.update({"cell": cell["key"], "metric": cell["metric"], "structure": cell["structure"],
                  "ratio": cell["ratio"], "compensation": cell["compensation"],
                  "compensation.method": cell.get("compensation_method")})
        p.update(_flat(cell.get("compensation_options") or {}, f"compensation.{cell['compensation']}."))
        p.update(_flat(params["metrics"][cell["metric"]], f"metric.{cell['metric']}."))
        p.update(_flat(params["structures"][cell["structure"]], f"structure.{cell['structure']}."))
    else:
        p.update({"cell": "dense", "metric": "dense", "structure": "dense", "ratio": 0.0, "compensation": "none"})
    return {k: v for k, v in p.items() if v is not None}


def run_metrics(m: dict, usage: dict) -> dict:
    """Evaluation numbers with their noise (the perplexity's 95% interval over windows and its window count,
    zero-shot standard errors and document counts), plus wall time / peak memory of every stage behind the
    cell; rounded per quantity (rounding.py), as in reports/metrics.json."""
    from .noise import noise_metrics, task_stderr
    from .rounding import rounded
    out = {k: float(m[k]) for k in ("perplexity", "achieved_ratio", "params_kept", "model_params") if k in m}
    out |= noise_metrics(m)
    for stage, u in usage.items():
        out[f"{stage}_seconds"], out[f"{stage}_peak_rss_mib"] = u["seconds"], u["peak_rss_mib"]
    if m.get("zeroshot_avg") is not None:
        out["zeroshot_avg"] = m["zeroshot_avg"]
        for task, t in m["zeroshot"]["tasks"].items():
            out[f"zeroshot.{task}"] = t["score"]
            out |= {f"zeroshot.{task}.{k}": t[k] for k in ("acc", "acc_norm", "n_docs") if t.get(k) is not None}
            se = task_stderr(t)
            if se is not None:
                out[f"zeroshot.{task}.stderr"] = se
    for name, v in (m.get("perplexity_extra") or {}).items():
        out[f"perplexity.{name}"] = v
    for w, v in (m.get("throughput_tokens_per_s") or {}).items():
        out[f"tokens_per_s.{w}"] = v
    for w, v in (m.get("speedup") or {}).items():
        out[f"speedup.{w}"] = v
    return {k: rounded(k, v) for k, v in out.items()}


def cell_usage(row: dict, root: str | Path = ".") -> dict:
    """The recorded usage of the stages behind one cell (results/usage/*.json side files), by stage.
    Missing when a stage's outputs were restored from DVC's cache rather than computed here."""
    from . import paths
    key = row.get("key", paths.DENSE)
    names = {"evaluate": f"evaluate@{key}"}
    if row.get("cell"):
        names |= {"search": f"search@{row['cell']}", "compensate": f"compensate@{key}"}
        if row.get("calib"):
            names["calibrate"] = f"calibrate@{row['calib']}"
    names |= {m: f"{m}@{key}" for m in row.get("measures", [])}
    out = {}
    for stage, name in names.items():
        f = Path(root) / paths.usage(name)
        if f.exists():
            out[stage] = json.loads(f.read_text())
    return out


def ratio_tags(row: dict | None) -> dict:
    """Group runs by what they removed, not by their target: the achieved ratio to 0.01 (`flap.achieved_ratio`,
    e.g. "0.20") beside the target (`flap.nominal_ratio`); the exact values are the param `ratio` (target)
    and the metric `achieved_ratio`."""
    from .results import achieved_group
    if row is None:
        return {"flap.nominal_ratio": "0", "flap.achieved_ratio": achieved_group(0)}
    return {"flap.nominal_ratio": f"{float(row['ratio']):g}",
            "flap.achieved_ratio": achieved_group(row["achieved_ratio"])}


def table_tags(tables: list[str], protocol: str) -> dict:
    """`flap.tables` (comma list) and one `flap.table.NAME = 1` per table, so the UI filters a table with
    tags.`flap.table.main` = '1'; `flap.protocol` separates quick from paper runs."""
    return {"flap.tables": ",".join(tables), "flap.protocol": protocol, **{f"flap.table.{t}": "1" for t in tables}}


def _times(usage: dict) -> tuple[int, int] | None:
    """(start, end) in ms of the work behind a run: the stages' total time, ending when the last finished."""
    done = [u for u in usage.values() if u.get("finished")]
    if not done:
        return None
    end = max(u["finished"] for u in done)
    return int((end - sum(u["seconds"] for u in usage.values())) * 1000), int(end * 1000)


def comparison_figures(rows: list[dict], dense: dict, folder: Path) -> dict:
    """The study's comparison figures, logged with the dense run (the reference of every table) under
    figures/: every cell's perplexity vs achieved ratio on a log perplexity axis (one line per method and
    calibration, 95% bars over windows), and the zero-shot averages with 95% error bars. Returns the data
    drawn (the run's fingerprint: a changed cell redraws them)."""
    from .plots import ppl_vs_ratio, zeroshot_bars
    from .results import method_name
    folder.mkdir(parents=True, exist_ok=True)
    pts = [{**r, "method": method_name(r) + (f" {r['calib']}" if r.get("calib") else "")} for r in rows]
    drawn = {"ppl": [[p["method"], p["achieved_ratio"], p["perplexity"], p.get("ppl_ci95")] for p in pts]}
    if pts:
        ppl_vs_ratio(pts, dense["perplexity"], folder / "ppl_vs_ratio.png")
    zs = {f"{method_name(r)} {r['achieved_ratio']:.3f}": r for r in rows if r.get("zeroshot_avg") is not None}
    if zs:
        zeroshot_bars({"dense": dense} | zs, folder / "zeroshot.png")
        drawn["zeroshot"] = sorted([k, r["zeroshot_avg"]] for k, r in zs.items())
    return drawn


def _upsert(client, exp_id: str, key: str, name: str, params: dict, metrics: dict, selection: dict | None,
            tags: dict, times: tuple[int, int] | None, figures: tuple[list[dict], dict] | None = None) -> str:
    """The cell's run: kept if nothing changed, else the old one is deleted and a new one logged.
    figures: (rows, dense) whose comparison figures the run carries (the dense run)."""
    from .plots import kept_per_layer
    drawn = None
    if figures is not None:
        with tempfile.TemporaryDirectory() as tmp:
            drawn = comparison_figures(*figures, Path(tmp))  # cheap; its data go into the fingerprint
    fp = sha256_text(json.dumps([params | {"git_commit": None, "dvc_exp_name": None}, metrics, selection, tags]
                                + ([drawn] if drawn is not None else []), sort_keys=True, default=str))
    old = client.search_runs([exp_id], filter_string=f"tags.`flap.cell` = '{key}'")
    if len(old) == 1 and old[0].data.tags.get("flap.fingerprint") == fp:
        return old[0].info.run_id
    for r in old:
        client.delete_run(r.info.run_id)
    import time
    start, end = times or (None, None)
    run = client.create_run(exp_id, run_name=name, start_time=start,
                            tags={**tags, "flap.cell": key, "flap.fingerprint": fp})
    rid = run.info.run_id
    from mlflow.entities import Metric, Param
    now = end or int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    if selection is not None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "selection.json").write_text(json.dumps(selection, indent=1))
            kept_per_layer(selection, name, Path(tmp) / "kept_per_layer.png")
            client.log_artifacts(rid, tmp)
    if figures is not None:
        with tempfile.TemporaryDirectory() as tmp:
            comparison_figures(*figures, Path(tmp))
            client.log_artifacts(rid, tmp, "figures")
    client.set_terminated(rid, end_time=end)
    return rid


def warning_tags(row: dict) -> dict:
    """`flap.warning`: the cell's warnings (e.g. lsq on too few calibration tokens), where it has any."""
    return {"flap.warning": " | ".join(row["warnings"])} if row.get("warnings") else {}


#: MLflow 3 opens an experiment of unknown kind in its GenAI view; this tag opens the runs table.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def track(params: dict, record: dict, manifests: dict, rows: list[dict], dense: dict, sels: dict) -> dict:
    """Log every cell (and dense), one run per cell and protocol; returns {run key: run id} and where."""
    import mlflow
    from mlflow.tracking import MlflowClient
    uri = preflight()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    name = params.get("mlflow", {}).get("experiment") or f"flap-{record['model']['identity'].get('name', 'model')}"
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name, tags=EXPERIMENT_KIND)
    for k, v in EXPERIMENT_KIND.items():
        client.set_experiment_tag(exp_id, k, v)
    protocol = params.get("protocol", "quick")
    from .results import run_name
    du = cell_usage(dense)
    runs = {"dense": _upsert(client, exp_id, f"dense@{protocol}", run_name(None, protocol),
                             run_params(None, params, record, manifests), run_metrics(dense, du), None,
                             {**ratio_tags(None), **table_tags(["main", "zeroshot"], protocol)}, _times(du),
                             figures=(rows, dense))}
    for row in rows:
        u = cell_usage(row)
        runs[row["key"]] = _upsert(client, exp_id, f"{row['key']}@{protocol}", run_name(row, protocol),
                                   run_params(row, params, record, manifests), run_metrics(row, u),
                                   sels[row["cell"]], {**ratio_tags(row), **table_tags(row["tables"], protocol),
                                                       **warning_tags(row)}, _times(u))
    return {"tracking_uri": uri, "experiment": name, "experiment_id": exp_id, "protocol": protocol, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["--check"]:
        print("usage: python -m flap_exp.pipeline.tracking --check", file=sys.stderr)
        return 2
    try:
        print(f"mlflow: {preflight()} reachable")
    except FlapError as err:
        print(f"mlflow: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
