"""prepare: base model converted into the cache, corpora fetched; identities and sha256 -> results/prepare.json."""
from flap_exp.pipeline.io import write_json
from flap_exp.pipeline.prepare import prepare
from flap_exp.pipeline.records import PREPARE
from flap_exp.pipeline.stage import load_params, stage

if __name__ == "__main__":
    with stage("prepare"):
        p = load_params()
        write_json(PREPARE, prepare(p["model"], p["data"]))
