"""calibrate: dense statistics + windows + manifest (model/data identity, N, T, seed, dtype, versions)."""
from flap_exp.pipeline.calibrate import calibrate
from flap_exp.pipeline.io import read_json, save_tensors, write_json
from flap_exp.pipeline.records import MANIFEST, PREPARE, STATS, WINDOWS
from flap_exp.pipeline.stage import load_params, stage, write_usage
from flap_exp.pipeline.tracking import preflight
from flap_exp.sources import sha256_file

if __name__ == "__main__":
    with stage("calibrate") as usage:
        preflight()  # the first expensive stage: an unreachable MLflow fails here, not at the end
        p = load_params()
        stats, windows, manifest = calibrate(p["model"], p["data"]["calib"], read_json(PREPARE))
        save_tensors(STATS, stats, manifest)
        save_tensors(WINDOWS, {"windows": windows}, {"windows_sha256": manifest["windows_sha256"]})
        write_json(MANIFEST, {**manifest, "stats_sha256": sha256_file(STATS)})
        write_usage("calibrate", usage)
