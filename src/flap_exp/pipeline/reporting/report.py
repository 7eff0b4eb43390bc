"""Stage report: one report per table of the study (reports/TABLE.md + .csv + a figure where a picture says
more), an index reports/README.md (protocol, commit, links), and reports/metrics.json + reports/plots/ for
DVC's own views (`dvc metrics show/diff`, `dvc plots show/diff`, `dvc exp show`).

The achieved ratio (the fraction of attention+MLP weights actually removed) stands beside every number and
is the x axis of every figure; the nominal target is marked. Layouts are a registry keyed by a table's
`layout` (its name by default): main, ablation, compensation, calibration, zeroshot, speed.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ...atomic import atomic_file
from ...errors import FlapError
from ..artifacts.results import achieved_group, method_name
from .commit import run_commit
from .noise import noise_metrics, ppl_ci, ppl_ratio, task_stderr, zeroshot_gap, zeroshot_stderr
from .plots import bars, kept_heatmap, ppl_vs_n, ppl_vs_ratio, zeroshot_bars
from .rounding import rounded


def _extras(r: dict) -> dict:
    """The noise (noise_metrics), per-task zero-shot scores with their standard errors and document counts,
    extra corpora's perplexities and throughput, as flat CSV columns (the MLflow names)."""
    out = noise_metrics(r) | {f"perplexity.{k}": v for k, v in (r.get("perplexity_extra") or {}).items()}
    for k, t in (r.get("zeroshot") or {}).get("tasks", {}).items():
        out[f"zeroshot.{k}"] = t["score"]
        out |= {f"zeroshot.{k}.stderr": task_stderr(t)} if task_stderr(t) is not None else {}
        out |= {f"zeroshot.{k}.n_docs": t["n_docs"]} if t.get("n_docs") is not None else {}
    out |= {f"tokens_per_s.{k}": v for k, v in (r.get("throughput_tokens_per_s") or {}).items()}
    return out | {f"speedup.{k}": v for k, v in (r.get("speedup") or {}).items()}


def zeroshot_table(rows: list[dict], dense: dict) -> list[str]:
    """The paper's zero-shot layout: rows = method and ratio, columns = tasks + average (in %)."""
    evaluated = [r for r in [dense] + rows if r.get("zeroshot")]
    if not evaluated:
        return []
    first = evaluated[0]["zeroshot"]["tasks"]
    tasks = list(first)
    head = ["method", "ratio", "removed"] + [f"{t} ({first[t]['metric']}{_docs(first[t])})" for t in tasks]
    body = []
    for r in evaluated:
        zs = r["zeroshot"]["tasks"]
        name = "dense" if r is dense else method_name(r)
        body.append([name, f"{r.get('ratio', 0):g}", f"{r.get('achieved_ratio', 0):.3f}"]
                    + [_pm(zs[t]["score"], task_stderr(zs[t])) if t in zs else "" for t in tasks]
                    + [_pm(r["zeroshot_avg"], zeroshot_stderr(r)), "" if r is dense else zeroshot_gap(r, dense)])
    limit = evaluated[0]["zeroshot"].get("limit")
    note = f"first {limit} documents per task" if limit else "full splits"
    return ["## Zero-shot accuracy (%)", "", f"lm-eval {evaluated[0]['zeroshot'].get('lm_eval_version')}, "
            f"{note}, data source {evaluated[0]['zeroshot'].get('source')}.", "", ZEROSHOT_NOISE, ""] \
        + _table(head + ["average", "vs dense"], body) + [""]


#: Said under every zero-shot table: what the +- and the verdicts mean.
ZEROSHOT_NOISE = ("± one standard error (lm-eval's: the documents' sample standard deviation / sqrt(n)); n: "
                  "documents per task. 'vs dense': the average's gap in points, within noise when it is at most "
                  "1.96 x the two averages' combined standard error (95%; taken as independent).")


def _docs(task: dict) -> str:
    return f", n={task['n_docs']}" if task.get("n_docs") is not None else ""


def _pm(score: float, stderr: float | None) -> str:
    """A score in % with its standard error in points, e.g. "48.60 ± 2.71"."""
    return f"{100 * score:.2f}" + ("" if stderr is None else f" ± {100 * stderr:.2f}")


def speedup_table(rows: list[dict]) -> list[str]:
    """Median speedup over the dense model, measured in the same process (see evaluation.throughput)."""
    timed = [r for r in rows if r.get("speedup")]
    if not timed:
        return []
    work = list(timed[0]["speedup"])
    return ["## Speedup over dense (median of paired runs)", ""] + _table(
        ["method", "ratio", "removed"] + work,
        [[method_name(r), f"{r['ratio']:g}", f"{r['achieved_ratio']:.3f}"] + [f"{r['speedup'][w]:.2f}x" for w in work]
         for r in timed]) + [""]


def _cell(r: dict | None, removed: bool = True) -> str:
    """Perplexity [its 95% interval over windows] [/ zero-shot average +- its standard error] and, beside every
    number, the achieved ratio of removed weights."""
    if r is None:
        return ""
    zs = f" / {_pm(r['zeroshot_avg'], zeroshot_stderr(r))}%" if r.get("zeroshot_avg") is not None else ""
    return f"{_ppl(r)}{zs}" + (f" (removed {r['achieved_ratio']:.3f})" if removed else "")


def _ppl(r: dict) -> str:
    """e.g. "56.09 [52.30, 60.15]": the perplexity and its 95% interval over windows, where recorded."""
    ci = ppl_ci(r)
    return f"{r['perplexity']:.2f}" + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _over(r: dict | None, ref: dict | None) -> str:
    """r's perplexity over ref's, with the 95% interval of the ratio paired over the shared windows."""
    if r is None or ref is None:
        return ""
    paired = ppl_ratio(r, ref)
    return f"{r['perplexity'] / ref['perplexity']:.3f}" + ("" if paired is None else
                                                          f" [{paired[1]:.3f}, {paired[2]:.3f}]")


def compensation_table(rows: list[dict], dense: dict) -> list[str]:
    """Rows = (metric, structure, ratio), columns = compensations (the same selection in every column;
    conf/compensation/ names, e.g. lsq_dense), then each one's perplexity over `bias`'s where both exist."""
    order = {c: i for i, c in enumerate(("none", "bias", "lsq"))}
    comps = sorted({r["compensation"] for r in rows}, key=lambda c: (order.get(c, len(order)), c))
    by = {(r["metric"], r["structure"], r["ratio"], r["compensation"]): r for r in rows}
    opts = sorted({f"{r['compensation']}: "
                   + ", ".join(f"{k}={v}" for k, v in sorted(r["compensation_options"].items()))
                   for r in rows if r.get("compensation_options")})
    vs = [c for c in comps if c != "bias"] if "bias" in comps else []
    head = ["metric", "structure", "ratio", "removed"] + comps + [f"{c} / bias" for c in vs]
    body = []
    for m, s, x in sorted({(r["metric"], r["structure"], r["ratio"]) for r in rows}):
        cells = {c: by.get((m, s, x, c)) for c in comps}
        removed = next(r["achieved_ratio"] for r in cells.values() if r is not None)
        line = [m, s, f"{x:g}", f"{removed:.3f}"] + [_ppl(r) if r else "" for r in cells.values()]
        line += [_over(cells[c], cells.get("bias")) for c in vs]
        body.append(line)
    lines = ["Every column of a row compensates the same selection (compensation never changes which units are "
             "removed); 'removed' is the achieved ratio. 'X / bias' is paired over the windows both were scored "
             "on: its interval excludes 1 when the gap is beyond noise.", ""]
    if opts:
        lines += ["Options: " + "; ".join(opts) + ".", ""]
    return lines + _table(head, body) + [""]


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def main_table(rows: list[dict], dense: dict) -> list[str]:
    """Rows = method (metric/structure, compensation), columns = ACHIEVED ratio (to 0.01): equal budgets."""
    groups = sorted({achieved_group(r["achieved_ratio"]) for r in rows})
    meths = sorted({method_name(r) for r in rows})
    lines = ["Columns: the fraction of attention+MLP weights actually removed, to 0.01 (methods side by side "
             "removed the same weights); each cell: perplexity (and the exact achieved ratio).", ""]
    lines += _table(["method"] + groups,
                    [[m] + ["; ".join(_cell(r) for r in rows if method_name(r) == m
                                      and achieved_group(r["achieved_ratio"]) == x) for x in groups] for m in meths])
    return lines + [""]


def ablation_table(rows: list[dict], dense: dict) -> list[str]:
    """Per target ratio: rows = metric (compensation), columns = structure."""
    by = {(r["metric"], r["compensation"], r["structure"], r["ratio"]): r for r in rows}
    lines: list[str] = []
    for ratio in sorted({r["ratio"] for r in rows}):
        structs = sorted({r["structure"] for r in rows if r["ratio"] == ratio})
        methods = sorted({(r["metric"], r["compensation"]) for r in rows if r["ratio"] == ratio})
        lines += [f"### Target ratio {ratio:g}: metric x structure", ""]
        lines += _table(["metric"] + structs, [[f"{m} ({c})"] +
                                              [_cell(by.get((m, c, s, ratio))) for s in structs] for m, c in methods])
        lines.append("")
    return lines


def calibration_table(rows: list[dict], dense: dict) -> list[str]:
    """Rows = calibration (corpus, N), columns = the method's target ratios."""
    by = {(r.get("calib"), r["ratio"]): r for r in rows}
    ratios = sorted({r["ratio"] for r in rows})
    calibs = sorted({r.get("calib") for r in rows}, key=lambda c: (str(c).rsplit("-", 1)[0], _n(c)))
    meths = sorted({method_name(r) for r in rows})
    lines = [f"Method: {', '.join(meths)}. Rows: the calibration (corpus-N windows of "
             f"{rows[0].get('seqlen', '')} tokens).", ""]
    return lines + _table(["calibration"] + [f"ratio {x:g}" for x in ratios],
                          [[str(c)] + [_cell(by.get((c, x))) for x in ratios] for c in calibs]) + [""]


def _n(calib) -> int:
    try:
        return int(str(calib).rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def _zeroshot(rows: list[dict], dense: dict) -> list[str]:
    return zeroshot_table(rows, dense)[4:]  # the caption already names the documents and lm-eval


def _speed(rows: list[dict], dense: dict) -> list[str]:
    return speedup_table(rows)[2:]


LAYOUTS = {"main": main_table, "ablation": ablation_table, "compensation": compensation_table,
           "calibration": calibration_table, "zeroshot": _zeroshot, "speed": _speed}


def caption(dense: dict, protocol: str, rows: list[dict]) -> str:
    """What the numbers were measured on, said under every table (the protocol's subsets included)."""
    calibs = sorted({str(r["calib"]) for r in rows if r.get("calib")})
    zs = next((r["zeroshot"] for r in rows + [dense] if r.get("zeroshot")), None)
    text = (f"Protocol **{protocol}**: perplexity on {dense['eval_data'].get('name')} "
            f"({dense['ppl_windows']} windows of {dense['seqlen']} tokens"
            f"{'' if protocol == 'paper' else ', a subset of the split'}); dense model {dense['perplexity']:.2f}. "
            f"Calibration: {', '.join(calibs) or 'none'} (corpus-N windows).")
    if zs is not None:
        docs = f"first {zs.get('limit')} documents per task" if zs.get("limit") else "full splits"
        text += (f" Zero-shot: {docs}"
                 f", lm-eval {zs.get('lm_eval_version')}.")
    return text + (" \"(removed x)\": the achieved fraction of attention+MLP weights removed. [a, b]: the "
                   "perplexity's 95% interval over the windows (normal approximation on the mean NLL; adjacent "
                   "windows are correlated text, so it understates the noise rather than overstating it).")


def table_report(name: str, table: dict, rows: list[dict], dense: dict, protocol: str) -> str:
    layout = LAYOUTS.get(table["layout"])
    if layout is None:
        raise FlapError(f"table {name!r}: unknown layout {table['layout']!r}; known: {', '.join(LAYOUTS)}")
    return "\n".join([f"# {table['title']}", "", caption(dense, protocol, rows), ""]
                     + layout(rows, dense) + warnings(rows)).rstrip("\n") + "\n"


def warnings(rows: list[dict]) -> list[str]:
    """The cells whose result may not mean much (e.g. lsq on too few calibration tokens), each with its rule."""
    warned = [(r, w) for r in rows for w in r.get("warnings") or []]
    if not warned:
        return []
    return ["**Warnings** (a result above may not mean much; the rules: `flap_exp/adequacy.py`):", ""] + [
        f"- {method_name(r)} {r['ratio']:g}{' ' + r['calib'] if r.get('calib') else ''}: {w}" for r, w in warned] + [""]


def metrics_summary(rows: list[dict], dense: dict) -> dict:
    """reports/metrics.json (dvc metrics show/diff, dvc exp show): per cell its perplexity with its 95%
    interval and window count, achieved ratio, zero-shot average with its standard error and document
    count, and speedups where measured; rounded per quantity (rounding.py), as in MLflow."""
    def one(r: dict) -> dict:
        out = {"perplexity": r["perplexity"], "achieved_ratio": r["achieved_ratio"]} | noise_metrics(r)
        if r.get("zeroshot_avg") is not None:
            out["zeroshot_avg"] = r["zeroshot_avg"]
        for w, v in (r.get("speedup") or {}).items():
            out[f"speedup.{w}"] = v
        return {k: rounded(k, v) for k, v in out.items()}
    return {"dense": one(dense), **{r["key"]: one(r) for r in rows}}


def plot_rows(rows: list[dict]) -> list[dict]:
    """reports/plots/ppl_vs_ratio.csv for `dvc plots show/diff`: achieved ratio vs perplexity per cell."""
    return [{"method": method_name(r), "ratio": r["ratio"], "achieved_ratio": r["achieved_ratio"],
             "perplexity": r["perplexity"]} for r in sorted(rows, key=lambda r: (method_name(r), r["achieved_ratio"]))]


def index(tables: dict, dense: dict, protocol: str, commit: tuple[str | None, bool]) -> str:
    """reports/README.md; commit: commit.run_commit()'s (hash, whether the run started from it)."""
    sha, started = commit
    when = "the commit `make run` started from" if started else "git's HEAD when this report was written"
    lines = ["# Reports", "",
             f"Generated by `dvc repro` (stage `report`) under protocol **{protocol}** at commit "
             f"`{sha[:7] if sha else 'unknown'}` ({when}; uncommitted changes are not named). "
             f"Dense perplexity {dense['perplexity']:.2f} on {dense['ppl_windows']} windows.", "",
             "| table | cells | report | data | figure |", "|---|---|---|---|---|"]
    for name, t in tables.items():
        fig = f"[figure](figures/{name}.png)"
        lines.append(f"| {t['title']} | {len(t['cells'])} | [{name}.md]({name}.md) | [{name}.csv]({name}.csv) "
                     f"| {fig} |")
    lines += ["", "`dvc metrics show` reads metrics.json (perplexity, achieved ratio, zero-shot average, speedup "
              "per cell); `dvc plots show` draws plots/ppl_vs_ratio.csv and the figures."]
    return "\n".join(lines) + "\n"


def _figure(layout: str, rows: list[dict], dense: dict, sels: dict, out: Path) -> None:
    """The table's figure: perplexity vs achieved ratio (main, compensation), vs N (calibration), the kept
    units per layer (ablation), accuracy and speedup bars (zeroshot, speed)."""
    if layout in ("main", "compensation"):
        label = method_name if layout == "main" else (lambda r: f"{r['metric']}/{r['structure']} {r['compensation']}")
        ppl_vs_ratio([{**r, "method": label(r)} for r in rows], dense["perplexity"], out)
    elif layout == "calibration":
        ppl_vs_n(rows, dense["perplexity"], out)
    elif layout == "ablation":
        keys = {r["cell"] for r in rows}
        adaptive = {k: s for k, s in sels.items() if k in keys and s["structure"].startswith("al_")}
        kept_heatmap(adaptive or {k: s for k, s in sels.items() if k in keys}, out)
    elif layout == "zeroshot":
        zeroshot_bars({"dense": dense} | {f"{method_name(r)} {r['achieved_ratio']:.3f}": r for r in rows}, out)
    elif layout == "speed":
        work = next(iter(rows[0].get("speedup") or {"prefill": 0}), "prefill") if rows else "prefill"
        bars({f"{method_name(r)} {r['achieved_ratio']:.3f}": (r.get("speedup") or {}).get(work) for r in rows},
             f"speedup over dense ({work})", out)


def table_files(name: str, table: dict, rows: list[dict], dense: dict, sels: dict, protocol: str,
                out_dir: str | Path = "reports") -> None:
    """reports/NAME.md, reports/NAME.csv and reports/figures/NAME.png of one table."""
    out = Path(out_dir)
    by_key = {r["key"]: r for r in rows}
    trows = [by_key[k] for k in table["cells"]]
    with atomic_file(out / f"{name}.md") as tmp:
        tmp.write_text(table_report(name, table, trows, dense, protocol), encoding="utf-8")
    extras = [k for k in dict.fromkeys(k for r in [dense] + trows for k in _extras(r)) if k not in CSV_COLUMNS]
    with atomic_file(out / f"{name}.csv") as tmp:
        tmp.write_text(_csv([{**dense, "key": "dense", "metric": "dense", "ratio": 0} | _extras(dense)]
                            + [r | _extras(r) | (r.get("compensation_options") or {}) for r in trows],
                            CSV_COLUMNS + extras), encoding="utf-8")
    (out / "figures").mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "figures" / f"{name}.png") as tmp:
        _figure(table["layout"], trows, dense, sels, tmp)


def index_files(cells: dict, rows: list[dict], dense: dict, protocol: str, out_dir: str | Path = "reports") -> None:
    """reports/README.md (the index), reports/metrics.json and reports/plots/ppl_vs_ratio.csv."""
    out = Path(out_dir)
    with atomic_file(out / "README.md") as tmp:
        tmp.write_text(index(cells["tables"], dense, protocol, run_commit()), encoding="utf-8")
    with atomic_file(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics_summary(rows, dense), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    (out / "plots").mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "plots" / "ppl_vs_ratio.csv") as tmp:
        tmp.write_text(_csv(plot_rows(rows), ["method", "ratio", "achieved_ratio", "perplexity"]), encoding="utf-8")


CSV_COLUMNS = ["key", "metric", "structure", "ratio", "compensation", "calib", "damping", "form", "perplexity",
               "zeroshot_avg", "achieved_ratio", "params_kept", "params_total", "ppl_windows"]
