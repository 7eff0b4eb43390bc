"""`al_am`: FLAP's adaptive structure: one ranking of all k/v groups (or query-head slots) and MLP channels by
their standardized scores, each weighted by its exact parameter cost, cut at one global threshold."""
from __future__ import annotations

from ...catalogue import STRUCTURES


def units(groups, channels, arch, ratio, opts):
    from ...structures import al_am_units  # deferred on purpose: torch (compose lists structures)
    return al_am_units(groups, channels, arch, ratio, opts)


@STRUCTURES.register("al_am", rank=3, adaptive=True, units=units, obs_allocation=True, query_units=True)
def select(scores, arch, ratio, opts):
    from ...structures import al_am_query, standardized_units  # deferred on purpose: torch
    if opts.attn_unit == "query":
        return al_am_query(scores, arch, ratio, opts)
    return units(*standardized_units(scores, arch), arch, ratio, opts)
