"""prepare_eval: the perplexity corpora fetched; identities and sha256 -> results/prepare_eval.json."""
from flap_exp.pipeline.artifacts.io import write_json
from flap_exp.pipeline.artifacts.paths import PREPARE_EVAL
from flap_exp.pipeline.steps.prepare import prepare_eval
from flap_exp.pipeline.steps.stage import load_settings, stage

if __name__ == "__main__":
    with stage("prepare_eval"):
        write_json(PREPARE_EVAL, prepare_eval(load_settings().eval))
