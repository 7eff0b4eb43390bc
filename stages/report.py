"""report TABLE: reports/TABLE.md, reports/TABLE.csv and reports/figures/TABLE.png of one table of the study;
report --index: reports/README.md, reports/metrics.json and reports/plots/ (DVC's metrics and plots)."""
import sys

from flap_exp.pipeline.cells import load_cells
from flap_exp.pipeline.paths import REPORTS
from flap_exp.pipeline.report import index_files, table_files
from flap_exp.pipeline.results import collect
from flap_exp.pipeline.stage import load_params, stage

if __name__ == "__main__":
    name = sys.argv[1]
    with stage(f"report@{name}"):
        p = load_params()
        cells = load_cells(p)
        rows, dense, sels = collect(cells)
        protocol = p.get("protocol", "quick")
        if name == "--index":
            index_files(cells, rows, dense, protocol, REPORTS)
        else:
            table_files(name, cells["tables"][name], rows, dense, sels, protocol, REPORTS)
