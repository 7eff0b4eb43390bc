"""`ul_um`: uniform layers, uniform modules: every layer drops floor(p * groups) k/v groups and its MLP channels
take the rest of the layer's share p (ul_rounding fill; floor: the official floor(p * units) per module)."""
from __future__ import annotations

from ...catalogue import STRUCTURES


@STRUCTURES.register("ul_um", rank=0, per_layer=True, obs_allocation=True, query_units=True)
def select(scores, arch, ratio, opts):
    from ...selection import Selection  # deferred on purpose: torch (compose lists structures)
    from ...structures import ul_layer, ul_layer_query
    if opts.attn_unit == "query":
        sel = [ul_layer_query(a, m, arch, ratio, opts) for a, m in scores]
        return Selection.from_heads([h for h, _ in sel], [c for _, c in sel], arch)
    sel = [ul_layer(a, m, arch, ratio, opts) for a, m in scores]
    return Selection([g for g, _ in sel], [c for _, c in sel])
