"""How many decimals a logged number keeps (reports/metrics.json and MLflow alike): enough to tell apart what
the measurement can tell apart, so `dvc metrics diff` and the MLflow UI show no float noise. The CSV files
keep full precision (repr)."""
from __future__ import annotations

# (name suffix or prefix, decimals), first match wins. Perplexities to 1e-4 (the reference figures are
# quoted to 0.01; 1e-4 still separates two runs' rounding); ratios, accuracies and their standard errors to
# 1e-5 (one document of 10,042 is 1e-4); speedups to 1e-4; seconds to 0.01 s; memory to 0.1 MiB.
_RULES = (("_seconds", 2), ("_peak_rss_mib", 1), ("perplexity", 4), ("achieved_ratio", 5), ("zeroshot", 5),
          ("speedup", 4), ("tokens_per_s", 2))


def rounded(name: str, value: float) -> float:
    """`value` rounded for the quantity `name`; counts (ints) and unknown names unchanged."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    for key, digits in _RULES:
        if name.endswith(key) or name.startswith(key):
            return round(float(value), digits)
    return value
