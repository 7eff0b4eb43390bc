"""Which key/value groups, query heads and MLP channels each layer keeps, and what that costs.

With query-head units (StructureOptions.attn_unit = "query") a layer may keep some query heads of a k/v
group: `keep_heads` then says which; a group is kept while any of its heads is. Every kept group of a layer
keeps the same number of query heads (one G' per layer, as stock attention needs). Costs, exactly: a query
head its q rows and o_proj columns (2 d hd), a k/v head its k and v rows (2 d hd), an MLP channel 3 d.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch import ArchView
from .errors import FlapError


@dataclass
class Selection:
    keep_groups: list[torch.Tensor]  # per layer, bool [num_kv_heads]
    keep_channels: list[torch.Tensor]  # per layer, bool [intermediate_size]
    # per layer, bool [num_heads]: query-head units; None: whole groups (each kept group keeps its G heads)
    keep_heads: list[torch.Tensor] | None = None

    @classmethod
    def from_heads(cls, keep_heads: list[torch.Tensor], keep_channels: list[torch.Tensor], arch: ArchView) -> Selection:
        """A query-head selection; its groups are those that keep any head. Refuses unequal heads per group."""
        groups = [h.view(arch.num_kv_heads, arch.group_size).any(1) for h in keep_heads]
        for i, (h, g) in enumerate(zip(keep_heads, groups, strict=True)):
            per_group = h.view(arch.num_kv_heads, arch.group_size).sum(1)[g]
            if per_group.numel() and bool((per_group != per_group[0]).any()):
                raise FlapError(f"layer {i} keeps {per_group.tolist()} query heads in its k/v groups; every kept "
                                "group of a layer must keep the same number")
        return cls(groups, keep_channels, keep_heads)

    def head_mask(self, layer: int, arch: ArchView) -> torch.Tensor:
        """Keep-mask over the layer's query heads."""
        if self.keep_heads is not None:
            return self.keep_heads[layer]
        return self.keep_groups[layer].repeat_interleave(arch.group_size)

    def removed_params(self, arch: ArchView) -> int:
        head = 2 * arch.hidden_size * arch.head_dim  # a query head (q rows + o columns) = a k/v head (k + v rows)
        return sum(int((~self.head_mask(i, arch)).sum()) * head + int((~g).sum()) * head
                   + int((~c).sum()) * arch.channel_params
                   for i, (g, c) in enumerate(zip(self.keep_groups, self.keep_channels, strict=True)))

    def achieved_ratio(self, arch: ArchView) -> float:
        """Fraction of the decoder layers' attention + MLP weights removed (exact, from unit shapes)."""
        return self.removed_params(arch) / arch.total_params

    def channel_mask(self, layer: int, arch: ArchView) -> torch.Tensor:
        """Keep-mask over o_proj's input channels: each group spans G * head_dim consecutive channels."""
        return self.head_mask(layer, arch).repeat_interleave(arch.head_dim)

    def to_json(self) -> dict:
        out = {"kept_groups": [torch.nonzero(g).flatten().tolist() for g in self.keep_groups],
               "kept_channels": [torch.nonzero(c).flatten().tolist() for c in self.keep_channels]}
        if self.keep_heads is not None:
            out["kept_heads"] = [torch.nonzero(h).flatten().tolist() for h in self.keep_heads]
        return out

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
        groups = [mask(g, arch.num_kv_heads, i, "kept_groups") for i, g in enumerate(lists["kept_groups"])]
        channels = [mask(c, arch.intermediate_size, i, "kept_channels") for i, c in enumerate(lists["kept_channels"])]
        if "kept_heads" not in d:
            return cls(groups, channels)
        heads = d["kept_heads"]
        if not isinstance(heads, list) or len(heads) != arch.num_layers:
            raise FlapError(f"{where}: kept_heads must list {arch.num_layers} layers (the model's)")
        sel = cls.from_heads([mask(h, arch.num_heads, i, "kept_heads") for i, h in enumerate(heads)], channels, arch)
        if any(not torch.equal(a, b) for a, b in zip(sel.keep_groups, groups, strict=True)):
            raise FlapError(f"{where}: kept_groups are not the groups of kept_heads")
        return sel
