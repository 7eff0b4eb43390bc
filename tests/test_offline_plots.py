"""make plots: DVC's interactive page with vega inlined (its default page loads them from a CDN: blank offline)."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from flap_exp.errors import FlapError
from flap_exp.pipeline.reporting import offline_plots


def _tarball(path: Path, package: str, body: str) -> None:
    data = body.encode()
    info = tarfile.TarInfo(f"package/build/{package}.min.js")
    info.size = len(data)
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(info, io.BytesIO(data))


def test_the_template_inlines_dvc_renders_own_library_versions_from_the_cache(tmp_path, monkeypatch):
    packages = offline_plots.cdn_packages()
    assert [p for p, _ in packages] == ["vega", "vega-lite", "vega-embed"]
    for p, v in packages:
        _tarball(tmp_path / f"{p}-{v}.tgz", p, f"window.{p.replace('-', '_')} = 1; // '</script>' in a string")
    monkeypatch.setattr(offline_plots.shutil, "which", lambda _: None)  # cached: npm is never needed
    out = offline_plots.write_template(tmp_path)
    text = out.read_text()
    assert "cdn.jsdelivr" not in text and text.count("<script>") == 3 and "{plot_divs}" in text
    assert text.index("window.vega = 1") < text.index("window.vega_lite = 1") < text.index("window.vega_embed = 1")
    assert "'<\\/script>'" in text  # a library's own "</script" cannot end its tag early
    from dvc_render.html import HTML
    page = HTML(text)
    page.with_element("<div id='p'></div>")
    assert "<div id='p'></div>" in page.embed() and "cdn.jsdelivr" not in page.embed()
    assert offline_plots.write_template(tmp_path) == out and out.read_text() == text  # written once


def test_without_npm_or_cache_the_error_is_one_line_pointing_at_the_pngs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(offline_plots.shutil, "which", lambda _: None)
    with pytest.raises(FlapError, match="needs npm"):
        offline_plots.write_template(tmp_path)
    assert offline_plots.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "reports/figures" in err and "Traceback" not in err
    assert not (tmp_path / offline_plots.TEMPLATE).exists()
