"""Per-channel running statistics, accumulated in float64 with Chan's parallel merge.

For a stream of row batches X (tokens x channels) we keep the count n, the mean, M2 = sum of squared
deviations from the mean, and the mean square. Merging two partial results is exact up to rounding and
does not suffer the cancellation of the naive sum-of-squares formula.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChannelStats:
    count: int
    mean: torch.Tensor  # float64 [C]
    m2: torch.Tensor  # float64 [C], sum of squared deviations from `mean`
    meansq: torch.Tensor  # float64 [C], mean of x**2

    @classmethod
    def empty(cls, channels: int, device=None) -> ChannelStats:
        z = lambda: torch.zeros(channels, dtype=torch.float64, device=device)  # noqa: E731
        return cls(0, z(), z(), z())

    @classmethod
    def of(cls, x: torch.Tensor) -> ChannelStats:
        """Statistics of one batch; `x` is [..., C] and is flattened over all leading dims."""
        # Float64 throughout (a float32 sum over ~1e3 tokens is only good to ~1e-7 relative; we promise 1e-9),
        # but the token sums as BLAS matrix-vector products and the centring/squaring in one buffer: 4-5x
        # cheaper than column reductions over a centred and a squared copy (measured, 1 thread, 1024 x 1536
        # activations: 6 ms against 27 ms).
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        n = x.shape[0]
        ones = x.new_ones(n)
        mean = (ones @ x) / n
        d = x - mean
        m2 = ones @ d.mul_(d)  # two-pass: no cancellation however large the mean is against the spread
        # mean(x^2) = m2 / n + mean^2 exactly; both terms are >= 0, so nothing cancels.
        return cls(n, mean, m2, m2 / n + mean * mean)

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Chan et al.'s pairwise combination (returns a new object)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        wb = other.count / n
        delta = other.mean - self.mean
        mean = self.mean + delta * wb
        m2 = self.m2 + other.m2 + delta * delta * (self.count * wb)
        meansq = self.meansq + (other.meansq - self.meansq) * wb
        return ChannelStats(n, mean, m2, meansq)

    def update(self, x: torch.Tensor) -> ChannelStats:
        return self.merge(ChannelStats.of(x))

    @property
    def var(self) -> torch.Tensor:
        """Unbiased (Bessel-corrected) variance over all tokens seen: FLAP's fluctuation F_j."""
        return self.m2 / max(self.count - 1, 1)

    def to_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.mean": self.mean, f"{prefix}.m2": self.m2, f"{prefix}.meansq": self.meansq,
                f"{prefix}.count": torch.tensor([self.count], dtype=torch.int64)}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], prefix: str) -> ChannelStats:
        return cls(int(d[f"{prefix}.count"][0]), d[f"{prefix}.mean"], d[f"{prefix}.m2"], d[f"{prefix}.meansq"])


@dataclass
class LayerStats:
    """Statistics of the inputs of one layer's o_proj ("attn") and down_proj ("mlp")."""

    attn: ChannelStats
    mlp: ChannelStats


def stats_to_tensors(stats: list[LayerStats]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, s in enumerate(stats):
        out.update(s.attn.to_dict(f"layers.{i}.attn"))
        out.update(s.mlp.to_dict(f"layers.{i}.mlp"))
    return out


def stats_from_tensors(d: dict[str, torch.Tensor]) -> list[LayerStats]:
    n = 1 + max(int(k.split(".")[1]) for k in d)
    return [LayerStats(ChannelStats.from_dict(d, f"layers.{i}.attn"), ChannelStats.from_dict(d, f"layers.{i}.mlp"))
            for i in range(n)]
