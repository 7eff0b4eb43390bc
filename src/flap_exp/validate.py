"""Check every user-given option before the long work (loading weights, calibration): one-line FlapErrors.

Pure checks (values in, FlapError or a list of warnings out); the CLI and the pipeline's compose call them.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

from .errors import FlapError
from .jsonfile import parse_json_file
from .manifest import MANIFEST, unrecorded_files
from .sources import cache_root
from .tempfiles import HOST, temp_prefix
from .units import mib


def check_int(name: str, value, minimum: int, why: str = "", allow_none: bool = False) -> None:
    """`value` is an integer >= minimum (booleans are not integers here)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise FlapError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise FlapError(f"{name} must be at least {minimum}{why}, got {value}")


def model_dir(spec: str) -> Path | None:
    """The directory a model spec loads from, where it is one (embedded cache or local dir); else None."""
    from .models import EMBEDDED  # models imports torch and transformers: only when a spec is resolved
    if spec in EMBEDDED:
        return cache_root() / "models" / spec
    return Path(spec) if os.path.isdir(spec) else None


def peek_arch(spec: str):
    """The model's ArchView from its config alone (no weights), when a config.json is at hand; else None.
    A config of a non-LLaMA model raises its FlapError here, before any weight is read."""
    folder = model_dir(spec)
    if folder is None or not (folder / "config.json").is_file():
        return None
    from .arch import ArchView  # arch imports torch: only when a config is at hand
    try:
        config = read_config(folder)
    except (OSError, ValueError):
        return None  # load_model reports it with its own message
    return ArchView.from_config(config)


def config_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for an inconsistent config: newer versions validate it in a strict dataclass
    (e.g. a hidden size that heads do not divide without an explicit head_dim)."""
    try:
        from huggingface_hub.errors import StrictDataclassError  # huggingface_hub: slow, only on reading a config
    except ImportError:  # an older huggingface_hub: ValueError only
        return (ValueError,)
    return (ValueError, StrictDataclassError)


def config_message(err: BaseException) -> str:
    """The one line that says what is wrong with a config (the validator's own cause where there is one)."""
    cause = err.__cause__ or err
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(cause).__name__


def read_config(folder):
    """AutoConfig of a model directory; an inconsistent config.json is one FlapError (OSError passes through)."""
    # transformers (and modeling, which imports it): heavy, only when a config.json is read
    from transformers import AutoConfig

    from . import modeling  # noqa: F401  (flap_llama configs)
    errors = tuple(e for e in config_errors() if e is not ValueError)
    try:
        return AutoConfig.from_pretrained(folder)
    except errors as err:
        raise FlapError(f"{folder}/config.json is not a consistent model config: {config_message(err)}") from None


def _nearest_existing(p: Path) -> Path:
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _probe_writable(folder: Path, out: str) -> None:
    """Create and remove a pid-named directory in `folder`: os.access says yes to root on read-only mounts."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=temp_prefix("write-probe"), dir=folder))
    except OSError as err:
        raise FlapError(f"--out {out}: cannot create anything in {folder} ({err.strerror})") from None


# mkdtemp's and token_hex(4)'s random suffixes are 8 characters; a pid may grow to 7 digits (pid_max 4194304)
_TEMP_SUFFIX, _PID_DIGITS = 8, 7


def check_name_length(folder: Path, name: str, out: str) -> None:
    """The longest sibling flap-exp writes beside `name` (`.NAME.old-PID-HOST-XXXXXXXX`) fits the filesystem."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255  # the common limit (ext4, xfs, btrfs, tmpfs)
    longest = len(f".{name}.old-{'9' * _PID_DIGITS}-{HOST}-") + _TEMP_SUFFIX
    if longest > limit:
        raise FlapError(f"--out {out}: its name is too long: flap-exp writes a temporary sibling of {longest} "
                        f"characters and the filesystem allows {limit}; use a name of at most "
                        f"{len(name) - (longest - limit)} characters")


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse before the work when the filesystem of `folder` (or its nearest existing parent) has less than
    `need` bytes free."""
    base = _nearest_existing(folder)
    try:
        free = shutil.disk_usage(base).free
    except OSError:
        return  # nothing to measure: the write itself reports a full disk in one line (atomic.py)
    if free < need:
        raise FlapError(f"{what}: about {mib(need)} will be written to {base} but only {mib(free)} are free; "
                        "free some space or choose another place")


def estimate_pruned_bytes(spec: str, ratio: float, itemsize: int) -> int | None:
    """Bytes a pruned copy of the model takes (an upper bound: every tensor of the dense checkpoint at
    `itemsize` bytes, less `ratio` of the decoder's attention+MLP weights), from the checkpoint's headers
    alone; None when the weights are not on disk yet."""
    folder = model_dir(spec)
    if folder is None or not folder.is_dir():
        return None
    from .shards import Checkpoint  # shards imports torch: only when the weights are on disk
    try:
        ckpt = Checkpoint(folder)
    except FlapError:
        return None  # reported by the load with its own message
    numel = sum(math.prod(info["shape"]) for info in ckpt.info.values())
    arch = peek_arch(spec)
    removed = int(ratio * arch.total_params) if arch is not None else 0
    return (numel - removed) * itemsize + (1 << 20)  # + 1 MiB for the config, tokenizer and manifest


def check_not_pruned(spec: str, what: str = "--model") -> None:
    """A pruned directory as the model to prune: refused (its ratio would be counted against the dense widths)."""
    folder = model_dir(spec)
    if folder is None:
        return
    flap = (folder / MANIFEST).is_file()
    if not flap and (folder / "config.json").is_file():
        with_type = parse_json_file(folder / "config.json", "fix or remove it").get("model_type")
        flap = str(with_type).startswith("flap_")  # every pruned type (flap_llama, flap_qwen2, ...)
    if flap:
        raise FlapError(f"{what} {spec} is already a pruned model; pruning it again is not supported (its ratio "
                        "would count against the dense widths): prune the base model with the total ratio instead")


def check_cache_usable() -> None:
    """The model cache (FLAP_EXP_CACHE) can be created and written, before a first conversion."""
    root = cache_root()
    base = _nearest_existing(root)
    if not base.is_dir():
        raise FlapError(f"the model cache {root} cannot be created: {base} is a file (set FLAP_EXP_CACHE)")
    if not os.access(base, os.W_OK | os.X_OK):
        raise FlapError(f"the model cache {root} is not writable (set FLAP_EXP_CACHE to a writable directory)")


def check_out_dir(out: str, model_spec: str | None = None, overwrite: bool = False) -> Path:
    """`--out` may be written: a new path in a writable directory, an empty directory, or (with `overwrite`)
    a flap-exp pruned directory. Never a file, a symlink, an unrelated directory or the input model's."""
    if not str(out).strip():
        raise FlapError("--out is empty")
    path = Path(os.path.abspath(out))
    if model_spec is not None and (m := model_dir(model_spec)) is not None and m.exists():
        r, m = path.resolve(), m.resolve()
        if r == m or m in r.parents or r in m.parents:
            where = "is" if r == m else "is inside" if m in r.parents else "contains"
            raise FlapError(f"--out {out} {where} the input model's directory {m}; choose a path outside it")
    cwd = Path(os.getcwd()).resolve()
    if path.parent == path or path.resolve() == cwd or path.resolve() in cwd.parents:
        raise FlapError(f"--out {out} is the current directory or one above it; choose a new path")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise FlapError(f"--out {out}: {base} is a file, so nothing can be created inside it")
    check_name_length(base, path.name, out)
    _probe_writable(base, out)
    if os.path.lexists(path):
        if path.is_symlink():
            raise FlapError(f"--out {out} is a symbolic link; refusing to replace it (choose a new path)")
        if not path.is_dir():
            raise FlapError(f"--out {out} is an existing file; refusing to replace it (choose a new path)")
        try:
            empty = not any(path.iterdir())
        except OSError as err:
            raise FlapError(f"--out {out}: cannot read the existing directory ({err.strerror})") from None
        if empty:
            return path  # an empty directory: nothing to lose
        if not (path / MANIFEST).is_file():
            raise FlapError(f"--out {out} is an existing directory that is not a flap-exp pruned model "
                            f"(no {MANIFEST}); refusing to replace it (choose a new path)")
        if not overwrite:
            raise FlapError(f"--out {out} already holds a flap-exp pruned model; pass --overwrite to replace it")
        _refuse_user_files(path, out)
    return path


def _refuse_user_files(path: Path, out: str) -> None:
    """--overwrite replaces what flap-exp wrote, never what the user added inside the directory."""
    manifest = parse_json_file(path / MANIFEST, "refusing to replace it (remove the directory yourself)")
    added = unrecorded_files(path, manifest)
    if added:
        more = f" and {len(added) - 5} more" if len(added) > 5 else ""
        raise FlapError(f"--out {out} holds files flap-exp did not write ({', '.join(added[:5])}{more}); "
                        "--overwrite would delete them: move them out first, or choose a new path")


def check_structure_options(arch, structure: str, ratio: float, min_groups: int, min_channels: int,
                            remove_groups: int | None) -> list[str]:
    """Per-layer minimums and the MM group count against the model's widths; errors when the target ratio
    cannot be met at all, warnings (returned) for options the structure ignores."""
    L, kv, inter = arch.num_layers, arch.num_kv_heads, arch.intermediate_size
    if min_groups > kv:
        raise FlapError(f"--min-groups {min_groups} is above the model's {kv} k/v groups per layer")
    if min_channels > inter:
        raise FlapError(f"--min-channels {min_channels} is above the model's {inter} MLP channels per layer")
    warnings = []
    target = ratio * arch.total_params
    removable = L * ((kv - min_groups) * arch.group_params + (inter - min_channels) * arch.channel_params)
    if target > removable:
        raise FlapError(f"ratio {ratio} cannot be met: --min-groups {min_groups} / --min-channels {min_channels} "
                        f"leave at most {removable / arch.total_params:.4f} of the weights removable")
    if remove_groups is not None:
        if structure not in ("ul_mm", "al_mm"):
            warnings.append(f"--remove-groups is used by the MM structures (ul_mm, al_mm) only; ignored by {structure}")
        elif remove_groups > L * kv:
            raise FlapError(f"--remove-groups {remove_groups} is above the model's {L * kv} k/v groups "
                            f"({L} layers x {kv})")
        else:
            per_layer = remove_groups // L if structure == "ul_mm" else None
            if per_layer is not None and per_layer > kv - min_groups or remove_groups > L * (kv - min_groups):
                raise FlapError(f"--remove-groups {remove_groups} cannot be met with --min-groups {min_groups} "
                                f"({kv} k/v groups per layer, {L} layers)")
            if remove_groups * arch.group_params > target + 1e-9 * arch.total_params:
                share = remove_groups * arch.group_params / arch.total_params
                raise FlapError(f"ratio {ratio} cannot be met: --remove-groups {remove_groups} alone removes "
                                f"{share:.4f} of the weights")
    return warnings
