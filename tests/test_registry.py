"""A method is one file: a toy compensation registered from a single module outside the package (named in
FLAP_EXP_PLUGINS) is found by the CLI's choices and errors, conf validation, the pipeline's cells, a pruned
model's manifest and the MLflow run params; and the registry itself (order, errors, facts)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flap_exp.errors import FlapError
from flap_exp.registry import Registry

from helpers.models import save_model_dir

TOY = '''
"""`toy`: half of FLAP's bias (a test method, one file)."""
from flap_exp.catalogue import COMPENSATIONS


@COMPENSATIONS.register("toy", needs="stats")
def begin(inp):
    from flap_exp.compensation.bias import layer_bias

    def step(i, layer):
        c = layer_bias(layer, i, inp.sel, inp.arch, inp.stats)
        c.o_bias, c.down_bias = 0.5 * c.o_bias, 0.5 * c.down_bias
        return c
    return step
'''

CHECKS = '''
import contextlib, io, json, sys
from flap_exp import cli
from flap_exp.catalogue import COMPENSATIONS, check_compensation_params
from flap_exp.pipeline.study import cells
from flap_exp.pipeline.reporting.tracking import run_params

out = {"names": list(COMPENSATIONS)}
with contextlib.redirect_stdout(io.StringIO()) as help_text, contextlib.suppress(SystemExit):
    cli.main(["prune", "--help"])
out["help"] = help_text.getvalue()
with contextlib.redirect_stderr(io.StringIO()) as err:
    out["bad_rc"] = cli.main(["prune", "--model", "nowhere", "--out", "x", "--compensation", "toys"])
out["bad_err"] = err.getvalue()
check_compensation_params({"method": "toy"})
table = cells.expand_study({"t": {"blocks": {"b": {"metrics": ["wifv"], "structures": ["al_am"], "ratios": [0.5],
                                                   "compensation": ["bias", "toy"]}}}},
                           {"wifv": {}}, {"bias": {"method": "bias"}, "toy": {"method": "toy"}},
                           {"corpus": "wiki", "nsamples": 128})
out["cells"] = json.dumps(table)
cell = {"key": "wifv-al_am-0.5-wiki-128-toy", "metric": "wifv", "structure": "al_am", "ratio": 0.5,
        "compensation": "toy", "compensation_method": "toy"}
params = {"model": {"name": "m"}, "data": {"eval": {"corpus": "wikitext2"}}, "eval": {"seqlen": 8},
          "metrics": {"wifv": {}}, "structures": {"al_am": {}}}
record = {"model": {"weights_sha256": "0"}, "eval": {"text_sha256": "0"}, "versions": {}}
out["mlflow"] = run_params(cell, params, record, {})
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("plugin")
    (root / "toy_comp.py").write_text(textwrap.dedent(TOY))
    pypath = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": pypath, "FLAP_EXP_PLUGINS": "toy_comp", "HF_HUB_OFFLINE": "1"}


def test_a_toy_compensation_from_one_file_reaches_every_surface(plugin):
    r = subprocess.run([sys.executable, "-c", CHECKS], env=plugin, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert got["names"] == ["none", "bias", "lsq", "toy"]  # ranked methods first, then plugins by name
    assert "{none,bias,lsq,toy}" in got["help"]
    assert got["bad_rc"] == 2 and "known compensations: none, bias, lsq, toy" in got["bad_err"]
    assert "wifv-al_am-0.5-wiki-128-toy" in got["cells"] and "wifv-al_am-0.5-wiki-128-bias" in got["cells"]
    assert got["mlflow"]["compensation"] == got["mlflow"]["compensation.method"] == "toy"


def test_a_toy_compensation_prunes_and_its_manifest_names_it(plugin, tmp_path):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(40)]
    save_model_dir(tmp_path / "model", words)
    (tmp_path / "corpus.txt").write_text(" ".join(rng.choices(words, k=2000)))
    common = ["--model", str(tmp_path / "model"), "--calib", "text", "--calib-path", str(tmp_path / "corpus.txt"),
              "--nsamples", "8", "--seqlen", "16", "--ratio", "0.3"]
    outs = {}
    for comp in ("toy", "bias"):
        r = subprocess.run([sys.executable, "-m", "flap_exp.cli", "prune", *common, "--compensation", comp,
                            "--out", str(tmp_path / comp)], env=plugin, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[comp] = json.loads((tmp_path / comp / "flap_manifest.json").read_text())
    assert outs["toy"]["compensation"] == {"method": "toy"}
    assert outs["toy"]["selection"] == outs["bias"]["selection"]  # a compensation never changes the selection
    from safetensors.torch import load_file
    toy, bias = load_file(tmp_path / "toy" / "model.safetensors"), load_file(tmp_path / "bias" / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.bias"
    assert bias[key].abs().max() > 0
    assert (toy[key] - 0.5 * bias[key]).abs().max() < 1e-6  # its own method ran, not bias's


def test_registry_order_errors_and_facts():
    reg = Registry("thing", "flap_exp.methods.compensation", defaults={"needs": "nothing"})
    reg._loaded = True  # no package scan: this registry only holds what is registered here
    reg.register("zeta")(len)
    reg.register("alpha", rank=5, needs="stats")(abs)
    assert reg.names() == ("alpha", "zeta") and reg.get("alpha").needs == "stats" and reg.get("zeta").needs == "nothing"
    with pytest.raises(FlapError, match="unknown thing 'beta'; known things: alpha, zeta"):
        reg.get("beta")
    with pytest.raises(FlapError, match="unknown fact"):
        reg.register("gamma", colour="red")
    with pytest.raises(FlapError, match="registered twice"):
        reg.register("zeta")(abs)


def test_a_plugin_that_cannot_be_imported_is_one_line(monkeypatch):
    monkeypatch.setenv("FLAP_EXP_PLUGINS", "no_such_plugin_module")
    reg = Registry("thing", "flap_exp.methods.compensation")
    with pytest.raises(FlapError, match="FLAP_EXP_PLUGINS: cannot import 'no_such_plugin_module'"):
        reg.names()


def test_every_compensation_module_registers_itself():
    """The package scan finds each module of flap_exp.methods.compensation (one method a file)."""
    pkg = Path(__file__).resolve().parents[1] / "src" / "flap_exp" / "methods" / "compensation"
    from flap_exp.catalogue import COMPENSATIONS
    files = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
    assert files == set(COMPENSATIONS) == {"none", "bias", "lsq"}


TOY_METRIC = '''
"""`toy_metric`: the MLP/attention channel's mean square times its weight column's squared norm (a test metric,
one file): data-dependent, one-shot, no squared attention, bias by default."""
from flap_exp.catalogue import METRICS


@METRICS.register("toy_metric", needs_data=True, compensation="bias")
def score(w, s):
    return s.meansq * (w * w).sum(0)
'''

METRIC_CHECKS = '''
import contextlib, io, json
from flap_exp import cli
from flap_exp.catalogue import METHODS
from flap_exp.pipeline.study import cells

out = {"names": list(METHODS), "facts": list(METHODS["toy_metric"].__dict__.values()),
       "cells_known": list(cells.METRICS)}
with contextlib.redirect_stdout(io.StringIO()) as help_text, contextlib.suppress(SystemExit):
    cli.main(["prune", "--help"])
out["help"] = " ".join(help_text.getvalue().split())
with contextlib.redirect_stderr(io.StringIO()) as err:
    out["bad_rc"] = cli.main(["prune", "--model", "nowhere", "--out", "x", "--metric", "toy_metrics"])
out["bad_err"] = err.getvalue()
block = {"metrics": ["toy_metric"], "structures": ["al_am"], "ratios": [0.5]}
table = cells.expand_study({"t": {"blocks": {"b": block}}}, {"toy_metric": {}}, {"bias": {"method": "bias"}},
                           {"corpus": "wiki", "nsamples": 128})
out["cells"] = json.dumps(table)
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def metric_plugin(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("metric_plugin")
    (root / "toy_metric.py").write_text(textwrap.dedent(TOY_METRIC))
    pypath = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": pypath, "FLAP_EXP_PLUGINS": "toy_metric", "HF_HUB_OFFLINE": "1"}


def test_a_toy_metric_from_one_file_reaches_the_cli_the_cells_and_prunes(metric_plugin, tmp_path):
    r = subprocess.run([sys.executable, "-c", METRIC_CHECKS], env=metric_plugin, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert got["names"] == ["ifv", "wifv", "wifn", "weight_magnitude", "wanda_sp", "obs", "toy_metric"]
    assert got["cells_known"] == got["names"]
    assert got["facts"] == [True, False, False, "bias", "score"]  # declared where it is registered, defaults else
    assert "toy_metric" in got["help"]
    assert got["bad_rc"] == 2 and "known metrics: ifv, wifv, wifn, weight_magnitude, wanda_sp, obs, toy_metric" \
        in got["bad_err"]
    assert "toy_metric-al_am-0.5-wiki-128-bias" in got["cells"]  # its default compensation from its facts
    rng = random.Random(0)
    words = [f"w{i}" for i in range(40)]
    save_model_dir(tmp_path / "model", words)
    (tmp_path / "corpus.txt").write_text(" ".join(rng.choices(words, k=2000)))
    r = subprocess.run([sys.executable, "-m", "flap_exp.cli", "prune", "--model", str(tmp_path / "model"),
                        "--calib", "text", "--calib-path", str(tmp_path / "corpus.txt"), "--nsamples", "8",
                        "--seqlen", "16", "--ratio", "0.3", "--metric", "toy_metric", "--structure", "al_am",
                        "--out", str(tmp_path / "out")], env=metric_plugin, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "flap_manifest.json").read_text())
    assert manifest["settings"]["metric"] == "toy_metric" and manifest["compensation"] == {"method": "bias"}


def test_every_metric_module_registers_itself():
    pkg = Path(__file__).resolve().parents[1] / "src" / "flap_exp" / "methods" / "metric"
    from flap_exp.catalogue import METRICS
    files = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
    assert files == set(METRICS) == {"ifv", "wifv", "wifn", "weight_magnitude", "wanda_sp", "obs"}


TOY_STRUCTURE = '''
"""`toy_struct`: UL-UM at twice the ratio in even layers and none in odd ones (a test structure, one file)."""
from flap_exp.catalogue import STRUCTURES


@STRUCTURES.register("toy_struct", per_layer=True)
def select(scores, arch, ratio, opts):
    from flap_exp.selection import Selection
    from flap_exp.structures import ul_layer
    sel = [ul_layer(a, m, arch, min(0.9, 2 * ratio) if i % 2 == 0 else 0.0, opts) for i, (a, m) in enumerate(scores)]
    return Selection([g for g, _ in sel], [c for _, c in sel])
'''

STRUCTURE_CHECKS = '''
import contextlib, io, json
from flap_exp import cli
from flap_exp.catalogue import STRUCTURES, structure_problem
from flap_exp.pipeline.study import cells

out = {"names": list(STRUCTURES), "wanda": structure_problem("wanda_sp", "toy_struct", True)}
with contextlib.redirect_stdout(io.StringIO()) as help_text, contextlib.suppress(SystemExit):
    cli.main(["prune", "--help"])
out["help"] = " ".join(help_text.getvalue().split())
block = {"metrics": ["wifv"], "structures": ["toy_struct"], "ratios": [0.5]}
out["cells"] = json.dumps(cells.expand_study({"t": {"blocks": {"b": block}}}, {"wifv": {}},
                                             {"bias": {"method": "bias"}}, {"corpus": "wiki", "nsamples": 128}))
print("RESULT " + json.dumps(out))
'''


def test_a_toy_structure_from_one_file_reaches_the_cli_the_cells_and_prunes(tmp_path):
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "toy_struct.py").write_text(textwrap.dedent(TOY_STRUCTURE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "plugin"), os.environ.get("PYTHONPATH", "")]),
           "FLAP_EXP_PLUGINS": "toy_struct", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", STRUCTURE_CHECKS], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert got["names"] == ["ul_um", "ul_mm", "al_mm", "al_am", "ul_log", "curve", "kl_search", "toy_struct"]
    assert got["wanda"] is None  # per_layer: a sequential metric may take it, as its facts say
    assert "toy_struct" in got["help"] and "wifv-toy_struct-0.5-wiki-128-bias" in got["cells"]
    rng = random.Random(0)
    words = [f"w{i}" for i in range(40)]
    save_model_dir(tmp_path / "model", words)
    (tmp_path / "corpus.txt").write_text(" ".join(rng.choices(words, k=2000)))
    r = subprocess.run([sys.executable, "-m", "flap_exp.cli", "prune", "--model", str(tmp_path / "model"),
                        "--calib", "text", "--calib-path", str(tmp_path / "corpus.txt"), "--nsamples", "8",
                        "--seqlen", "16", "--ratio", "0.25", "--structure", "toy_struct",
                        "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "flap_manifest.json").read_text())
    assert manifest["settings"]["structure"] == "toy_struct"
    kept = manifest["selection"]["kept_channels"]
    assert len(kept[1]) > len(kept[0])  # its own rule ran: the odd layer kept every channel, the even one fewer


def test_every_structure_module_registers_itself():
    pkg = Path(__file__).resolve().parents[1] / "src" / "flap_exp" / "methods" / "structure"
    from flap_exp.catalogue import STRUCTURES
    files = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
    assert files == set(STRUCTURES) == {"ul_um", "ul_mm", "al_mm", "al_am", "ul_log", "curve", "kl_search"}
