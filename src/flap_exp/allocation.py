"""How much each layer removes: per-layer (k/v groups, MLP channels) counts under one parameter budget.

    uniform  every layer the ratio p (whole groups that fit in the attention share, channels fill the rest)
    log      SlimGPT's log-increasing profile (Ling et al., NeurIPS 2024, "incremental pruning ratio"):
             r_l proportional to ln(l + 2), scaled so the layers' mean is p, capped at `LOG_CAP`
    curve    a dynamic programme over layers: the counts that minimise the sum of the per-layer error
             curves (the greedy OBS pass's loss after removing g groups / c channels, each as a share of
             the loss of removing the whole projection: `relative_curves`) under the budget
    (FLAP's global threshold: the counts of an al_am selection, `counts_of`.)

Every allocation removes p of the attention + MLP weights to within a few channels per model; the counts
then go to a per-layer selector (greedy OBS). Pure functions of the architecture, the ratio and the curves.
"""
from __future__ import annotations

import math

import torch

from .arch import ArchView
from .errors import FlapError
from .selection import Selection

Counts = list[tuple[int, int]]  # per layer: (k/v groups removed, MLP channels removed)
Curve = tuple[torch.Tensor, torch.Tensor]  # (units removed [k], loss [k]) increasing in units, loss[0] = 0

# No layer of the log profile removes more than this share: the deepest layers stay alive, and the other
# layers take the excess (the profile is rescaled until its mean is the ratio).
LOG_CAP = 0.9


def log_ratios(num_layers: int, ratio: float, cap: float = LOG_CAP) -> list[float]:
    """Per-layer ratios r_l = min(cap, s ln(l + 2)) with mean exactly `ratio` (s found by rescaling)."""
    if not 0 <= ratio <= cap:
        raise FlapError(f"the log profile needs a ratio in [0, {cap}], got {ratio}")
    f = [math.log(i + 2) for i in range(num_layers)]
    s = ratio * num_layers / sum(f)
    for _ in range(200):  # the capped layers' excess goes to the others until the mean is the ratio
        r = [min(cap, s * v) for v in f]
        if abs(sum(r) - ratio * num_layers) < 1e-12:
            break
        free = sum(v for v, x in zip(f, r, strict=True) if x < cap)
        s += (ratio * num_layers - sum(r)) / max(free, 1e-12)
    return r


def layer_counts(arch: ArchView, ratios: list[float], min_groups: int = 0, min_channels: int = 0) -> Counts:
    """Counts per layer from per-layer ratios: floor(r * groups) whole groups, MLP channels filling the layer's
    share to the nearest channel (the UL "fill" rule), within the per-layer floors."""
    out = []
    for r in ratios:
        g = min(math.floor(r * arch.num_kv_heads), arch.num_kv_heads - min_groups)
        c = math.floor((r * arch.layer_params - g * arch.group_params) / arch.channel_params + 0.5)
        out.append((max(g, 0), max(0, min(c, arch.intermediate_size - min_channels))))
    return out


def counts_of(sel: Selection) -> Counts:
    return [(int((~g).sum()), int((~c).sum())) for g, c in zip(sel.keep_groups, sel.keep_channels, strict=True)]


def removed_ratio(arch: ArchView, counts: Counts) -> float:
    return sum(g * arch.group_params + c * arch.channel_params for g, c in counts) / arch.total_params


def _at(curve: Curve, n: int) -> float:
    """The loss after removing n units, linear between the curve's steps (a batched pass records every b)."""
    units, loss = curve
    xs, ys = units.double(), loss.double()
    if n > int(xs[-1]):
        raise FlapError(f"the error curve stops at {int(xs[-1])} units; {n} asked")
    j = int(torch.searchsorted(xs, torch.tensor(float(n), dtype=torch.float64)))
    if j < len(xs) and xs[j] == n:
        return float(ys[j])
    t = (n - xs[j - 1]) / (xs[j] - xs[j - 1])
    return float(ys[j - 1] + t * (ys[j] - ys[j - 1]))


def relative_curves(curves: list[tuple[Curve, Curve]]) -> list[tuple[Curve, Curve]]:
    """Each projection's error curve over its own last point (the loss of removing every unit): a share of the
    projection's whole output, comparable across layers where the absolute squared errors are not (the residual
    stream, and with it every projection's output, grows with depth). Needs curves run to the last unit.

    Measured on SmolLM2-135M at 0.5 (N=64, lsq, 32 WikiText-2 / 32 held-out Wikipedia windows): absolute curves
    1076.7 / 612.8 (they removed every attention group of the first ten layers), relative 270.9 / 141.2, curves
    over each layer's input-stream energy 626.2 / 275.0; chosen on the held-out windows (docs/results.md)."""
    def relative(curve: Curve) -> Curve:
        units, loss = curve
        whole = float(loss[-1])
        return units, loss / whole if whole > 0 else loss  # a dead projection: every removal is free

    return [(relative(attn), relative(mlp)) for attn, mlp in curves]


def curve_counts(arch: ArchView, ratio: float, curves: list[tuple[Curve, Curve]], step: int = 8,
                 min_groups: int = 0, min_channels: int = 0) -> Counts:
    """The counts minimising sum_l loss_attn_l(g_l) + loss_mlp_l(c_l) at a removed share of `ratio` (to within
    `step` channels): a knapsack over layers on a grid of one-channel cells, channels in steps of `step`."""
    if len(curves) != arch.num_layers:
        raise FlapError(f"{len(curves)} error curves for {arch.num_layers} layers")
    gcost = arch.group_params / arch.channel_params
    target = round(ratio * arch.total_params / arch.channel_params)
    cap = target + step + math.ceil(gcost)
    inf = float("inf")
    best = torch.full((cap + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    backs = []
    for (ga, ma) in curves:
        g_max = min(int(ga[0][-1]), arch.num_kv_heads - min_groups)
        c_max = min(int(ma[0][-1]), arch.intermediate_size - min_channels)
        cs = sorted({*range(0, c_max + 1, step), c_max})
        choices = [(g, c, round(g * gcost) + c, _at(ga, g) + _at(ma, c)) for g in range(g_max + 1) for c in cs]
        new = torch.full_like(best, inf)
        arg = torch.full((cap + 1,), -1, dtype=torch.long)
        for j, (_, _, k, e) in enumerate(choices):
            if k > cap:
                continue
            cand = best[:cap + 1 - k] + e
            better = cand < new[k:]
            new[k:] = torch.where(better, cand, new[k:])
            arg[k:] = torch.where(better, torch.tensor(j), arg[k:])
        backs.append((choices, arg))
        best = new
    window = torch.arange(cap + 1)
    ok = (window - target).abs() <= step // 2
    if not bool(torch.isfinite(best[ok]).any()):
        raise FlapError(f"no allocation reaches the ratio {ratio} within the per-layer floors")
    cell = int(torch.where(ok, best, torch.full_like(best, inf)).argmin())
    counts: Counts = []
    for choices, arg in reversed(backs):
        g, c, k, _ = choices[int(arg[cell])]
        counts.append((g, c))
        cell -= k
    counts = counts[::-1]
    # the grid leaves up to `step` channels (and the groups' rounded cost) off the budget: one channel at a
    # time, where it costs the least loss, until the removed share is the ratio to the nearest channel
    c_top = [min(int(m[0][-1]), arch.intermediate_size - min_channels) for _, m in curves]
    for _ in range(arch.num_layers * arch.intermediate_size):
        gap = round((ratio * arch.total_params - removed_ratio(arch, counts) * arch.total_params) / arch.channel_params)
        if gap == 0:
            break
        d = 1 if gap > 0 else -1
        options = [(_at(curves[i][1], c + d) - _at(curves[i][1], c), i) for i, (_, c) in enumerate(counts)
                   if 0 <= c + d <= c_top[i]]
        if not options:
            break
        i = min(options)[1]
        counts[i] = (counts[i][0], counts[i][1] + d)
    return counts
