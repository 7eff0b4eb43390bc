"""A list[LayerComp] as flat safetensors tensors and back, checked against the selection on load.

Keys: `layers.{i}.o_proj.bias`, `layers.{i}.down_proj.bias` (every layer) and, for reconstructing methods,
`layers.{i}.o_proj.weight` [hidden, kept o_proj inputs] and `layers.{i}.down_proj.weight`
[hidden, kept MLP channels]. `none` is the empty dict.
"""
from __future__ import annotations

import torch

from ..errors import FlapError
from .base import LayerComp

_FIELDS = {"o_proj.bias": "o_bias", "down_proj.bias": "down_bias",
           "o_proj.weight": "o_weight", "down_proj.weight": "down_weight"}


def comps_to_tensors(comps: list[LayerComp] | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, c in enumerate(comps or []):
        for key, attr in _FIELDS.items():
            t = getattr(c, attr)
            if t is not None:
                out[f"layers.{i}.{key}"] = t.detach().cpu().contiguous()
    return out


def comps_from_tensors(t: dict[str, torch.Tensor], sel, arch, where: str = "compensation") -> list[LayerComp] | None:
    """LayerComps from `t`, refused unless every tensor fits `sel` on `arch` and is finite."""
    if not t:
        return None
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in t.items():
        parts = k.split(".", 2)
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in _FIELDS:
            raise FlapError(f"{where}: unexpected tensor {k!r}")
        by_layer.setdefault(int(parts[1]), {})[_FIELDS[parts[2]]] = v
    if sorted(by_layer) != list(range(arch.num_layers)):
        raise FlapError(f"{where}: holds layers {sorted(by_layer)[:3]}..., the model has {arch.num_layers}")
    comps = []
    for i in range(arch.num_layers):
        d = by_layer[i]
        kept = {"o_weight": int(sel.channel_mask(i, arch).sum()), "down_weight": int(sel.keep_channels[i].sum())}
        want = {"o_bias": (arch.hidden_size,), "down_bias": (arch.hidden_size,),
                "o_weight": (arch.hidden_size, kept["o_weight"]),
                "down_weight": (arch.hidden_size, kept["down_weight"])}
        for attr in ("o_bias", "down_bias"):
            if attr not in d:
                raise FlapError(f"{where}: layer {i} has no {attr.replace('_bias', '_proj')} bias")
        for attr, v in d.items():
            if tuple(v.shape) != want[attr]:
                raise FlapError(f"{where}: layer {i} {attr} has shape {tuple(v.shape)}, the selection needs "
                                f"{want[attr]}; refusing it")
            if not bool(torch.isfinite(v).all()):
                raise FlapError(f"{where}: layer {i} {attr} holds NaN or Inf; refusing it")
        comps.append(LayerComp(d["o_bias"], d["down_bias"], d.get("o_weight"), d.get("down_weight")))
    return comps
