"""evaluate KEY --measure {ppl,zeroshot,speed} [--cell C --compensation NAME --comp FILE]: rebuild the pruned
model in memory (selection + the cell's compensation, FILE: its compensate stage's file, or an OBS cell's own
refit) and measure it -> results/evaluate/KEY/MEASURE.json.
KEY "dense" evaluates the unpruned model."""
import argparse

from flap_exp.pipeline.artifacts import paths
from flap_exp.pipeline.artifacts.io import read_json, write_json
from flap_exp.pipeline.artifacts.records import arch_of, eval_record, load_prepared_model
from flap_exp.pipeline.reporting.mlflow_store import preflight
from flap_exp.pipeline.steps.compensate import load_compensation, sample_warning
from flap_exp.pipeline.steps.evaluate import evaluate
from flap_exp.pipeline.steps.stage import load_settings, stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("key")
    ap.add_argument("--measure", choices=paths.MEASURES, default="ppl")
    ap.add_argument("--cell", help="search cell whose selection to apply")
    ap.add_argument("--compensation", default="none", help="the conf/compensation/ entry of the cell")
    ap.add_argument("--comp", help="the file of the cell's compensation (default: its compensate stage's)")
    a = ap.parse_args()
    name = f"{'evaluate' if a.measure == 'ppl' else a.measure}@{a.key}"
    with stage(name):
        preflight()
        p = load_settings()
        # only perplexity reads the evaluation corpora: a new one never reruns zero-shot or speed
        record = eval_record() if a.measure == "ppl" else read_json(paths.PREPARE)
        sel = read_json(paths.selection(a.cell)) if a.cell else None
        method = p.compensations[a.compensation]["method"] if sel else "none"
        comp_file = a.comp or paths.compensation(a.key)
        comps, comp = (load_compensation(comp_file, sel, arch_of(record), method, record)
                       if sel else (None, {"method": "none"}))
        lm = load_prepared_model(p.model, record)
        print(f"{name}: {a.measure}", flush=True)
        out = evaluate(lm, sel, comps, a.measure, p.eval, record,
                       load_dense=lambda: load_prepared_model(p.model, record).model, extra=a.measure == "ppl")
        cell = {k: sel[k] for k in ("metric", "structure", "ratio")} if sel else {}
        options = {k: v for k, v in comp.items() if k != "method"}
        warning = sample_warning(comp_file) if sel else None  # e.g. lsq on too few tokens
        write_json(paths.measurement(a.key, a.measure),
                   {**out, **cell, "cell": a.cell, "calib": (sel or {}).get("calib"), "compensation": a.compensation
                    if sel else "none", "compensation_method": comp["method"], "compensation_options": options,
                    "warnings": [warning] if warning else []})
