"""search_seq KEY METRIC STRUCTURE RATIO --calib CALIB [--levels LEVELS] [--refit FILE]: a sequentially calibrated
cell (Wanda-sp, OBS) on the calibration's windows: selection + its own statistics. LEVELS: kl_search's levels
(allocate stage). FILE: the OBS pass's own lsq refit, written as the compensate stage's file (search_obs cells)."""
from flap_exp.pipeline.artifacts import paths
from flap_exp.pipeline.artifacts.io import read_json, save_tensors, write_json
from flap_exp.pipeline.artifacts.records import arch_of, load_checked_windows, load_prepared_model
from flap_exp.pipeline.steps.compensate import compensation_tensors
from flap_exp.pipeline.steps.search import search_sequential, searched_levels
from flap_exp.pipeline.steps.stage import cell_args, load_settings, stage

if __name__ == "__main__":
    key, cell, a = cell_args("calib", optional=("levels", "refit"))
    with stage(f"search_seq@{key}", usage_name=f"search@{key}"):  # track reads search@KEY
        p = load_settings()
        windows, manifest = load_checked_windows(a.calib)
        record = read_json(paths.PREPARE)
        lm = load_prepared_model(p.model, record)
        print(f"search_seq@{key}: sequential calibration on {windows.shape[0]} windows", flush=True)
        rec, stats, refit = search_sequential(lm.model, windows, cell, p.metrics[cell["metric"]],
                                              p.structures[cell["structure"]], p.calib.batch_size,
                                              searched_levels(a.levels, cell) if a.levels else None, bool(a.refit))
        meta = {k: manifest[k] for k in ("model", "weights_sha256", "data", "nsamples", "seqlen", "seed", "dtype")}
        selection = {**rec, "calib": a.calib}
        if refit is not None:
            tensors, comp_meta = compensation_tensors(*refit, selection, arch_of(record), windows)
            weights = record["model"]["weights_sha256"]
            save_tensors(a.refit, tensors, {**comp_meta, "cell": key, "weights_sha256": weights})
        save_tensors(paths.seq_stats(key), stats, {**meta, "sequential": key})
        write_json(paths.selection(key), selection)
