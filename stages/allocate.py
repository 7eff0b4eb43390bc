"""allocate KEY METRIC STRUCTURE RATIO --calib CALIB: structure kl_search's evolutionary search over per-layer
levels (fitness: the KL to the dense model on calibration windows) -> levels.json (levels, history) + levels.png."""
from flap_exp.pipeline.artifacts import paths
from flap_exp.pipeline.artifacts.io import read_json, write_json
from flap_exp.pipeline.artifacts.records import load_checked_windows, load_prepared_model
from flap_exp.pipeline.reporting.plots import levels_per_layer
from flap_exp.pipeline.steps.search import allocate
from flap_exp.pipeline.steps.stage import cell_args, load_settings, stage

if __name__ == "__main__":
    key, cell, a = cell_args("calib")
    with stage(f"allocate@{key}"):
        p = load_settings()
        windows, manifest = load_checked_windows(a.calib)
        lm = load_prepared_model(p.model, read_json(paths.PREPARE))
        print(f"allocate@{key}: level search on {windows.shape[0]} calibration windows", flush=True)
        rec = allocate(lm.model, windows, cell, p.structures[cell["structure"]],
                       p.calib.batch_size)
        meta = {k: manifest[k] for k in ("model", "weights_sha256", "data", "nsamples", "seqlen", "seed", "dtype")}
        write_json(paths.allocation(key), {**rec, "calib": a.calib, "calibration": meta})
        levels_per_layer(rec, key, paths.allocation_plot(key))
        print(f"allocate@{key}: KL {rec['uniform_kl']:.4f} (uniform) -> {rec['kl']:.4f} after "
              f"{rec['candidates']} candidates", flush=True)
