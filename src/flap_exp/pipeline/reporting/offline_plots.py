"""`dvc plots show` that draws offline (`make plots`). DVC's page loads vega, vega-lite and vega-embed from a CDN
and stays blank without internet; this writes an HTML template for `dvc plots show --html-template` with those
three libraries inlined, at the versions dvc-render asks for, fetched once from the npm registry (`npm pack`)
into a cache folder. `python -m flap_exp.pipeline.reporting.offline_plots DIR` prints the template's path."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from ...atomic import atomic_file
from ...errors import FlapError

TEMPLATE = "plots.html"


def cdn_packages() -> list[tuple[str, str]]:
    """(package, version) of every script dvc-render's vega page loads, in its order."""
    from dvc_render.vega import VegaRenderer  # dvc_render: a dvc dependency, only for make plots
    found = re.findall(r"cdn\.jsdelivr\.net/npm/([a-z-]+)@([0-9.]+)", VegaRenderer.SCRIPTS)
    if not found:
        raise FlapError("dvc-render's vega page names no CDN scripts any more: make plots needs updating")
    return found


def _script(tarball: Path, package: str) -> str:
    """The minified browser build inside an npm tarball (package/build/PACKAGE.min.js)."""
    with tarfile.open(tarball) as tar:
        member = tar.extractfile(f"package/build/{package}.min.js")
        if member is None:
            raise FlapError(f"{tarball} has no build/{package}.min.js")
        return member.read().decode("utf-8")


def fetch(package: str, version: str, cache: Path) -> Path:
    """The package's tarball in `cache`, fetched with `npm pack` the first time."""
    tarball = cache / f"{package}-{version}.tgz"
    if tarball.is_file():
        return tarball
    if shutil.which("npm") is None:
        raise FlapError("make plots needs npm (Debian: apt-get install npm) to fetch vega once; the same figures "
                        "are PNG files in reports/figures/")
    cache.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["npm", "pack", "--silent", f"{package}@{version}"], cwd=cache, capture_output=True,
                          text=True)
    if done.returncode != 0 or not tarball.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FlapError(f"npm pack {package}@{version} failed: {last}")
    return tarball


def template(scripts: list[str]) -> str:
    """dvc-render's page layout with the given scripts inlined (`{plot_divs}` is the one placeholder it needs)."""
    # "</script" inside a library would end its tag early; vega's builds escape it, this makes sure
    safe = [s.replace("</script", "<\\/script") for s in scripts]
    inline = "".join(f"<script>{s}</script>\n" for s in safe)
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n<title>flap-exp: dvc plots</title>\n"
            f"{inline}<style>table {{border-spacing: 15px;}}</style>\n</head>\n"
            "<body>\n{plot_divs}\n</body>\n</html>\n")


def write_template(cache: Path) -> Path:
    """The offline template in `cache` (written once per set of library versions)."""
    packages = cdn_packages()
    out = cache / TEMPLATE
    tag = "<!-- " + " ".join(f"{p}@{v}" for p, v in packages) + " -->\n"
    if out.is_file() and out.read_text(encoding="utf-8").startswith(tag):
        return out
    text = tag + template([_script(fetch(p, v, cache), p) for p, v in packages])
    with atomic_file(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m flap_exp.pipeline.reporting.offline_plots CACHE_DIR", file=sys.stderr)
        return 2
    try:
        print(write_template(Path(args[0])))
    except FlapError as err:
        print(f"plots: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
