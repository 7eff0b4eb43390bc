"""track: one MLflow run per evaluated cell + dense (upserted by cell key) -> results/mlflow.json."""
from flap_exp.pipeline.io import read_json, write_json
from flap_exp.pipeline.records import MANIFEST, eval_record
from flap_exp.pipeline.results import collect
from flap_exp.pipeline.stage import load_params, stage
from flap_exp.pipeline.tracking import preflight, track

if __name__ == "__main__":
    with stage("track"):
        preflight()
        p = load_params()
        rows, dense, sels = collect(p["cells"]["evaluate"])
        out = track(p, eval_record(), read_json(MANIFEST), rows, dense, sels)
        write_json("results/mlflow.json", out)
