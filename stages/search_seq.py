"""search_seq METRIC STRUCTURE RATIO: a sequentially calibrated cell (Wanda-sp): selection + its statistics."""
from flap_exp.pipeline.io import load_tensors, read_json, save_tensors, sha256_tensor, write_json
from flap_exp.pipeline.records import MANIFEST, PREPARE, WINDOWS, load_prepared_model
from flap_exp.pipeline.search import search_sequential
from flap_exp.pipeline.stage import cell_args, load_params, stage, write_usage
from flap_exp.errors import FlapError

if __name__ == "__main__":
    key, cell = cell_args()
    with stage(f"search_seq@{key}") as usage:
        p = load_params()
        record, manifest = read_json(PREPARE), read_json(MANIFEST)
        windows = load_tensors(WINDOWS)[0]["windows"]
        if sha256_tensor(windows) != manifest["windows_sha256"]:
            raise FlapError(f"{WINDOWS} does not match {MANIFEST}; refusing it: rerun dvc repro -f calibrate")
        lm = load_prepared_model(p["model"], record)
        rec, stats = search_sequential(lm.model, windows, cell, p["metrics"][cell["metric"]], p["structures"][cell["structure"]],
                                       p["data"]["calib"].get("batch_size", 8))
        meta = {k: manifest[k] for k in ("model", "weights_sha256", "data", "nsamples", "seqlen", "seed", "dtype")}
        save_tensors(f"results/search/{key}/stats.safetensors", stats, {**meta, "sequential": key})
        write_json(f"results/search/{key}/selection.json", rec)
        write_usage(f"search@{key}", usage)
