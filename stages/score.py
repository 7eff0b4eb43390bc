"""score METRIC [--calib CALIB]: per-layer channel scores of the dense model -> results/score/[CALIB/]METRIC.
Without --calib the metric must be data-free (weight magnitude): no statistics are read."""
import argparse

from flap_exp.pipeline.artifacts import paths
from flap_exp.pipeline.artifacts.io import read_json, save_tensors
from flap_exp.pipeline.artifacts.records import load_checked_stats, load_prepared_model
from flap_exp.pipeline.steps.score import score
from flap_exp.pipeline.steps.stage import load_settings, stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("metric")
    ap.add_argument("--calib", help="the calibration whose statistics to score (none: data-free metric)")
    a = ap.parse_args()
    with stage(f"score@{a.calib + '-' if a.calib else ''}{a.metric}"):
        p = load_settings()
        record = read_json(paths.PREPARE)
        stats = load_checked_stats(paths.stats(a.calib), record, paths.manifest(a.calib))[0] if a.calib else None
        lm = load_prepared_model(p.model, record)
        tensors = score(lm.model, stats, a.metric, p.metrics[a.metric].get("square_attn"))
        save_tensors(paths.scores(a.metric, a.calib), tensors, {"metric": a.metric, "calib": a.calib})
