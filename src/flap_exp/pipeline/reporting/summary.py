"""The end of `make run`: every cell's perplexity and achieved ratio, table by table, and where to look next.
`python -m flap_exp.pipeline.reporting.summary` (reads params.yaml, cells.yaml and results/; computes nothing)."""
from __future__ import annotations

import sys

from ...errors import FlapError
from ..artifacts.results import collect, method_name
from ..steps.stage import load_params
from ..study.cells import load_cells
from .mlflow_store import tracking_uri
from .noise import zeroshot_docs, zeroshot_stderr
from .tracking import study_link


def summary(params: dict, cells: dict, rows: list[dict], dense: dict) -> str:
    by = {r["key"]: r for r in rows}
    lines = [f"flap-exp study, protocol {params.get('protocol')}: {len(rows)} cells, dense perplexity "
             f"{dense['perplexity']:.2f} ({dense['ppl_windows']} windows)"]
    for name, t in cells["tables"].items():
        lines.append(f"\n{t['title']}  -> {cells['reports']}/{name}.md")
        for key in t["cells"]:
            r = by[key]
            extra = f"  zero-shot {_zs(r)}" if r.get("zeroshot_avg") is not None else ""
            extra += "".join(f"  speedup {w} {v:.2f}x" for w, v in (r.get("speedup") or {}).items())
            calib = f" {r['calib']}" if r.get("calib") else ""
            lines.append(f"  {method_name(r) + calib:<44} target {r['ratio']:<4g} removed {r['achieved_ratio']:.3f}"
                         f"  ppl {r['perplexity']:>10.2f}{_ci(r)}{extra}")
            lines += [f"    warning: {w}" for w in r.get("warnings") or []]
    where = cells["reports"]
    views = "dvc metrics show; dvc plots show" if where == "reports" else f"dvc metrics show {where}/metrics.json"
    lines += ["", f"Reports: {where}/README.md (one markdown + CSV + figure per table); {views}",
              f"MLflow: {tracking_uri()} (make mlflow-ui, then {study_link()})"]
    return "\n".join(lines)


def _ci(r: dict) -> str:
    """The perplexity's 95% interval over windows, e.g. " [52.30, 60.15]", where recorded."""
    ci = r.get("ppl_ci95")
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def _zs(r: dict) -> str:
    """The zero-shot average, its standard error and documents, e.g. "48.6% ± 2.7 (350 docs)", where recorded."""
    se, n = zeroshot_stderr(r), zeroshot_docs(r)
    return (f"{100 * r['zeroshot_avg']:.1f}%" + (f" ± {100 * se:.1f}" if se is not None else "")
            + (f" ({n} docs)" if n is not None else ""))


def main() -> int:
    try:
        p = load_params()
        cells = load_cells(p)
        rows, dense, _ = collect(cells)
    except FlapError as err:
        print(f"summary: error: {err}", file=sys.stderr)
        return 2
    print(summary(p, cells, rows, dense))
    return 0


if __name__ == "__main__":
    sys.exit(main())
