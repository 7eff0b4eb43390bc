"""compensate KEY --cell CELL --compensation NAME --calib CALIB [--stats FILE]: one cell's compensation
(NAME a conf/compensation/ entry, its method from the registry) -> results/compensate/KEY.safetensors.
bias reads statistics (the calibration's, or a sequential cell's own); lsq runs its own pass over the
calibration's windows; none reads nothing but the selection."""
import argparse

from flap_exp.compensation import get_compensation
from flap_exp.pipeline.artifacts import paths
from flap_exp.pipeline.artifacts.io import read_json, save_tensors
from flap_exp.pipeline.artifacts.records import arch_of, load_checked_stats, load_checked_windows, load_prepared_model
from flap_exp.pipeline.steps.compensate import compensate
from flap_exp.pipeline.steps.stage import load_settings, stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("key")
    ap.add_argument("--cell", required=True, help="search cell whose selection to compensate")
    ap.add_argument("--compensation", required=True, help="a key of conf/compensation/")
    ap.add_argument("--calib", required=True, help="the calibration it reads (none: nothing)")
    ap.add_argument("--stats", help="bias: the calibration's statistics, or a sequential cell's own")
    a = ap.parse_args()
    with stage(f"compensate@{a.key}"):
        p = load_settings()
        params = p.compensations[a.compensation]
        needs = get_compensation(params["method"]).needs
        record = read_json(paths.PREPARE)
        sel = read_json(paths.selection(a.cell))
        stats = windows = model = None
        if needs == "stats":  # only the calibration's own statistics have a manifest hash to check
            own = a.stats == paths.stats(a.calib)
            stats, _ = load_checked_stats(a.stats, record, paths.manifest(a.calib) if own else None)
        if needs == "windows":
            windows, _ = load_checked_windows(a.calib)
            print(f"compensate@{a.key}: {params['method']} ({params.get('form')}) on {windows.shape[0]} windows",
                  flush=True)
        if needs != "nothing":
            model = load_prepared_model(p.model, record).model
        tensors, meta = compensate(model, sel, arch_of(record), params, stats, windows,
                                   p.calib.batch_size)
        meta |= {"cell": a.cell, "compensation_name": a.compensation,
                 "weights_sha256": record["model"]["weights_sha256"]}
        save_tensors(paths.compensation(a.key), tensors, meta)
