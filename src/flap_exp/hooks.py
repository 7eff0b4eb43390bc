"""Forward hooks that are always removed, even when the forward pass raises."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn as nn


@contextlib.contextmanager
def input_hooks(targets: Mapping[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call fn(name, input_tensor) with the first positional input of each target module's forward."""
    handles = [m.register_forward_hook(lambda _m, args, _out, _n=name: fn(_n, args[0])) for name, m in targets.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
