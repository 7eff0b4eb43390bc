"""report: reports/ablation.md, reports/ablation.csv and reports/figures/ from the evaluate stages."""
from flap_exp.pipeline.report import report
from flap_exp.pipeline.results import collect
from flap_exp.pipeline.stage import load_params, stage

if __name__ == "__main__":
    with stage("report"):
        rows, dense, sels = collect(load_params()["cells"]["evaluate"])
        report(rows, dense, sels, "reports")
