"""The compensation registry (none / bias / lsq), its serialization, and `flap-exp prune --compensation`."""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch

import flap_exp  # noqa: F401  (registers flap_llama for from_pretrained)
from flap_exp import cli
from flap_exp.arch import ArchView
from flap_exp.calibrate import collect_stats
from flap_exp.compensation import (
    COMPENSATIONS,
    CompensationConfig,
    LayerComp,
    check_config,
    compensate,
    comps_from_tensors,
    comps_to_tensors,
    get_compensation,
)
from flap_exp.compensation.bias import compensation_biases
from flap_exp.errors import FlapError
from flap_exp.metrics import channel_scores, get_metric
from flap_exp.persist import load_pruned
from flap_exp.structures import StructureOptions, get_structure

from helpers.models import tiny_model


def test_unknown_compensation_lists_the_known_ones(model, windows):
    assert list(COMPENSATIONS) == ["none", "bias", "lsq"]
    with pytest.raises(FlapError, match="unknown compensation 'ridge'; known compensations: none, bias, lsq"):
        get_compensation("ridge")
    arch = ArchView.from_config(model.config)
    with pytest.raises(FlapError, match="known compensations: none, bias, lsq"):
        compensate(model, None, arch, CompensationConfig("ridge"))
    for bad, msg in [(CompensationConfig("lsq", damping=-0.1), "damping must be a finite number >= 0"),
                     (CompensationConfig("lsq", damping=float("nan")), "damping must be a finite number"),
                     (CompensationConfig("lsq", form="sideways"), "unknown lsq form 'sideways'; known forms: "
                                                                   "sequential, dense, drift")]:
        with pytest.raises(FlapError, match=msg):
            check_config(bad)
    check_config(CompensationConfig("lsq", damping=0.0))  # the plain least-squares fit is allowed


def _selection(model, windows):
    arch = ArchView.from_config(model.config)
    stats = collect_stats(model, windows, progress=False)
    sel = get_structure("al_am")(channel_scores(get_metric("wifv"), model, stats), arch, 0.4, StructureOptions())
    return arch, stats, sel


def test_registry_none_and_bias(model, windows):
    arch, stats, sel = _selection(model, windows)
    assert compensate(model, sel, arch, CompensationConfig("none")) is None
    with pytest.raises(FlapError, match="needs calibration statistics"):
        compensate(model, sel, arch, CompensationConfig("bias"))
    with pytest.raises(FlapError, match="needs calibration windows"):
        compensate(model, sel, arch, CompensationConfig("lsq"), stats=stats)
    comps = compensate(model, sel, arch, CompensationConfig("bias"), stats=stats)
    want = compensation_biases(model, stats, sel, arch)
    assert len(comps) == arch.num_layers
    for c, (o, d) in zip(comps, want, strict=True):
        assert torch.equal(c.o_bias, o) and torch.equal(c.down_bias, d) and c.o_weight is None


def test_serialization_round_trip_and_shape_checks(model, windows):
    arch, stats, sel = _selection(model, windows)
    assert comps_to_tensors(None) == {} and comps_from_tensors({}, sel, arch) is None
    g = torch.Generator().manual_seed(0)
    comps = [LayerComp(torch.randn(arch.hidden_size, generator=g, dtype=torch.float64),
                       torch.randn(arch.hidden_size, generator=g, dtype=torch.float64),
                       torch.randn(arch.hidden_size, int(sel.channel_mask(i, arch).sum()), generator=g),
                       torch.randn(arch.hidden_size, int(sel.keep_channels[i].sum()), generator=g) if i else None)
             for i in range(arch.num_layers)]
    t = comps_to_tensors(comps)
    assert "layers.0.o_proj.weight" in t and "layers.0.down_proj.weight" not in t and "layers.1.down_proj.bias" in t
    back = comps_from_tensors(t, sel, arch)
    for a, b in zip(comps, back, strict=True):
        for f in ("o_bias", "down_bias", "o_weight", "down_weight"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None and y is None) or torch.equal(x, y)
    bad = dict(t)
    bad["layers.1.o_proj.weight"] = bad["layers.1.o_proj.weight"][:, :-1]
    with pytest.raises(FlapError, match=r"layer 1 o_weight has shape .* the selection needs"):
        comps_from_tensors(bad, sel, arch)
    bad = dict(t)
    bad["layers.2.down_proj.bias"] = bad["layers.2.down_proj.bias"].clone()
    bad["layers.2.down_proj.bias"][3] = float("nan")
    with pytest.raises(FlapError, match="layer 2 down_bias holds NaN"):
        comps_from_tensors(bad, sel, arch)
    with pytest.raises(FlapError, match="unexpected tensor 'layers.0.q_proj.weight'"):
        comps_from_tensors({**t, "layers.0.q_proj.weight": torch.zeros(1)}, sel, arch)
    with pytest.raises(FlapError, match="the model has 3"):
        comps_from_tensors({k: v for k, v in t.items() if not k.startswith("layers.2.")}, sel, arch)


# --- `flap-exp prune --compensation` on a tiny local model ---------------------------------------------

def _local_model(path, text: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = sorted(set(text.split()))
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    model = tiny_model(heads=4, kv=2, vocab=len(vocab))
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return model, fast


@pytest.fixture
def local(tmp_path):
    rng = random.Random(0)
    text = " ".join(rng.choices([f"w{i}" for i in range(60)], k=3000)) + "\n"
    (tmp_path / "corpus.txt").write_text(text)
    model, tok = _local_model(tmp_path / "tiny", text)
    return tmp_path, model, tok


def _prune_cli(root, out, *extra) -> int:
    return cli.main(["prune", "--model", str(root / "tiny"), "--metric", "wifv", "--structure", "al_am",
                     "--ratio", "0.4", "--calib", "text", "--calib-path", str(root / "corpus.txt"), "--nsamples", "8",
                     "--seqlen", "16", "--device", "cpu", "--out", str(out), *extra])


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("extra,record", [
    ([], {"method": "bias"}),
    (["--compensation", "bias"], {"method": "bias"}),
    (["--no-compensate"], {"method": "none"}),
    pytest.param(["--compensation", "lsq", "--lsq-damping", "0.05", "--lsq-form", "dense"],
                 {"method": "lsq", "damping": 0.05, "form": "dense"}),
])
def test_cli_compensation_round_trip(local, extra, record, capsys):
    from transformers import AutoModelForCausalLM

    from flap_exp.data import Corpus, calibration_windows, load_text, tokenize
    from flap_exp.prune import prune
    root, model, tok = local
    out = root / "out"
    assert _prune_cli(root, out, *extra) == 0
    printed = json.loads(capsys.readouterr().out)
    manifest = json.loads((out / "flap_manifest.json").read_text())
    assert manifest["compensation"] == record == printed["compensation"]
    assert manifest["settings"]["compensation"]["method"] == record["method"]
    # The in-memory result of the same settings: same windows, same config, the library call.
    windows = calibration_windows(tokenize(tok, load_text(Corpus("text", "test", str(root / "corpus.txt")),
                                                          join=" ").text), 8, 16, 0)
    a = cli._parser().parse_args(["prune", "--metric", "wifv", "--structure", "al_am", "--ratio", "0.4", "--out", "x",
                                  *extra])
    mem = copy.deepcopy(model)
    res = prune(mem, windows, cli.prune_config(a), progress=False)
    assert res.compensation.method == record["method"]
    x = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(5))
    reloaded, _, _ = load_pruned(out)
    auto = AutoModelForCausalLM.from_pretrained(out).eval()
    want = _logits(mem, x)
    torch.testing.assert_close(_logits(reloaded, x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(auto, x), want, rtol=1e-5, atol=1e-5)
    # Compensation changes the model (bias != none), the selection does not.
    assert manifest["selection"] == res.selection.to_json()
    if record["method"] != "none":
        assert not torch.allclose(want, _logits(prune_none(model, windows), x), atol=1e-4)


def prune_none(model, windows):
    from flap_exp.prune import PruneConfig, prune
    m = copy.deepcopy(model)
    prune(m, windows, PruneConfig("wifv", "al_am", 0.4, compensation=CompensationConfig("none")), progress=False)
    return m


@pytest.mark.parametrize("extra,msg", [
    (["--compensation", "ridge"], "unknown compensation 'ridge'; known compensations: none, bias, lsq"),
    (["--compensation", "bias", "--lsq-damping", "0.1"], "--lsq-damping is for --compensation lsq only"),
    (["--lsq-form", "dense"], "--lsq-form is for --compensation lsq only"),
    (["--compensation", "lsq", "--lsq-damping", "-1"], "lsq damping must be a finite number >= 0"),
    (["--compensation", "lsq", "--lsq-form", "sideways"], "unknown lsq form 'sideways'"),
    (["--no-compensate", "--compensation", "bias"], "--no-compensate contradicts --compensation bias"),
])
def test_cli_compensation_errors_before_loading(tmp_path, extra, msg, capsys):
    """Validated before the model is loaded: the model path does not even exist."""
    rc = cli.main(["prune", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("flap-exp: error: ") and msg in err
    assert list(tmp_path.iterdir()) == []
