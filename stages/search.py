"""search KEY METRIC STRUCTURE RATIO --input FILE: kept groups/channels per layer + achieved ratio ->
selection.json. FILE: the standardize stage's units for al_mm/al_am, the score stage's scores otherwise."""
from flap_exp.pipeline.artifacts import paths
from flap_exp.pipeline.artifacts.io import read_json, write_json
from flap_exp.pipeline.artifacts.records import arch_of
from flap_exp.pipeline.steps.search import search_file
from flap_exp.pipeline.steps.stage import cell_args, load_settings, stage

if __name__ == "__main__":
    key, cell, a = cell_args("input")
    with stage(f"search@{key}"):
        p = load_settings()
        rec = search_file(a.input, arch_of(read_json(paths.PREPARE)), cell, p.structures[cell["structure"]])
        write_json(paths.selection(key), rec)
