"""report TABLE: REPORTS/TABLE.md, REPORTS/TABLE.csv and REPORTS/figures/TABLE.png of one table of the study;
report --index: REPORTS/README.md, REPORTS/metrics.json and REPORTS/plots/ (DVC's metrics and plots).
REPORTS is cells.yaml's `reports`: reports/ for the default protocol, reports/PROTOCOL/ for the others."""
import argparse

from flap_exp.errors import FlapError
from flap_exp.pipeline.artifacts.results import collect
from flap_exp.pipeline.reporting.report import index_files, table_files
from flap_exp.pipeline.steps.stage import load_params, stage
from flap_exp.pipeline.study.cells import load_cells

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("table", nargs="?", help="a table of the study (params.yaml: tables)")
    ap.add_argument("--index", action="store_true", help="the index, metrics and plots instead of a table")
    a = ap.parse_args()
    if bool(a.table) == a.index:
        ap.error("give one TABLE or --index")
    with stage(f"report@{a.table or 'index'}"):
        p = load_params()
        cells = load_cells(p)
        if a.table is not None and a.table not in cells["tables"]:
            raise FlapError(f"no table {a.table!r} in the study (tables: {', '.join(cells['tables'])})")
        rows, dense, sels = collect(cells)
        protocol = p["protocol"]
        if a.index:
            index_files(cells, rows, dense, protocol, cells["reports"])
        else:
            table_files(a.table, cells["tables"][a.table], rows, dense, sels, protocol, cells["reports"])
