"""Where and in what precision the model runs: one place that turns `--device`/`--dtype`/`--memory-budget`
strings into torch objects, checked before any long work starts (no `.cuda()` anywhere else).

Weights and activations run in the chosen dtype; statistics are always accumulated in float64 (stats.py).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
import sys

import torch

from .catalogue import DEVICES, DTYPE_NAMES
from .errors import FlapError

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """'auto' (a GPU when there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = spec or "auto"
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", spec):
        if not torch.cuda.is_available():
            raise FlapError(f"--device {spec}: no CUDA GPU is available here (torch {torch.__version__}); "
                            "use --device cpu or auto")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FlapError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    raise FlapError(f"unknown device {spec!r}; valid: {', '.join(DEVICES)} (or cuda:N)")


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A weight dtype the device can run: checked by running one small decoder-like op on it."""
    if isinstance(spec, torch.dtype):
        dtype = spec
    else:
        spec = spec or "float32"
        if spec not in DTYPES:
            raise FlapError(f"unknown dtype {spec!r}; valid: {', '.join(DTYPES)}")
        dtype = DTYPES[spec]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise FlapError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} cannot run bfloat16; "
                        "use float16 or float32")
    try:  # a matmul, a softmax and an RMS norm: what a decoder layer needs from the dtype
        x = torch.ones(2, 8, dtype=dtype, device=device)
        y = torch.softmax(x @ x.T, -1) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
        y.sum().item()
    except (RuntimeError, TypeError, NotImplementedError) as err:
        raise FlapError(f"--dtype {str(dtype).removeprefix('torch.')} cannot run on {device}: "
                        f"{str(err).splitlines()[0]}") from None
    return dtype


@functools.cache
def return_freed_memory_to_os() -> bool:
    """Make glibc give large freed blocks back to the OS at once (Linux; a no-op elsewhere).

    glibc raises its mmap threshold to the size of any large block that is freed, so that later blocks of
    that size come from the heap, which it rarely shrinks: loading and dropping one layer after another
    then grows the resident memory by about a layer per layer (measured: 2.5 GiB after 40 layers of 63 MB).
    A fixed 1 MiB threshold keeps every weight tensor in its own mapping, unmapped when it is freed.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 1 << 20))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
