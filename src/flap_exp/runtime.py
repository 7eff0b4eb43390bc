"""Where and in what precision the model runs: one place that turns `--device`/`--dtype`/`--memory-budget`
strings into torch objects, checked before any long work starts (no `.cuda()` anywhere else).

Weights and activations run in the chosen dtype; statistics are always accumulated in float64 (stats.py,
compensation/covariance.py, the lsq and OBS solves), and perplexity's log-sum-exp is float32 (ppl.py).
`--dtype auto` is bfloat16 where the device multiplies it natively, else float32; what it resolved to is
what runs and what manifests record (docs/results.md, 2026-12-03: what bf16 changes and saves).
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


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", aarch64 "Features"); empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware (what `--dtype auto` asks).

    CUDA: torch's own answer without emulation (Ampere and later). CPU: the instruction-set flags
    (avx512_bf16 or amx_bf16 on x86, bf16 on aarch64) and oneDNN able to use them, which is the path torch's
    bf16 matmul takes on a CPU. Not torch.backends.cpu.get_cpu_capability(): it says AVX512 on CPUs with and
    without the bf16 instructions alike; not oneDNN's check alone: it accepts any AVX512 core CPU, where bf16
    is emulated and slower than float32; and not a timed matmul: on a shared CPU the answer, and with it the
    precision of a cached result, would depend on what else is running."""
    if device.type == "cuda":
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch without the keyword
            return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu" or not _cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"}:
        return False
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A weight dtype the device can run: checked by running one small decoder-like op on it. "auto" is
    bfloat16 where `device` has native bf16 matmul (native_bf16), else float32."""
    if isinstance(spec, torch.dtype):
        dtype = spec
    else:
        spec = spec or "float32"
        if spec == "auto":
            return resolve_dtype(torch.bfloat16 if native_bf16(device) else torch.float32, device)
        if spec not in DTYPES:
            raise FlapError(f"unknown dtype {spec!r}; valid: auto, {', '.join(DTYPES)}")
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
