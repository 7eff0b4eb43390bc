"""MLflow: one run per evaluated cell and one for the dense model, in one experiment per model.

Tracking URI: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project root; `preflight`
(mlflow_store.py) fails fast, before any expensive stage, when it is unreachable. Runs are keyed by the tag `flap.cell`:
re-logging an unchanged cell keeps its run, a changed one replaces it (never two active runs per cell).
`python -m flap_exp.pipeline.reporting.tracking --check` runs the preflight alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ...errors import FlapError
from ..artifacts import paths
from ..artifacts.io import read_json, sha256_text
from ..artifacts.results import achieved_group, method_name, run_name
from .commit import run_commit
from .mlflow_store import preflight
from .noise import noise_metrics, task_stderr
from .plots import kept_per_layer, ppl_vs_ratio, zeroshot_bars
from .rounding import rounded


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
         "git_commit": run_commit()[0], "dvc_exp_name": os.environ.get("DVC_EXP_NAME"),
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
            tags: dict, times: tuple[int, int] | None, figures: tuple[list[dict], dict] | None = None,
            files: tuple[Path, ...] | list[Path] = ()) -> str:
    """The cell's run: kept if nothing changed, else the old one is deleted and a new one logged.
    figures: (rows, dense) whose comparison figures the run carries (the dense run); files: the cell's own
    artifacts logged as they are (kl_search's levels and their plot, under allocation/)."""
    drawn = None
    if figures is not None:
        with tempfile.TemporaryDirectory() as tmp:
            drawn = comparison_figures(*figures, Path(tmp))  # cheap; its data go into the fingerprint
    fp = sha256_text(json.dumps([params | {"git_commit": None, "dvc_exp_name": None}, metrics, selection, tags]
                                + ([drawn] if drawn is not None else [])
                                + [hashlib.sha256(f.read_bytes()).hexdigest() for f in files], sort_keys=True,
                                default=str))
    old = client.search_runs([exp_id], filter_string=f"tags.`flap.cell` = '{key}'")
    if len(old) == 1 and old[0].data.tags.get("flap.fingerprint") == fp:
        return old[0].info.run_id
    for r in old:
        client.delete_run(r.info.run_id)
    start, end = times or (None, None)
    run = client.create_run(exp_id, run_name=name, start_time=start,
                            tags={**tags, "flap.cell": key, "flap.fingerprint": fp})
    rid = run.info.run_id
    from mlflow.entities import Metric, Param  # mlflow: summary imports this module and must not load it
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
    for f in files:
        client.log_artifact(rid, str(f), "allocation")
    client.set_terminated(rid, end_time=end)
    return rid


def allocation_files(cell: str, root: str | Path = ".") -> list[Path]:
    """A kl_search cell's searched levels (json) and their per-layer plot (png), where the cell has them."""
    return [p for p in (Path(root) / paths.allocation(cell), Path(root) / paths.allocation_plot(cell)) if p.is_file()]


def warning_tags(row: dict) -> dict:
    """`flap.warning`: the cell's warnings (e.g. lsq on too few calibration tokens), where it has any."""
    return {"flap.warning": " | ".join(row["warnings"])} if row.get("warnings") else {}


#: The experiment's kind for MLflow's API and older UIs. MLflow 3.17's UI ignores it: it picks its GenAI or
#: machine-learning view from the URL's `workflowType` (else the browser's last choice, GenAI when fresh) and
#: shows no metric column until the user adds one, so the study's link (landing_url) names both the view
#: and a shared view state (VIEW, an experiment tag the UI's "share view" reads: columns and sort order).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
VIEW_KEY = "flap"
VIEW = {"orderByKey": "metrics.`perplexity`", "orderByAsc": True,  # lowest perplexity first
        "selectedColumns": [f"metrics.`{m}`" for m in ("perplexity", "perplexity_ci95_low", "perplexity_ci95_high",
                                                       "achieved_ratio", "zeroshot_avg", "zeroshot_avg_stderr")]
        + [f"params.`{p}`" for p in ("metric", "structure", "ratio", "compensation", "calib", "protocol")]}


def experiment_tags() -> dict:
    """The tags every study's experiment carries: its kind and the shared view of its runs table."""
    return {**EXPERIMENT_KIND, f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(VIEW)}


def ui_root() -> str:
    """Where `make mlflow-ui` serves: 127.0.0.1, port MLFLOW_PORT (5000, the Makefile's and MLflow's default)."""
    return f"http://127.0.0.1:{os.environ.get('MLFLOW_PORT') or '5000'}"


def landing_url(experiment_id: str, ui: str | None = None) -> str:
    """The experiment's runs table in the machine-learning view with VIEW's columns, sorted by perplexity (the
    UI drops a shared view when the URL also carries a sort, so the sort is VIEW's)."""
    query = urllib.parse.urlencode({"workflowType": "machine_learning", "viewStateShareKey": VIEW_KEY})
    return f"{(ui or ui_root()).rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def study_link(record: str | Path = "results/mlflow.json") -> str:
    """The landing URL of the study's experiment (track's record), else the UI's root (nothing tracked yet)."""
    return landing_url(str(read_json(record)["experiment_id"])) if Path(record).is_file() else ui_root()


def track(params: dict, record: dict, manifests: dict, rows: list[dict], dense: dict, sels: dict) -> dict:
    """Log every cell (and dense), one run per cell and protocol; returns {run key: run id} and where."""
    # mlflow: slow to import, only the track stage needs it (summary imports this module for study_link)
    import mlflow
    from mlflow.tracking import MlflowClient
    uri = preflight()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    name = params["mlflow"]["experiment"] or f"flap-{record['model']['identity'].get('name', 'model')}"
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name, tags=experiment_tags())
    for k, v in experiment_tags().items():
        client.set_experiment_tag(exp_id, k, v)
    protocol = params["protocol"]
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
                                                       **warning_tags(row)}, _times(u),
                                   files=allocation_files(row["cell"]))
    return {"tracking_uri": uri, "experiment": name, "experiment_id": exp_id, "protocol": protocol, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--link"]:
        print(f"mlflow: open {study_link()}")
        return 0
    if args != ["--check"]:
        print("usage: python -m flap_exp.pipeline.reporting.tracking --check | --link", file=sys.stderr)
        return 2
    try:
        print(f"mlflow: {preflight()} reachable")
    except FlapError as err:
        print(f"mlflow: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
