"""score METRIC [--no-data]: per-layer channel scores of the dense model -> results/score/METRIC.safetensors."""
import argparse

from flap_exp.pipeline.io import read_json, save_tensors
from flap_exp.pipeline.records import MANIFEST, PREPARE, STATS, load_checked_stats, load_prepared_model
from flap_exp.pipeline.score import score
from flap_exp.pipeline.stage import load_params, stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("metric")
    ap.add_argument("--no-data", action="store_true", help="data-free metric: no statistics are read")
    a = ap.parse_args()
    with stage(f"score@{a.metric}"):
        p = load_params()
        record = read_json(PREPARE)
        stats, _ = (None, None) if a.no_data else load_checked_stats(STATS, record, MANIFEST)
        lm = load_prepared_model(p["model"], record)
        tensors = score(lm.model, stats, a.metric, p["metrics"][a.metric].get("square_attn"))
        save_tensors(f"results/score/{a.metric}.safetensors", tensors,
                     {"metric": a.metric})
