"""Figures: kept groups/channels per layer of one cell, perplexity vs ratio, and the adaptive-layer heatmap."""
from __future__ import annotations

from pathlib import Path

from ...uncertainty import Z95
from .noise import zeroshot_stderr

#: An achieved ratio this far from its target is drawn as a miss (a hollow marker at the target); the
#: default rules land within one unit's cost per layer, i.e. well below this on any real model.
MISSED = 0.002


def _plt():
    # matplotlib: slow to import; report, summary and track import this module without always plotting
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def kept_per_layer(sel: dict, title: str, out: str | Path) -> None:
    plt = _plt()
    groups, chans = sel["kept_groups_per_layer"], sel["kept_channels_per_layer"]
    x = list(range(len(groups)))
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    a.bar(x, groups, color="tab:blue")
    a.axhline(sel["num_kv_heads"], color="grey", lw=0.8, ls="--")
    a.set_ylabel("kept k/v groups")
    b.bar(x, chans, color="tab:orange")
    b.axhline(sel["intermediate_size"], color="grey", lw=0.8, ls="--")
    b.set_ylabel("kept MLP channels")
    b.set_xlabel("layer")
    fig.suptitle(f"{title}  (removed {sel['achieved_ratio']:.3f})")
    fig.tight_layout()
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)


def levels_per_layer(rec: dict, title: str, out: str | Path) -> None:
    """kl_search's chosen levels per layer against the cell's ratio (top) and the best KL by candidates (bottom)."""
    plt = _plt()
    levels, hist = rec["levels"], rec["history"]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 5))
    a.bar(range(len(levels)), levels, color="tab:purple")
    a.axhline(rec["ratio"], color="grey", lw=0.8, ls="--")
    a.set_ylabel("removed share")
    a.set_xlabel("layer")
    b.plot([h["candidates"] for h in hist], [h["best_kl"] for h in hist], marker=".")
    b.set_xlabel("candidates evaluated")
    b.set_ylabel("best KL to dense")
    fig.suptitle(f"{title}  (KL {rec['uniform_kl']:.4f} uniform -> {rec['kl']:.4f})")
    fig.tight_layout()
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)


def ppl_vs_ratio(rows: list[dict], dense: float | None, out: str | Path) -> dict[str, list[float]]:
    """rows: {method, ratio, achieved_ratio, perplexity}; one line per method at the ACHIEVED ratio (what was
    removed), the nominal targets as dotted verticals; a cell that missed its target also gets a hollow
    marker at the target, joined to its point. The dense model is a dashed line. Returns the x values
    drawn per method line (for tests)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for nominal in sorted({r["ratio"] for r in rows}):
        ax.axvline(nominal, color="grey", ls=":", lw=0.8)
        ax.annotate(f"target {nominal:g}", (nominal, 1), xycoords=("data", "axes fraction"), fontsize=6,
                    color="grey", rotation=90, va="top", ha="right")
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["achieved_ratio"], r["perplexity"], r["ratio"]) for r in rows if r["method"] == method)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        _ci_bars(ax, [(r["achieved_ratio"], r["perplexity"], r.get("ppl_ci95")) for r in rows
                      if r["method"] == method], line.get_color())
        for achieved, ppl, nominal in pts:
            if abs(achieved - nominal) > MISSED:
                ax.plot([nominal, achieved], [ppl, ppl], color=line.get_color(), ls=":", lw=0.8)
                ax.plot([nominal], [ppl], marker="o", mfc="none", color=line.get_color())
    if dense is not None:
        ax.axhline(dense, color="black", ls="--", lw=1, label="dense")
    ax.set_xlabel("achieved ratio (attention + MLP weights removed); dotted: targets")
    ax.set_ylabel("perplexity (log; bars: 95% over windows)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    drawn = {ln.get_label(): [float(x) for x in ln.get_xdata()] for ln in ax.lines
             if not ln.get_label().startswith("_")}
    fig.tight_layout()
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)
    return drawn


def _ci_bars(ax, points: list[tuple[float, float, list | None]], color) -> None:
    """Vertical bars over (x, perplexity, its 95% interval or None): the record's `ppl_ci95`, asymmetric
    around the perplexity (symmetric on the log axis), drawn where recorded."""
    pts = [(x, y, ci) for x, y, ci in points if ci]
    if pts:
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], fmt="none", ecolor=color, capsize=3, lw=0.8,
                    yerr=[[y - ci[0] for _, y, ci in pts], [ci[1] - y for _, y, ci in pts]])


def kept_heatmap(sels: dict[str, dict], out: str | Path) -> None:
    """Fraction of k/v groups and of MLP channels kept, per layer (columns), per cell (rows)."""
    plt = _plt()
    names = sorted(sels)
    g = [[k / s["num_kv_heads"] for k in s["kept_groups_per_layer"]] for s in (sels[n] for n in names)]
    c = [[k / s["intermediate_size"] for k in s["kept_channels_per_layer"]] for s in (sels[n] for n in names)]
    fig, axes = plt.subplots(2, 1, figsize=(9, 1.2 + 0.5 * len(names) * 2), sharex=True)
    for ax, data, label in ((axes[0], g, "k/v groups (heads) kept"), (axes[1], c, "MLP channels kept")):
        im = ax.imshow(data, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(label, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03)
    axes[1].set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)


def ppl_vs_n(rows: list[dict], dense: float | None, out: str | Path) -> None:
    """Calibration ablation: perplexity vs the number of calibration windows N (log x), one line per
    corpus and target ratio; the achieved ratio of each line in its label."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[tuple[str, float], list[tuple[int, float, float, list | None]]] = {}
    for r in rows:
        corpus, _, n = str(r.get("calib")).rpartition("-")
        series.setdefault((corpus, r["ratio"]), []).append((int(n), r["perplexity"], r["achieved_ratio"],
                                                             r.get("ppl_ci95")))
    for (corpus, ratio), pts in sorted(series.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        pts.sort(key=lambda p: p[0])
        removed = sum(p[2] for p in pts) / len(pts)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) > 1 else "s",
                        label=f"{corpus}, target {ratio:g} (removed {removed:.3f})")
        _ci_bars(ax, [(p[0], p[1], p[3]) for p in pts], line.get_color())
    if dense is not None:
        ax.axhline(dense, color="black", ls="--", lw=1, label="dense")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("calibration windows N")
    ax.set_ylabel("perplexity (log; bars: 95% over windows)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)


def bars(values: dict[str, float | None], label: str, out: str | Path,
         errors: dict[str, float | None] | None = None) -> list[float | None]:
    """Horizontal bars, one per entry (None: not measured, left out), with a +- `errors[k]` bar where given.
    Returns the half-widths drawn, bar by bar (for tests)."""
    plt = _plt()
    items = [(k, v) for k, v in values.items() if v is not None]
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.35 * max(1, len(items))))
    half = [(errors or {}).get(k) for k, _ in items]
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue",
            xerr=[0.0 if h is None else h for h in half] if any(h is not None for h in half) else None,
            error_kw={"ecolor": "black", "capsize": 3, "lw": 1})
    for i, (_, v) in enumerate(items):
        ax.annotate(f"{v:.3g}", (v, i), fontsize=7, va="center", ha="left")
    ax.invert_yaxis()
    ax.set_xlabel(label)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)
    return half


def zeroshot_bars(rows: dict[str, dict], out: str | Path) -> list[float | None]:
    """Zero-shot average per labelled record, with 95% error bars (1.96 standard errors of the average)."""
    se = {k: zeroshot_stderr(r) for k, r in rows.items()}
    return bars({k: r.get("zeroshot_avg") for k, r in rows.items()},
                "zero-shot average accuracy (error bars: 95%, 1.96 standard errors)", out,
                {k: None if v is None else Z95 * v for k, v in se.items()})
