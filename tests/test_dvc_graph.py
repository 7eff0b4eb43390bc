"""The pipeline's graph tells the truth: dvc.yaml's code deps are the import closure of each stage script,
every composed experiment x protocol x model yields consistent cells, and stage outputs are the paths
flap_exp.pipeline.artifacts.paths names."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import yaml

from flap_exp.pipeline.artifacts import paths
from flap_exp.pipeline.study import deps
from flap_exp.pipeline.study.cells import cells_from_params
from flap_exp.pipeline.study.compose import compose

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
PROTOCOLS = sorted(p.stem for p in (ROOT / "conf" / "protocol").glob("*.yaml"))
MODELS = {"smollm2-135m": [], "smollm2-135m-mha": [], "local": ["model.name=/models/llama"]}


def test_each_stage_depends_on_the_fingerprint_of_its_scripts_import_closure(tmp_path):
    text = (ROOT / "dvc.yaml").read_text()
    assert deps.regenerate(text, ROOT) == text, "run: python -m flap_exp.pipeline.study.deps --write dvc.yaml"
    stages = yaml.safe_load(text)["stages"]
    assert stages["code"] == {"cmd": "python -m flap_exp.pipeline.study.deps --fingerprints results/code",
                              "deps": ["src/flap_exp", "stages"], "outs": ["results/code"]}
    for name, st in stages.items():
        if name == "code":
            continue
        body = st.get("do", st)
        script = Path(re.match(r"python (stages/\S+\.py)", body["cmd"])[1])
        listed = [d for d in body["deps"] if isinstance(d, str)]
        per_method = "--compensation ${item.compensation}" in body["cmd"]  # a cell that runs one method
        want = f"results/code/{script.stem}{'-${item.method}' if per_method else ''}.txt"
        assert [d for d in listed if d.startswith(("results/code", "src/", "stages/"))] == [want], name
    deps.write_fingerprints(tmp_path, ROOT)
    for script in (ROOT / "stages").glob("*.py"):
        lines = (tmp_path / f"{script.stem}.txt").read_text().splitlines()
        files = [str(Path(f).relative_to(ROOT)) for f in deps.closure(script, ROOT / "src")]
        assert [ln.split("  ", 1)[1] for ln in lines] == [f"stages/{script.name}", *files]
        digest = hashlib.sha256((ROOT / files[0]).read_bytes()).hexdigest()
        assert lines[1] == f"{digest}  {files[0]}"


def test_fingerprints_change_exactly_for_the_scripts_that_run_an_edited_file(tmp_path):
    """Figures: the report and track scripts only (calibrate reaches the MLflow preflight, not the runs'
    code); the lsq pass: every per-method fingerprint of lsq and the scripts that import all methods, never
    a bias or none one."""
    import shutil
    for d in ("src", "stages"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "results" / "code"
    assert len(deps.write_fingerprints(out, tmp_path)) > 10
    assert deps.write_fingerprints(out, tmp_path) == []  # unchanged files are not rewritten (no DVC churn)

    def edit(rel: str) -> set[str]:
        f = tmp_path / rel
        f.write_text(f.read_text() + "\n# an edit\n")
        return {Path(n).stem for n in deps.write_fingerprints(out, tmp_path)}
    plots = edit("src/flap_exp/pipeline/reporting/plots.py")
    assert {s.split("-")[0] for s in plots} == {"allocate", "report", "track"}
    assert edit("src/flap_exp/compensation/lsq.py") == {"evaluate-lsq", "compensate-lsq"}
    assert "calibrate" in edit("src/flap_exp/arch.py")
    (tmp_path / "stages" / "standardize.py").unlink()  # a removed stage script: its fingerprints go too
    deps.write_fingerprints(out, tmp_path)
    assert not list(out.glob("standardize*"))


def test_dvc_yaml_carries_the_committed_cells_inline_so_dvc_lists_only_params_a_person_set():
    """DVC shows every key of a `vars` file as a parameter; dvc.yaml's inline copy of cells.yaml is not one."""
    import subprocess
    import sys
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    cells = yaml.safe_load((ROOT / "cells.yaml").read_text())
    assert dvc["vars"] == [{"cells": cells["cells"]}], "recompose: make compose"
    code = "import dvc.api, json; print(json.dumps(sorted(dvc.api.params_show())))"
    shown = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    top = set(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert set(yaml.safe_load(shown.stdout)) == top and "cells" not in top


def test_compose_copies_the_cells_into_the_pipeline_beside_params(tmp_path, capsys):
    from flap_exp.pipeline.study.compose import main
    pipeline = "vars:\n  # the cells, written by compose: BEGIN\n  - old: 1\n  # END\nstages: {}\n"
    (tmp_path / "dvc.yaml").write_text(pipeline)
    args = ["--conf", str(ROOT / "conf"), "--out", str(tmp_path / "params.yaml"), "experiment=smoke"]
    assert main(args) == 0 and "its copy in dvc.yaml" in capsys.readouterr().out
    cells = yaml.safe_load((tmp_path / "cells.yaml").read_text())["cells"]
    text = (tmp_path / "dvc.yaml").read_text()
    assert yaml.safe_load(text) == {"vars": [{"cells": cells}], "stages": {}} and "old" not in text
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # no block: nothing written, one line
    (tmp_path / "params.yaml").unlink()
    assert main([*args, "experiment=study"]) == 2
    err = capsys.readouterr().err
    assert "has no '# the cells, written by compose: BEGIN" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "params.yaml").exists() and (tmp_path / "dvc.yaml").read_text() == "stages: {}\n"


def test_closure_follows_relative_lazy_and_package_imports(tmp_path):
    src = tmp_path / "src" / "flap_exp"
    (src / "sub").mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "sub" / "__init__.py").write_text("")
    (src / "a.py").write_text("def f():\n    from .sub import b\n")  # lazy, relative, submodule via `from . import`
    (src / "sub" / "b.py").write_text("from ..c import x\n")
    (src / "c.py").write_text("x = 1\n")
    (src / "unused.py").write_text("")
    script = tmp_path / "s.py"
    script.write_text("import os\nfrom flap_exp.a import f\n")
    got = {str(Path(f).relative_to(tmp_path)) for f in deps.closure(script, tmp_path / "src")}
    assert got == {"src/flap_exp/__init__.py", "src/flap_exp/a.py", "src/flap_exp/sub/__init__.py",
                   "src/flap_exp/sub/b.py", "src/flap_exp/c.py"}


def test_closure_includes_every_method_module_of_a_registry(tmp_path):
    # A Registry imports its package's modules by name at run time (pkgutil), invisible to `import` statements:
    # a stage that declares one depends on every method module's file; on what a method imports to run only
    # in that method's own closure (select).
    src = tmp_path / "src" / "flap_exp"
    (src / "methods" / "axis").mkdir(parents=True)
    for f in ("__init__.py", "methods/__init__.py", "methods/axis/__init__.py", "heavy.py", "other.py"):
        (src / f).write_text("")
    (src / "methods" / "axis" / "one.py").write_text("def begin():\n    from flap_exp import heavy\n")
    (src / "methods" / "axis" / "two.py").write_text("def begin():\n    from flap_exp import other\n")
    (src / "catalogue.py").write_text('from .registry import Registry\n'
                                      'AXIS = Registry("axis", "flap_exp.methods.axis")\n')
    (src / "registry.py").write_text("class Registry: ...\n")
    script = tmp_path / "s.py"
    script.write_text("from flap_exp.catalogue import AXIS\n")

    def got(select=None):
        return {str(Path(f).relative_to(src)) for f in deps.closure(script, tmp_path / "src", select)}
    assert {"methods/axis/one.py", "methods/axis/two.py", "methods/axis/__init__.py"} <= got()
    assert not {"heavy.py", "other.py"} & got()
    one = got({"flap_exp.methods.axis": "one"})
    assert "heavy.py" in one and "other.py" not in one
    # the real catalogue: the lsq cells' compensate stage runs the lsq implementation, the bias cells' does not
    def real(method):
        return {str(Path(f).relative_to(ROOT))
                for f in deps.closure(ROOT / "stages/compensate.py", ROOT / "src", {deps.METHODS: method})}
    methods = {f"src/flap_exp/methods/compensation/{p.name}"
               for p in (ROOT / "src/flap_exp/methods/compensation").glob("*.py")}
    assert methods <= real("bias") and "src/flap_exp/compensation/lsq.py" in real("lsq")
    assert "src/flap_exp/compensation/lsq.py" not in real("bias")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_experiment_protocol_model_composes(experiment, protocol, model):
    params = yaml.safe_load(compose([f"experiment={experiment}", f"protocol={protocol}", f"model={model}",
                                     *MODELS[model]], ROOT / "conf"))
    assert params["protocol"] == protocol and "cells" not in params
    cells = cells_from_params(params)["cells"]
    assert cells["evaluate"] and cells["tables"]
    n = params["data"]["calib"]["nsamples"]
    assert n == {"quick": 128, "smoke": 8, "paper": 1024}[protocol]
    assert cells["reports"] == ("reports" if protocol == "quick" else f"reports/{protocol}")
    for name, table in cells["tables"].items():
        assert table["cells"] and set(table["cells"]) <= set(cells["evaluate"]), name
        for m in table["measure"]:
            assert set(table["cells"]) <= set(cells[m])
    # every compensation an evaluation reads is written by a stage: compensate, or an OBS cell's search (its refit)
    written = ({x["comp"] for t in ("compensate", "compensate_lsq") for x in cells[t].values()}
               | {x["refit"] for x in cells["search_obs"].values()})
    for key, item in cells["evaluate"].items():
        assert item["out"] == paths.measurement(key) and item["selection"] == paths.selection(item["cell"])
        assert any(item["cell"] in cells[t] for t in ("search", "search_seq", "search_obs", "search_kl"))
        assert item["comp"] in written
        if item["calib"] != "none":
            assert item["calib"] in cells["calibrate"]
    for key, c in cells["calibrate"].items():
        assert key == f"{c['corpus']}-{c['nsamples']}" and c["stats"] == paths.stats(key)
    if experiment == "study":  # the default calibration is the protocol's N; the ablation adds its own
        assert f"{params['data']['calib']['corpus']}-{n}" in cells["calibrate"]
        assert {"wiki-64", "wiki-128", "wiki-256", "wiki-1024", f"c4-{n}"} <= set(cells["calibrate"])
        assert set(cells["tables"]) == {"main", "ablation", "compensation", "calibration", "selection", "zeroshot",
                                        "speed"}


@pytest.mark.parametrize("structure", ["al_am", "al_mm"])
def test_search_from_the_standardize_stage_equals_search_from_scores(tmp_path, structure):
    """The AL search reads the units the standardize stage wrote: same selection as ranking the scores."""
    import torch

    from flap_exp.arch import ArchView
    from flap_exp.pipeline.artifacts.io import save_tensors
    from flap_exp.pipeline.steps.score import scores_to_tensors, standardize
    from flap_exp.pipeline.steps.search import search, search_file
    arch = ArchView(num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48)
    g = torch.Generator().manual_seed(0)
    scores = scores_to_tensors([(torch.rand(32, generator=g, dtype=torch.float64),
                                 torch.rand(48, generator=g, dtype=torch.float64)) for _ in range(3)])
    units = standardize(scores, arch)
    save_tensors(tmp_path / "u.safetensors", units, {"metric": "wifv", "calib": "c-8", "units": True})
    save_tensors(tmp_path / "s.safetensors", scores, {"metric": "wifv", "calib": "c-8"})
    cell = {"metric": "wifv", "structure": structure, "ratio": 0.4}
    want = search(scores, arch, cell, {})
    got = search_file(str(tmp_path / "u.safetensors"), arch, cell, {})
    assert got["kept_groups"] == want["kept_groups"] and got["kept_channels"] == want["kept_channels"]
    assert got["calib"] == "c-8" and 0.3 < got["achieved_ratio"] < 0.5
    from flap_exp.errors import FlapError
    with pytest.raises(FlapError, match="reads standardized units"):  # raw scores for an AL cell: refused
        search_file(str(tmp_path / "s.safetensors"), arch, cell, {})
