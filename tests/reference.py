"""Independent re-derivations (plain numpy) used by the tests: no flap_exp code inside."""
from __future__ import annotations

import numpy as np
import torch


def capture_inputs(model, windows):
    """o_proj and down_proj inputs of every layer over a full dense forward: {layer: (A [M, H*hd], X [M, I])}."""
    got, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        for key, mod in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
            def hook(m, a, o, i=i, key=key):  # returns None: a hook's return value would replace the output
                got[(i, key)] = a[0].reshape(-1, a[0].shape[-1]).double().numpy()
            handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    return {i: (got[(i, "attn")], got[(i, "mlp")]) for i in range(len(model.model.layers))}


def metric_np(name: str, w: np.ndarray, x: np.ndarray | None) -> np.ndarray:
    if name == "ifv":
        return x.var(0, ddof=1)
    if name == "wifv":
        return x.var(0, ddof=1) * (w ** 2).sum(0)
    if name in ("wifn", "wanda_sp"):
        return np.sqrt((x ** 2).mean(0)) * np.abs(w).mean(0)
    if name == "weight_magnitude":
        return np.sqrt((w ** 2).sum(0))
    raise KeyError(name)


def zscore_rows(m: np.ndarray) -> np.ndarray:
    return (m - m.mean(1, keepdims=True)) / m.std(1, ddof=1, keepdims=True)
