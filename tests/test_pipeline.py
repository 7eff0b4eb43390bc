"""The DVC/Hydra/MLflow pipeline end to end on a tiny random LLaMA, in a temporary git + DVC repository.

One module-scoped repository is built once (copy of dvc.yaml, conf/, stages/, src/; a tiny model
directory with a word-level tokenizer; a generated text corpus) and the tests run in order on it:
first `dvc repro`, then no-op repro, MLflow contents, report contents, a one-metric option change,
tampered statistics, a real MLflow server, and a push/clone/pull round trip.
The grid holds a none and a bias cell of one selection, and an lsq cell once flap_exp.compensation.lsq
exists (branch lsq; the lead merges it before CI, where the lsq parts run).
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DVC = str(VENV_BIN / "dvc")

HAVE_LSQ = importlib.util.find_spec("flap_exp.compensation.lsq") is not None
NEEDS_LSQ = pytest.mark.skipif(not HAVE_LSQ, reason="flap_exp.compensation.lsq (branch lsq) not merged yet")
COMPS = ["none", "bias"] + (["lsq"] if HAVE_LSQ else [])

TINY_EXPERIMENT = """# @package _global_
grid:
  flap:
    metrics:
      - wifv
    structures:
      - al_am
    ratios:
      - 0.5
    compensation: [COMPS]
  baselines:
    metrics:
      - wanda_sp
      - weight_magnitude
    structures:
      - ul_um
    ratios:
      - 0.5
""".replace("COMPS", ", ".join(COMPS))
OVERRIDES = ["experiment=tiny", "model=local", "model.name=models/tiny", "data=text",
             "data.calib.path=data/corpus.txt", "data.eval.path=data/corpus.txt", "data.calib.nsamples=16",
             "data.calib.seqlen=32", "eval.seqlen=32", "eval.max_windows=8"]
FLAP_CELLS = [f"wifv-al_am-0.5-{c}" for c in COMPS]
CELLS = FLAP_CELLS + ["wanda_sp-ul_um-0.5-none", "weight_magnitude-ul_um-0.5-none"]
COMPENSATE = {f"compensate_lsq@{c}" if c.endswith("-lsq") else f"compensate@{c}" for c in CELLS}


def _env(repo: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(repo / "src"),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def sh(repo: Path, *cmd: str, check: bool = True, **env) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), cwd=repo, env=_env(repo, **env), capture_output=True, text=True, timeout=1200)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def ran(p: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", p.stdout))


def _corpus(words: int = 12000, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(150)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    return " ".join(rng.choices(vocab, weights, k=words)) + "\n"


def _tiny_model(path: Path, text: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    words = sorted(set(text.split()))
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    (path / "flap_identity.json").write_text(json.dumps({"name": "tiny-llama", "source": "test"}))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("pipeline")
    repo = base / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "conf", "stages"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    shutil.copytree(ROOT / "src" / "flap_exp", repo / "src" / "flap_exp",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "conf" / "experiment" / "tiny.yaml").write_text(TINY_EXPERIMENT)
    text = _corpus()
    (repo / "data").mkdir()
    (repo / "data" / "corpus.txt").write_text(text)
    _tiny_model(repo / "models" / "tiny", text)
    (repo / ".gitignore").write_text("mlflow.db\nmlruns/\n__pycache__/\n")
    sh(repo, "git", "init", "-q")
    sh(repo, DVC, "init", "-q")
    sh(repo, DVC, "remote", "add", "-d", "local", str(base / "remote"))
    sh(repo, sys.executable, "-m", "flap_exp.pipeline.compose", *OVERRIDES)
    return repo


@pytest.fixture(scope="module")
def first_run(repo: Path) -> subprocess.CompletedProcess:
    return sh(repo, DVC, "repro")


def _mlflow_runs(repo: Path) -> dict:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("flap-tiny-llama")
    assert exp is not None
    return {r.data.tags["flap.cell"]: r for r in client.search_runs([exp.experiment_id])}


def _metrics(repo: Path, key: str) -> dict:
    return json.loads((repo / "results" / "evaluate" / key / "metrics.json").read_text())


def test_compose_matches_dvc_hydra_composition(repo: Path, tmp_path: Path):
    """`dvc exp run` composes with DVC's own Hydra code + our resolver plugin: same params.yaml."""
    code = ("import sys; from dvc.utils.hydra import compose_and_dump; "
            "compose_and_dump(sys.argv[1], sys.argv[2], None, 'config', sys.argv[3], sys.argv[4:])")
    sh(repo, sys.executable, "-c", code, str(tmp_path / "p.yaml"), str(repo / "conf"), str(repo / "conf"), *OVERRIDES)
    ours = yaml.safe_load((repo / "params.yaml").read_text())
    assert yaml.safe_load((tmp_path / "p.yaml").read_text()) == ours
    assert sorted(ours["cells"]["evaluate"]) == sorted(CELLS)
    assert "calibrate" not in json.dumps(ours["cells"]["score_free"])


def test_compose_unknown_option_is_one_line(repo: Path, capsys):
    from flap_exp.pipeline.compose import main
    out = repo / "x.yaml"
    assert main(["experiment=nope", "--conf", str(repo / "conf"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "unknown experiment 'nope'" in err and "ablation" in err and "quick" in err
    assert main(["grid.flap.structures=[al_am]", "grid.baselines.structures=[al_am]", "--conf", str(repo / "conf"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "per-layer structure" in err and err.strip().count("\n") == 0
    assert main(["metrics.wifv.no_such_option=1", "--conf", str(repo / "conf"), "--out", str(out)]) == 2
    assert "no_such_option" in capsys.readouterr().err
    assert not out.exists()


def test_repro_builds_every_stage(repo: Path, first_run):
    stages = ran(first_run)
    expected = {"prepare", "prepare_eval", "calibrate", "score@wifv", "score_free@weight_magnitude", "standardize@wifv",
                "search@wifv-al_am-0.5", "search@weight_magnitude-ul_um-0.5", "search_seq@wanda_sp-ul_um-0.5",
                "evaluate_dense", "track", "report"} | {f"evaluate@{c}" for c in CELLS} | COMPENSATE
    assert stages == expected
    manifest = json.loads((repo / "results/calibrate/manifest.json").read_text())
    assert manifest["nsamples"] == 16 and manifest["seqlen"] == 32 and manifest["seed"] == 0
    assert manifest["model"]["name"] == "tiny-llama" and len(manifest["data"]["text_sha256"]) == 64
    assert manifest["versions"]["torch"] == torch.__version__
    for key in CELLS:
        m = _metrics(repo, key)
        sel = json.loads((repo / "results/search" / m["cell"] / "selection.json").read_text())
        assert m["achieved_ratio"] == pytest.approx(sel["achieved_ratio"], abs=1e-12)  # rebuilt model = selection
        assert 0.3 < m["achieved_ratio"] < 0.7 and m["perplexity"] > 1 and m["ppl_windows"] == 8
        assert m["compensation"] == key.rsplit("-", 1)[1]
    # One selection, several compensations: same ratio, different numbers (the compensation is applied).
    flap = {c: _metrics(repo, f"wifv-al_am-0.5-{c}") for c in COMPS}
    assert len({m["perplexity"] for m in flap.values()}) == len(COMPS)
    assert len({m["achieved_ratio"] for m in flap.values()}) == 1
    assert flap["bias"]["compensation_options"] == {}
    dense = _metrics(repo, "dense")
    assert dense["achieved_ratio"] == 0 and dense["params_kept"] == dense["params_total"]
    # No pruned model is stored per cell: the only large artifacts are statistics and scores.
    assert not list((repo / "results").rglob("model.safetensors"))


def test_second_repro_does_nothing(repo: Path, first_run):
    p = sh(repo, DVC, "repro")
    assert ran(p) == set() and "Data and pipelines are up to date" in p.stdout


def test_mlflow_one_run_per_cell(repo: Path, first_run):
    runs = _mlflow_runs(repo)
    assert sorted(runs) == sorted(CELLS + ["dense"])
    for key in CELLS:
        r, m = runs[key], _metrics(repo, key)
        assert r.data.metrics["perplexity"] == pytest.approx(m["perplexity"])
        assert r.data.metrics["achieved_ratio"] == pytest.approx(m["achieved_ratio"])
        assert r.data.metrics["params_kept"] == m["params_kept"]
        assert "evaluate_seconds" in r.data.metrics and "search_seconds" in r.data.metrics
        p = r.data.params
        assert p["metric"] == m["metric"] and float(p["ratio"]) == 0.5 and p["N"] == "16" and p["T"] == "32"
        assert p["compensation"] == m["compensation"] and p["model"] == "models/tiny"
        if m["compensation"] == "lsq":
            assert p["compensation.lsq.damping"] == "0.01" and p["compensation.lsq.form"] == "sequential"
        assert "compensate_seconds" in r.data.metrics
        assert len(p["calib.sha256"]) == 64 and p["version.torch"]
    from mlflow.tracking import MlflowClient
    arts = {a.path for a in MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").list_artifacts(runs[CELLS[0]].info.run_id)}
    assert arts == {"selection.json", "kept_per_layer.png"}


def test_report_holds_evaluated_numbers(repo: Path, first_run):
    import csv
    rows = {r["key"]: r for r in csv.DictReader((repo / "reports/ablation.csv").open())}
    assert sorted(rows) == sorted(CELLS + ["dense"])
    for key in CELLS + ["dense"]:
        assert float(rows[key]["perplexity"]) == _metrics(repo, key)["perplexity"]
    md = (repo / "reports/ablation.md").read_text()
    for key in CELLS:
        assert f"{_metrics(repo, key)['perplexity']:.2f}" in md
    comp = (repo / "reports/compensation.md").read_text()
    row = next(line for line in comp.splitlines() if line.startswith("| wifv | al_am | 0.5 |"))
    assert all(f"{_metrics(repo, c)['perplexity']:.2f}" in row for c in FLAP_CELLS)
    assert "| wanda_sp | ul_um | 0.5 |" in comp
    comp_csv = {r["key"]: r for r in csv.DictReader((repo / "reports/compensation.csv").open())}
    assert sorted(comp_csv) == sorted(CELLS)
    figs = {f.name for f in (repo / "reports/figures").iterdir()}
    assert figs == {"ppl_vs_ratio.png", "kept_adaptive_heatmap.png"}
    assert all((repo / "reports/figures" / f).read_bytes()[:4] == b"\x89PNG" for f in figs)


def test_metric_option_reruns_only_its_cells(repo: Path, first_run):
    before = _mlflow_runs(repo)
    calib = (repo / "results/calibrate/stats.safetensors").read_bytes()
    scores = (repo / "results/score/wifv.safetensors").read_bytes()
    sh(repo, sys.executable, "-m", "flap_exp.pipeline.compose", *OVERRIDES, "metrics.wifv.square_attn=false")
    p = sh(repo, DVC, "repro")
    wifv_cells = {"score@wifv", "standardize@wifv", "search@wifv-al_am-0.5", "track", "report"} | {
        f"evaluate@{c}" for c in FLAP_CELLS} | {s for s in COMPENSATE if "wifv" in s}
    # The scores change and are reselected; later wifv stages rerun only if the selection changed
    # (DVC compares their inputs' hashes); no other metric's cell, nor calibration, ever reruns.
    assert {"score@wifv", "standardize@wifv", "search@wifv-al_am-0.5", "track"} <= ran(p) <= wifv_cells
    assert (repo / "results/calibrate/stats.safetensors").read_bytes() == calib
    after = _mlflow_runs(repo)  # replaced, not duplicated
    assert sorted(after) == sorted(before)
    assert after["wifv-al_am-0.5-bias"].info.run_id != before["wifv-al_am-0.5-bias"].info.run_id
    assert after["wifv-al_am-0.5-bias"].data.params["metric.wifv.square_attn"] == "False"
    assert after["wanda_sp-ul_um-0.5-none"].info.run_id == before["wanda_sp-ul_um-0.5-none"].info.run_id
    assert (repo / "results/score/wifv.safetensors").read_bytes() != scores
    # Back to the first config: DVC restores the wifv outputs from its run-cache; track re-logs.
    sh(repo, sys.executable, "-m", "flap_exp.pipeline.compose", *OVERRIDES)
    p = sh(repo, DVC, "repro")
    assert "track" in ran(p) and "calibrate" not in ran(p)
    assert (repo / "results/score/wifv.safetensors").read_bytes() == scores
    again = _mlflow_runs(repo)
    assert sorted(again) == sorted(before) and "metric.wifv.square_attn" not in again["wifv-al_am-0.5-bias"].data.params
    assert ran(sh(repo, DVC, "repro")) == set()


def test_evaluate_refuses_a_compensation_file_of_another_method_or_selection(repo: Path, first_run):
    p = sh(repo, sys.executable, "stages/evaluate.py", "wifv-al_am-0.5-none", "--cell", "wifv-al_am-0.5",
           "--compensation", "bias", check=False)
    assert p.returncode == 2 and "holds compensation 'none', the cell asks for 'bias'" in p.stderr
    p = sh(repo, sys.executable, "stages/evaluate.py", "wanda_sp-ul_um-0.5-none", "--cell", "wifv-al_am-0.5",
           "--compensation", "none", check=False)
    assert p.returncode == 2 and "computed for another selection" in p.stderr and "Traceback" not in p.stderr
    assert ran(sh(repo, DVC, "repro")) == set()


@NEEDS_LSQ
def test_lsq_option_reruns_only_lsq_cells(repo: Path, first_run):
    """compensations.lsq is read by the lsq cells only: a damping change reruns them, nothing else."""
    lsq = "wifv-al_am-0.5-lsq"
    before, bias = _metrics(repo, lsq), _metrics(repo, "wifv-al_am-0.5-bias")
    sh(repo, sys.executable, "-m", "flap_exp.pipeline.compose", *OVERRIDES, "compensations.lsq.damping=0.5")
    p = sh(repo, DVC, "repro")
    assert ran(p) == {f"compensate_lsq@{lsq}", f"evaluate@{lsq}", "track", "report"}
    after = _metrics(repo, lsq)
    assert after["compensation_options"]["damping"] == 0.5 and after["perplexity"] != before["perplexity"]
    assert _metrics(repo, "wifv-al_am-0.5-bias") == bias
    assert _mlflow_runs(repo)[lsq].data.params["compensation.lsq.damping"] == "0.5"
    sh(repo, sys.executable, "-m", "flap_exp.pipeline.compose", *OVERRIDES)
    p = sh(repo, DVC, "repro")
    assert "calibrate" not in ran(p) and _metrics(repo, lsq)["perplexity"] == before["perplexity"]
    assert ran(sh(repo, DVC, "repro")) == set()


def test_tampered_statistics_refused(repo: Path, first_run):
    from flap_exp.pipeline.io import load_tensors, save_tensors
    from flap_exp.sources import sha256_file
    stats, manifest = repo / "results/calibrate/stats.safetensors", repo / "results/calibrate/manifest.json"
    saved = stats.read_bytes(), manifest.read_text()
    try:
        m = json.loads(saved[1])
        m["data"]["text_sha256"] = "0" * 64  # manifest edited: no longer describes the file
        manifest.write_text(json.dumps(m))
        p = sh(repo, sys.executable, "stages/score.py", "wifv", check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.strip().count("\n") == 0
        assert "refusing tampered statistics" in p.stderr
        # Statistics of another model, with a consistent manifest: refused against what prepare recorded.
        tensors, meta = load_tensors(stats)
        meta["model"] = {"name": "other-model", "source": "elsewhere"}
        save_tensors(stats, tensors, meta)
        manifest.write_text(json.dumps({**meta, "stats_sha256": sha256_file(stats)}))
        p = sh(repo, sys.executable, "stages/compensate.py", "wifv-al_am-0.5-bias", "--cell", "wifv-al_am-0.5",
               "--method", "bias", "--stats", "results/calibrate/stats.safetensors", check=False)
        assert p.returncode == 2 and "computed for model 'other-model'" in p.stderr and "refusing" in p.stderr
    finally:
        stats.write_bytes(saved[0])
        manifest.write_text(saved[1])
    assert ran(sh(repo, DVC, "repro")) == set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rest(url: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_mlflow_server_receives_runs(repo: Path, first_run, tmp_path: Path):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "art")],
        env=_env(repo, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        p = sh(repo, DVC, "repro", "-f", "-s", "track", MLFLOW_TRACKING_URI=uri)
        assert ran(p) == {"track"}
        exp = _rest(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=flap-tiny-llama")["experiment"]
        runs = _rest(f"{uri}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        by_cell = {next(t["value"] for t in r["data"]["tags"] if t["key"] == "flap.cell"): r for r in runs}
        assert sorted(by_cell) == sorted(CELLS + ["dense"])
        r = by_cell["wifv-al_am-0.5-bias"]
        ppl = next(m["value"] for m in r["data"]["metrics"] if m["key"] == "perplexity")
        assert ppl == pytest.approx(_metrics(repo, "wifv-al_am-0.5-bias")["perplexity"])
        assert {"key": "structure", "value": "al_am"} in r["data"]["params"]
        files = _rest(f"{uri}/api/2.0/mlflow/artifacts/list?run_id={r['info']['run_id']}")["files"]
        assert {f["path"] for f in files} == {"selection.json", "kept_per_layer.png"}
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    # The server is gone: stages refuse at once, before loading anything, with a one-line reason.
    t0 = time.perf_counter()
    p = sh(repo, sys.executable, "stages/calibrate.py", check=False, MLFLOW_TRACKING_URI=uri)
    assert p.returncode == 2 and "unreachable" in p.stderr and "Traceback" not in p.stderr
    assert time.perf_counter() - t0 < 30
    sh(repo, DVC, "repro", "-f", "-s", "track")  # back to the local database
    assert ran(sh(repo, DVC, "repro")) == set()


def test_remote_round_trip(repo: Path, first_run, tmp_path: Path):
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "pipeline")
    sh(repo, DVC, "push")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    sh(clone, DVC, "pull")
    p = sh(clone, DVC, "repro")
    assert ran(p) == set() and "Data and pipelines are up to date" in p.stdout
    for rel in ["results/calibrate/stats.safetensors", "results/evaluate/wifv-al_am-0.5-bias/metrics.json",
                "results/search/wanda_sp-ul_um-0.5/selection.json", "reports/ablation.csv"]:
        assert (clone / rel).read_bytes() == (repo / rel).read_bytes(), rel
    # Recomputing a cell from the pulled selection and biases gives the same numbers.
    before = _metrics(repo, "wifv-al_am-0.5-bias")
    assert ran(sh(clone, DVC, "repro", "-f", "-s", "evaluate@wifv-al_am-0.5-bias")) == {"evaluate@wifv-al_am-0.5-bias"}
    after = _metrics(clone, "wifv-al_am-0.5-bias")
    assert {k: v for k, v in after.items() if k != "usage"} == {k: v for k, v in before.items() if k != "usage"}


EVAL_EXTRA = ["eval.zeroshot.enabled=true", "eval.zeroshot.tasks=[piqa,arc_easy]", "eval.zeroshot.limit=4",
              "eval.throughput.enabled=true", "eval.throughput.repeats=1", "eval.throughput.prefill_shapes=[[1,16]]",
              "eval.throughput.decode_batches=[1]", "eval.throughput.prompt_len=4", "eval.throughput.new_tokens=3",
              "+data.eval_extra.again={corpus: text, path: data/corpus.txt}"]


def test_zeroshot_throughput_and_extra_corpora_reach_metrics_mlflow_and_report(repo: Path, first_run):
    """Run last: turns on every evaluation of issue 5 on the tiny model and follows the numbers."""
    sh(repo, sys.executable, "-m", "flap_exp.pipeline.compose", *OVERRIDES, *EVAL_EXTRA)
    p = sh(repo, DVC, "repro")
    assert {f"evaluate@{c}" for c in CELLS} | {"evaluate_dense", "track", "report"} <= ran(p)
    assert not ran(p) & {"prepare", "calibrate", "score@wifv", "search@wifv-al_am-0.5"}  # evaluation only
    runs = _mlflow_runs(repo)
    md = (repo / "reports/ablation.md").read_text()
    assert "## Zero-shot accuracy (%)" in md and "first 4 documents per task" in md
    for key in CELLS + ["dense"]:
        m = _metrics(repo, key)
        zs = m["zeroshot"]["tasks"]
        assert set(zs) == {"piqa", "arc_easy"} and all(t["n_docs"] == 4 and 0 <= t["score"] <= 1 for t in zs.values())
        assert m["zeroshot_avg"] == pytest.approx((zs["piqa"]["score"] + zs["arc_easy"]["score"]) / 2)
        assert m["perplexity_extra"]["again"] == pytest.approx(m["perplexity"])  # same text, same numbers
        assert all(v > 0 for v in m["throughput_tokens_per_s"].values())
        r = runs[key].data.metrics
        assert r["zeroshot.piqa"] == pytest.approx(zs["piqa"]["score"]) and r["perplexity.again"] > 1
        assert r["tokens_per_s.decode_b1"] == pytest.approx(m["throughput_tokens_per_s"]["decode_b1"])
        if key != "dense":
            assert set(m["speedup"]) == {"prefill_b1_s16", "decode_b1"} and all(v > 0 for v in m["speedup"].values())
            assert r["speedup.prefill_b1_s16"] == pytest.approx(m["speedup"]["prefill_b1_s16"])
            assert m["throughput"]["speedup_vs"] == "dense"
        row = f"| {'dense' if key == 'dense' else m['metric'] + '/' + m['structure']}"
        assert any(line.startswith(row) and f"{100 * m['zeroshot_avg']:.2f} |" in line for line in md.splitlines())
    assert "## Speedup over dense" in md
    import csv
    rows = {r["key"]: r for r in csv.DictReader((repo / "reports/ablation.csv").open())}
    assert float(rows["dense"]["zeroshot.piqa"]) == _metrics(repo, "dense")["zeroshot"]["tasks"]["piqa"]["score"]
