"""What an evaluate record says about its own noise, read the same way by the reports, metrics.json, MLflow
and the figures: the perplexity's 95% interval over windows, the zero-shot scores' standard errors and
document counts, and whether a gap to a reference is within that noise (flap_exp.uncertainty).
Records written before these fields existed give None (no interval shown), never a guess."""
from __future__ import annotations

from ...uncertainty import Z95, average_stderr, gap_within_noise, paired_ratio_interval


def ppl_ci(row: dict) -> tuple[float, float] | None:
    ci = row.get("ppl_ci95")
    return None if ci is None else (float(ci[0]), float(ci[1]))


def task_stderr(task: dict) -> float | None:
    """A task's score's standard error (lm-eval's, of its paper metric)."""
    se = task.get("score_stderr", task.get(f"{task.get('metric')}_stderr"))
    return None if se is None else float(se)


def zeroshot_stderr(row: dict) -> float | None:
    """The standard error of the row's zero-shot average (its tasks' errors, independent)."""
    zs = row.get("zeroshot") or {}
    if zs.get("average_stderr") is not None:
        return float(zs["average_stderr"])
    tasks = list((zs.get("tasks") or {}).values())
    return average_stderr([task_stderr(t) for t in tasks]) if tasks else None


def zeroshot_docs(row: dict) -> int | None:
    """Documents evaluated, all tasks together."""
    tasks = ((row.get("zeroshot") or {}).get("tasks") or {}).values()
    n = [t.get("n_docs") for t in tasks]
    return sum(n) if n and None not in n else None


def zeroshot_gap(row: dict, ref: dict) -> str:
    """The row's zero-shot average minus the reference's, in points, and whether it is within noise at 95%
    (e.g. "+4.90 (within noise)"); "" without both averages."""
    a, b = row.get("zeroshot_avg"), ref.get("zeroshot_avg")
    if a is None or b is None:
        return ""
    verdict = gap_within_noise(a, zeroshot_stderr(row), b, zeroshot_stderr(ref), Z95)
    word = {True: " (within noise)", False: " (beyond noise)", None: ""}[verdict]
    return f"{100 * (a - b):+.2f}{word}"


def ppl_ratio(row: dict, ref: dict) -> tuple[float, float, float] | None:
    """(ratio, low, high) of row's perplexity over ref's, paired over the windows both were scored on."""
    a, b = row.get("ppl_window_nll"), ref.get("ppl_window_nll")
    return None if a is None or b is None else paired_ratio_interval(a, b)


def noise_metrics(r: dict) -> dict:
    """The flat names of a record's noise (metrics.json, MLflow and the CSV alike): the perplexity's 95%
    interval and window count, the zero-shot average's standard error and document count, where recorded."""
    out: dict = {}
    ci = ppl_ci(r)
    if ci is not None:
        out |= {"perplexity_ci95_low": ci[0], "perplexity_ci95_high": ci[1]}
    if r.get("ppl_windows") is not None:
        out["ppl_windows"] = r["ppl_windows"]
    if r.get("zeroshot_avg") is not None:
        se, docs = zeroshot_stderr(r), zeroshot_docs(r)
        out |= {k: v for k, v in (("zeroshot_avg_stderr", se), ("zeroshot_docs", docs)) if v is not None}
    return out
