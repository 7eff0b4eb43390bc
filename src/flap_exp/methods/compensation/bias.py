"""`bias`: FLAP's baseline bias compensation, the removed channels' mean contribution (flap-spec.md §4)."""
from __future__ import annotations

from ...catalogue import COMPENSATIONS


@COMPENSATIONS.register("bias", rank=1, needs="stats")
def begin(inp):
    from ...compensation.bias import layer_bias  # deferred on purpose: torch (this module is read by compose)
    stats = inp.stats
    return lambda i, layer: layer_bias(layer, i, inp.sel, inp.arch, stats)
