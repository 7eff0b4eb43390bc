"""`al_mm`: adaptive layers, manual modules: remove_groups groups globally, MLP channels globally, each ranked by
its standardized score."""
from __future__ import annotations

from ...catalogue import STRUCTURES


def units(groups, channels, arch, ratio, opts):
    from ...structures import al_mm_units  # deferred on purpose: torch (compose lists structures)
    return al_mm_units(groups, channels, arch, ratio, opts)


@STRUCTURES.register("al_mm", rank=2, adaptive=True, units=units)
def select(scores, arch, ratio, opts):
    from ...structures import standardized_units  # deferred on purpose: torch
    return units(*standardized_units(scores, arch), arch, ratio, opts)
