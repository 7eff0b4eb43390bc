"""track: one MLflow run per evaluated cell and protocol + dense (upserted by key) -> results/mlflow.json."""
from flap_exp.pipeline.artifacts import paths
from flap_exp.pipeline.artifacts.io import read_json, write_json
from flap_exp.pipeline.artifacts.records import eval_record
from flap_exp.pipeline.artifacts.results import collect
from flap_exp.pipeline.reporting.tracking import preflight, track
from flap_exp.pipeline.steps.stage import load_params, stage
from flap_exp.pipeline.study.cells import load_cells

if __name__ == "__main__":
    with stage("track"):
        preflight()
        p = load_params()
        cells = load_cells(p)
        rows, dense, sels = collect(cells)
        manifests = {c: read_json(paths.manifest(c)) for c in cells["calibrate"]}
        out = track(p, eval_record(), manifests, rows, dense, sels)
        write_json("results/mlflow.json", out)
