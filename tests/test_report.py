"""Report tables from evaluate-stage records: ratio misses are marked, zero-shot in the paper's layout."""
from flap_exp.pipeline.report import tables


def _row(metric, structure, ratio, achieved, ppl, zs=None):
    r = {"metric": metric, "structure": structure, "ratio": ratio, "compensate": metric == "wifv",
         "achieved_ratio": achieved, "perplexity": ppl}
    if zs:
        r["zeroshot"] = {"tasks": {t: {"score": v, "metric": "acc"} for t, v in zs.items()}, "limit": 10,
                         "lm_eval_version": "0.4.13", "source": "local"}
        r["zeroshot_avg"] = sum(zs.values()) / len(zs)
    return r


def test_tables_mark_missed_ratio_and_lay_out_zeroshot():
    dense = {**_row("dense", "", 0, 0.0, 20.0, {"piqa": 0.7, "boolq": 0.6}), "eval_data": {"name": "wikitext2"},
             "ppl_windows": 8, "seqlen": 128}
    rows = [_row("wifv", "al_am", 0.2, 0.2001, 25.0, {"piqa": 0.65, "boolq": 0.55}),
            _row("wanda_sp", "ul_um", 0.2, 0.1499, 27.0, {"piqa": 0.6, "boolq": 0.5})]
    md = tables(rows, dense)
    assert "| wifv | 25.00 / 60.00% |" in md  # within 0.005 of the target: no mark
    assert "27.00 / 55.00% (removed 0.150)" in md
    assert "## Zero-shot accuracy (%)" in md and "first 10 documents per task" in md
    assert "| method | ratio | piqa (acc) | boolq (acc) | average |" in md
    assert "| dense | 0 | 70.00 | 60.00 | 65.00 |" in md
    assert "| wanda_sp/ul_um (no bias) | 0.2 | 60.00 | 50.00 | 55.00 |" in md
