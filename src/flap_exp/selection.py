"""Which key/value groups and MLP channels each layer keeps, and what that costs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch import ArchView
from .errors import FlapError


@dataclass
class Selection:
    keep_groups: list[torch.Tensor]  # per layer, bool [num_kv_heads]
    keep_channels: list[torch.Tensor]  # per layer, bool [intermediate_size]

    def removed_params(self, arch: ArchView) -> int:
        return sum(int((~g).sum()) * arch.group_params + int((~c).sum()) * arch.channel_params
                   for g, c in zip(self.keep_groups, self.keep_channels, strict=True))

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
    def from_json(cls, d: dict, arch: ArchView, where: str = "selection") -> Selection:
        """Refuses (FlapError) a selection that does not fit `arch`: wrong layer count, an index that is
        not an integer in [0, n), or a repeated index (a hand-edited or foreign selection.json)."""
        def mask(idx, n: int, layer: int, key: str) -> torch.Tensor:
            if not isinstance(idx, list):
                raise FlapError(f"{where}: {key} of layer {layer} is not a list of indices")
            for j in idx:
                if type(j) is not int or not 0 <= j < n:
                    raise FlapError(f"{where}: {key} of layer {layer} holds {j!r}, not an index in [0, {n})")
            if len(set(idx)) != len(idx):
                dup = sorted(j for j in set(idx) if idx.count(j) > 1)[0]
                raise FlapError(f"{where}: {key} of layer {layer} lists index {dup} more than once")
            m = torch.zeros(n, dtype=torch.bool)
            m[torch.tensor(idx, dtype=torch.long)] = True
            return m

        if not isinstance(d, dict):
            raise FlapError(f"{where}: not a selection (expected a JSON object with kept_groups and kept_channels)")
        lists = {}
        for key in ("kept_groups", "kept_channels"):
            v = d.get(key)
            if not isinstance(v, list) or len(v) != arch.num_layers:
                got = f"{len(v)} layers" if isinstance(v, list) else ("nothing" if v is None else type(v).__name__)
                raise FlapError(f"{where}: {key} must list {arch.num_layers} layers (the model's), got {got}")
            lists[key] = v
        return cls([mask(g, arch.num_kv_heads, i, "kept_groups") for i, g in enumerate(lists["kept_groups"])],
                   [mask(c, arch.intermediate_size, i, "kept_channels") for i, c in enumerate(lists["kept_channels"])])
