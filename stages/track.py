"""track: one MLflow run per evaluated cell and protocol + dense (upserted by key) -> results/mlflow.json."""
from flap_exp.pipeline import paths
from flap_exp.pipeline.cells import load_cells
from flap_exp.pipeline.io import read_json, write_json
from flap_exp.pipeline.records import eval_record
from flap_exp.pipeline.results import collect
from flap_exp.pipeline.stage import load_params, stage
from flap_exp.pipeline.tracking import preflight, track

if __name__ == "__main__":
    with stage("track"):
        preflight()
        p = load_params()
        cells = load_cells(p)
        rows, dense, sels = collect(cells)
        manifests = {c: read_json(paths.manifest(c)) for c in cells["calibrate"]}
        out = track(p, eval_record(), manifests, rows, dense, sels)
        write_json("results/mlflow.json", out)
