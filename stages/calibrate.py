"""calibrate CALIB CORPUS N: dense statistics + windows + manifest (model/data identity, N, T, seed, dtype,
versions) -> results/calibrate/CALIB/."""
import argparse

from flap_exp.pipeline.artifacts import paths
from flap_exp.pipeline.artifacts.io import read_json, save_tensors, write_json
from flap_exp.pipeline.reporting.mlflow_store import preflight
from flap_exp.pipeline.steps.calibrate import calibrate
from flap_exp.pipeline.steps.stage import load_settings, stage
from flap_exp.sources import sha256_file

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("calib")
    ap.add_argument("corpus")
    ap.add_argument("nsamples", type=int)
    a = ap.parse_args()
    with stage(f"calibrate@{a.calib}"):
        preflight()  # the first expensive stage: an unreachable MLflow fails here, not at the end
        p = load_settings()
        print(f"calibrate@{a.calib}: {a.nsamples} windows of {a.corpus}", flush=True)
        stats, windows, manifest = calibrate(p.model, p.calib, a.corpus, a.nsamples,
                                             read_json(paths.PREPARE))
        save_tensors(paths.stats(a.calib), stats, manifest)
        save_tensors(paths.windows(a.calib), {"windows": windows}, {"windows_sha256": manifest["windows_sha256"]})
        write_json(paths.manifest(a.calib), {**manifest, "stats_sha256": sha256_file(paths.stats(a.calib))})
