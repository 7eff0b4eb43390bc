"""standardize METRIC: AL-structure units (groups [L, kv], channels [L, I]) z-scored per layer and module."""
import argparse

from flap_exp.pipeline.io import load_tensors, read_json, save_tensors
from flap_exp.pipeline.records import PREPARE, arch_of
from flap_exp.pipeline.score import standardize
from flap_exp.pipeline.stage import stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("metric")
    a = ap.parse_args()
    with stage(f"standardize@{a.metric}"):
        scores, _ = load_tensors(f"results/score/{a.metric}.safetensors")
        units = standardize(scores, arch_of(read_json(PREPARE)))
        save_tensors(f"results/standardize/{a.metric}.safetensors", units, {"metric": a.metric})
