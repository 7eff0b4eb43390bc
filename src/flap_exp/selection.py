"""Which key/value groups and MLP channels each layer keeps, and what that costs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch import ArchView


@dataclass
class Selection:
    keep_groups: list[torch.Tensor]  # per layer, bool [num_kv_heads]
    keep_channels: list[torch.Tensor]  # per layer, bool [intermediate_size]

    def removed_params(self, arch: ArchView) -> int:
        return sum(int((~g).sum()) * arch.group_params + int((~c).sum()) * arch.channel_params
                   for g, c in zip(self.keep_groups, self.keep_channels))

    def achieved_ratio(self, arch: ArchView) -> float:
        """Fraction of the decoder layers' attention + MLP weights removed (exact, from unit shapes)."""
        return self.removed_params(arch) / arch.total_params

    def channel_mask(self, layer: int, arch: ArchView) -> torch.Tensor:
        """Keep-mask over o_proj's input channels: each group spans G * head_dim consecutive channels."""
        return self.keep_groups[layer].repeat_interleave(arch.group_size * arch.head_dim)

    def to_json(self) -> dict:
        return {"kept_groups": [torch.nonzero(g).flatten().tolist() for g in self.keep_groups],
                "kept_channels": [torch.nonzero(c).flatten().tolist() for c in self.keep_channels]}

    @classmethod
    def from_json(cls, d: dict, arch: ArchView) -> "Selection":
        def mask(idx: list[int], n: int) -> torch.Tensor:
            m = torch.zeros(n, dtype=torch.bool)
            m[torch.tensor(idx, dtype=torch.long)] = True
            return m
        return cls([mask(g, arch.num_kv_heads) for g in d["kept_groups"]],
                   [mask(c, arch.intermediate_size) for c in d["kept_channels"]])
