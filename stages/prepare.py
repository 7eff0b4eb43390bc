"""prepare CORPUS...: base model converted into the cache, calibration corpora fetched; identities and
sha256 -> results/prepare.json."""
import sys

from flap_exp.pipeline.artifacts.io import write_json
from flap_exp.pipeline.artifacts.paths import PREPARE
from flap_exp.pipeline.steps.prepare import prepare
from flap_exp.pipeline.steps.stage import load_settings, stage

if __name__ == "__main__":
    with stage("prepare"):
        p = load_settings()
        corpora = [c for c in sys.argv[1:] if c != "none"]
        write_json(PREPARE, prepare(p.model, p.calib, corpora))
