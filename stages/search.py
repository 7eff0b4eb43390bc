"""search METRIC STRUCTURE RATIO: kept groups/channels per layer + achieved ratio -> selection.json."""
import argparse

from flap_exp.pipeline.cells import cell_key
from flap_exp.pipeline.io import load_tensors, read_json, write_json
from flap_exp.pipeline.records import PREPARE, arch_of
from flap_exp.pipeline.search import search
from flap_exp.pipeline.stage import load_params, stage, write_usage

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("metric")
    ap.add_argument("structure")
    ap.add_argument("ratio", type=float)
    a = ap.parse_args()
    key = cell_key(a.metric, a.structure, a.ratio)
    with stage(f"search@{key}") as usage:
        p = load_params()
        scores, _ = load_tensors(f"results/score/{a.metric}.safetensors")
        cell = {"metric": a.metric, "structure": a.structure, "ratio": a.ratio}
        rec = search(scores, arch_of(read_json(PREPARE)), cell, p["structures"][a.structure])
        write_json(f"results/search/{key}/selection.json", rec)
        write_usage(f"search@{key}", usage)
