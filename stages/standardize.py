"""standardize METRIC [--calib CALIB]: the units the AL structures rank (groups [L, kv], channels [L, I]),
z-scored per layer and module -> results/standardize/[CALIB/]METRIC; search reads them for al_mm/al_am."""
import argparse

from flap_exp.pipeline.artifacts import paths
from flap_exp.pipeline.artifacts.io import load_tensors, read_json, save_tensors
from flap_exp.pipeline.artifacts.records import arch_of
from flap_exp.pipeline.steps.score import checked_scores, standardize
from flap_exp.pipeline.steps.stage import load_params, stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("metric")
    ap.add_argument("--calib")
    a = ap.parse_args()
    with stage(f"standardize@{a.calib + '-' if a.calib else ''}{a.metric}"):
        load_params()  # reads no parameter, but refuses a stale cells.yaml as every stage does
        arch, src = arch_of(read_json(paths.PREPARE)), paths.scores(a.metric, a.calib)
        units = standardize(checked_scores(*load_tensors(src), arch, a.metric, src), arch)
        save_tensors(paths.units(a.metric, a.calib), units, {"metric": a.metric, "calib": a.calib, "units": True})
