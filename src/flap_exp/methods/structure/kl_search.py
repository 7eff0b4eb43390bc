"""`kl_search`: metric obs only: per-layer levels searched by evolution, the fitness the KL to the dense model
(allocation_search.py); it has no selection from scores."""
from __future__ import annotations

from ...catalogue import STRUCTURES
from ...errors import FlapError


@STRUCTURES.register("kl_search", rank=6, obs_allocation=True,
                    obs_only="searches the OBS pass's allocation by KL")
def select(scores, arch, ratio, opts):
    raise FlapError("structure kl_search searches the OBS pass's allocation by KL: use it with metric obs")
