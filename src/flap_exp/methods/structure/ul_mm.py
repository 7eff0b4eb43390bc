"""`ul_mm`: uniform layers, manual modules: remove_groups // L groups per layer, MLP channels fill the budget."""
from __future__ import annotations

from ...catalogue import STRUCTURES


@STRUCTURES.register("ul_mm", rank=1, per_layer=True)
def select(scores, arch, ratio, opts):
    from ...selection import Selection  # deferred on purpose: torch (compose lists structures)
    from ...structures import groups_removed, ul_layer
    per_layer = groups_removed(opts, arch, ratio) // arch.num_layers
    sel = [ul_layer(a, m, arch, ratio, opts, per_layer) for a, m in scores]
    return Selection([g for g, _ in sel], [c for _, c in sel])
