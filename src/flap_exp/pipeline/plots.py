"""Figures: kept groups/channels per layer of one cell, perplexity vs ratio, and the adaptive-layer heatmap."""
from __future__ import annotations

from pathlib import Path


def _plt():
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
    fig.savefig(out, dpi=100)
    plt.close(fig)


def ppl_vs_ratio(rows: list[dict], dense: float | None, out: str | Path) -> None:
    """rows: {method, ratio, perplexity}; one line per method, the dense model as a dashed line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["ratio"], r["perplexity"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    if dense is not None:
        ax.axhline(dense, color="black", ls="--", lw=1, label="dense")
    ax.set_xlabel("pruning ratio (attention + MLP weights removed)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


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
    fig.savefig(out, dpi=100)
    plt.close(fig)
