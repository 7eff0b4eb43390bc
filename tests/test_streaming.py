"""Layer streaming (one decoder layer resident at a time) against the in-memory run, dtypes, devices, bad input."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from flap_exp.calibrate import collect_stats
from flap_exp.compensation import CompensationConfig
from flap_exp.errors import FlapError
from flap_exp.persist import load_pruned, save_pruned, write_streamed
from flap_exp.ppl import perplexity
from flap_exp.prune import PruneConfig, prune
from flap_exp.runtime import resolve_device, resolve_dtype
from flap_exp.shards import INDEX
from flap_exp.streaming import StreamedModel
from flap_exp.units import parse_bytes

from helpers.models import tiny_model
from helpers.synthetic import BIG_CONFIG, write_random_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: GPU variant not exercised")
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


def save_sharded(model, folder: Path, shard: str = "40KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


@pytest.fixture(params=[(4, 2), (4, 4)], ids=["gqa", "mha"])
def model_dir(request, tmp_path):
    heads, kv = request.param
    m = tiny_model(heads=heads, kv=kv)
    folder = save_sharded(m, tmp_path / "base")
    assert (folder / INDEX).exists() and len(list(folder.glob("*.safetensors"))) >= 3  # really several shards
    return folder


def tied_model_dir(tmp_path) -> Path:
    m = tiny_model(seed=5, layers=2, tie_word_embeddings=True)
    return save_sharded(m, tmp_path / "tied")


def load(folder, dtype=torch.float32, device="cpu"):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def assert_stats_equal(a, b, rtol=0.0):
    assert len(a) == len(b)
    for la, lb in zip(a, b, strict=True):
        for sa, sb in ((la.attn, lb.attn), (la.mlp, lb.mlp)):
            assert sa.count == sb.count and sa.mean.dtype == torch.float64 == sb.m2.dtype
            for x, y in ((sa.mean, sb.mean), (sa.m2, sb.m2), (sa.meansq, sb.meansq)):
                torch.testing.assert_close(x, y, rtol=rtol, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_streamed_stats_equal_in_memory(model_dir, windows, device):
    ref = collect_stats(load(model_dir, device=device), windows, batch_size=3, progress=False)
    sm = StreamedModel(model_dir, torch.float32, device)
    got = collect_stats(sm, windows, batch_size=3, progress=False)
    assert_stats_equal(got, ref)
    assert all(p.device.type == "meta" for p in sm.model.parameters())  # every weight released again


def _in_memory_prune(folder, windows, cfg, out):
    m = load(folder)
    res = prune(m, windows, cfg, progress=False)
    save_pruned(m, None, {"selection": res.selection.to_json()}, out)
    return res


@pytest.mark.parametrize("cfg", [PruneConfig("wifv", "al_am", 0.4, batch_size=3),
                                 PruneConfig("wifv", "ul_mm", 0.3, compensation="none", batch_size=4),
                                 PruneConfig("wanda_sp", "ul_um", 0.5, compensation="none", batch_size=3),
                                 PruneConfig("weight_magnitude", "ul_um", 0.5, compensation="none")],
                         ids=["wifv-al_am-bias", "wifv-ul_mm", "wanda_sp-sequential", "magnitude"])
def test_streamed_prune_equals_in_memory(model_dir, windows, cfg, tmp_path):
    ref = _in_memory_prune(model_dir, windows, cfg, tmp_path / "mem")
    sm = StreamedModel(model_dir)
    got = write_streamed(sm, windows, cfg, tmp_path / "stream", {}, progress=False)
    assert got.selection.to_json() == ref.selection.to_json()
    assert got.achieved_ratio == ref.achieved_ratio > 0
    if ref.stats is not None:
        assert_stats_equal(got.stats, ref.stats)
    a, b = load(tmp_path / "mem"), load(tmp_path / "stream")  # from_pretrained after `import flap_exp`
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(a(windows).logits, b(windows).logits)
    assert len(list((tmp_path / "stream").glob("model-*.safetensors"))) == len(sm.layers) + 1  # shard per layer
    model, _, manifest = load_pruned(tmp_path / "stream")  # the manifest's sha256 check passes
    assert set(manifest["weights_sha256"]) == {p.name for p in (tmp_path / "stream").glob("*.safetensors")}


@pytest.mark.parametrize("cfg", [PruneConfig("wifv", "al_am", 0.4, compensation=CompensationConfig("lsq", 0.01, form),
                                             batch_size=3) for form in ("sequential", "dense", "drift")]
                         + [PruneConfig("wanda_sp", "ul_um", 0.5, compensation="lsq", batch_size=4)],
                         ids=["lsq-sequential", "lsq-dense", "lsq-drift", "wanda_sp-lsq"])
def test_streamed_lsq_equals_in_memory(model_dir, windows, cfg, tmp_path):
    """lsq runs inside the streamed cutting loop: the same fitted weights as the in-memory pass (which holds the
    kept MLP inputs, where the streamed one recomputes them), the same logits after reloading."""
    ref = _in_memory_prune(model_dir, windows, cfg, tmp_path / "mem")
    got = write_streamed(StreamedModel(model_dir), windows, cfg, tmp_path / "stream", {}, progress=False)
    assert got.selection.to_json() == ref.selection.to_json() and got.compensation == cfg.resolved_compensation()
    a, b = load(tmp_path / "mem"), load(tmp_path / "stream")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    dense, keep = load(model_dir).state_dict(), got.selection.keep_channels
    cut = [i for i, k in enumerate(keep) if 0 < int(k.sum()) < k.numel()]
    assert cut  # an MLP that lost channels: its kept columns are refitted, not the dense ones
    d = f"model.layers.{cut[0]}.mlp.down_proj.weight"
    assert not torch.allclose(sb[d], dense[d][:, keep[cut[0]]], atol=1e-3)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-6, atol=1e-6, msg=k)
    torch.testing.assert_close(b(windows).logits, a(windows).logits, rtol=1e-5, atol=1e-5)


def test_streamed_lsq_budget_counts_its_pass(model_dir, windows, tmp_path):
    """A budget that suffices for the bias is refused up front for lsq, with lsq named; nothing is written."""
    enough_for_bias = StreamedModel(model_dir).plan(16).needed(10)
    sm = StreamedModel(model_dir, budget=enough_for_bias)
    write_streamed(sm, windows, PruneConfig(batch_size=5), tmp_path / "bias", {}, progress=False)
    with pytest.raises(FlapError, match="layers were cut by a streamed prune; open the directory again"):
        write_streamed(sm, windows, PruneConfig(), tmp_path / "again", {})  # a spent skeleton is refused
    with pytest.raises(FlapError, match=r"too small for streamed pruning with lsq \(sequential\)"):
        write_streamed(StreamedModel(model_dir, budget=enough_for_bias), windows, PruneConfig(compensation="lsq"),
                       tmp_path / "lsq", {})
    assert not (tmp_path / "lsq").exists() and not (tmp_path / "again").exists()


def test_streamed_tied_embeddings_prune_and_ppl(tmp_path, windows):
    folder = tied_model_dir(tmp_path)
    cfg = PruneConfig("wifv", "al_am", 0.3, batch_size=4)
    _in_memory_prune(folder, windows, cfg, tmp_path / "mem")
    write_streamed(StreamedModel(folder), windows, cfg, tmp_path / "stream", {}, progress=False)
    a, b = load(tmp_path / "mem"), load(tmp_path / "stream")
    assert torch.equal(a(windows).logits, b(windows).logits)
    tokens = windows.flatten()
    ref = perplexity(a, tokens, 16, 4, progress=False)
    got = perplexity(StreamedModel(tmp_path / "stream"), tokens, 16, 4, progress=False)
    assert math.isclose(got.ppl, ref.ppl, rel_tol=1e-12) and got.windows == ref.windows


def test_streamed_perplexity_in_chunks_equals_plain(model_dir, windows):
    tokens = windows.flatten()
    ref = perplexity(load(model_dir), tokens, 16, 3, progress=False)
    plan = StreamedModel(model_dir).plan(16)
    # a budget that holds only ~4 windows' hidden states besides the weights and one batch of logits
    budget = plan.weights + 2 * 3 * 16 * 101 * 4 + 4 * plan.per_window
    got = perplexity(StreamedModel(model_dir, budget=budget), tokens, 16, 3, progress=False)
    assert math.isclose(got.ppl, ref.ppl, rel_tol=1e-12) and got.windows == ref.windows == 10


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_streamed_matches_in_memory_and_stats_stay_float64(model_dir, windows, dtype, device):
    dt = resolve_dtype(dtype, resolve_device(device))
    ref = collect_stats(load(model_dir, dt, device), windows, batch_size=5, progress=False)
    got = collect_stats(StreamedModel(model_dir, dt, device), windows, batch_size=5, progress=False)
    assert_stats_equal(got, ref)
    f32 = collect_stats(load(model_dir), windows, batch_size=5, progress=False)
    # half precision moves the statistics, but only by its rounding: the same channels, same magnitudes
    rel = (got[0].mlp.var - f32[0].mlp.var).abs().max() / f32[0].mlp.var.abs().max()
    assert 0 < rel < 0.05


def test_half_precision_overflow_is_an_error_not_a_result(tmp_path, windows):
    m = tiny_model(heads=4, kv=2)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.mlp.up_proj.weight.mul_(3e3)  # fine in float32, beyond float16's 65504 in the MLP
    folder = save_sharded(m, tmp_path / "hot")
    collect_stats(load(folder), windows, progress=False)  # float32 copes
    with pytest.raises(FlapError, match="non-finite"):
        collect_stats(StreamedModel(folder, torch.float16), windows, progress=False)


# --- bad input ---------------------------------------------------------------------------------------

def test_missing_and_truncated_shards_are_named_and_nothing_is_written(model_dir, windows, tmp_path):
    shards = sorted(model_dir.glob("model-*.safetensors"))
    victim = shards[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    out = tmp_path / "out"
    with pytest.raises(FlapError, match=f"shard {victim.name} .*truncated"):
        write_streamed(StreamedModel(model_dir), windows, PruneConfig(), out, {})
    victim.unlink()
    with pytest.raises(FlapError, match=f"shard {victim.name} is missing"):
        StreamedModel(model_dir)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_budget_smaller_than_one_layer_names_the_needed_figure(model_dir, windows, tmp_path):
    sm = StreamedModel(model_dir)
    need = sm.plan(16).needed(10)
    with pytest.raises(FlapError, match=rf"needs {need / 2**20:.1f} MiB"):
        write_streamed(StreamedModel(model_dir, budget=need - 1), windows, PruneConfig(), tmp_path / "out", {})
    assert not (tmp_path / "out").exists()
    with pytest.raises(FlapError, match="too small for perplexity"):
        perplexity(StreamedModel(model_dir, budget=sm.plan(16).weights // 2), windows.flatten(), 16, 3)


def test_device_and_dtype_and_budget_strings():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(FlapError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(FlapError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(FlapError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", torch.device("cpu"))
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert parse_bytes("768MiB") == 768 * 2**20 and parse_bytes("2GB") == 2 * 10**9 and parse_bytes(None) is None
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(FlapError, match="memory budget"):
            parse_bytes(bad)


def test_dtype_the_device_cannot_run(monkeypatch):
    real = torch.Tensor.__matmul__

    def refuse(a, b):  # a device without half-precision matmul kernels (as old CPUs/GPUs had)
        if a.dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        return real(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", refuse)
    with pytest.raises(FlapError, match="--dtype float16 cannot run on cpu: .*not implemented for 'Half'"):
        resolve_dtype("float16", torch.device("cpu"))
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32


def _cli(*args, capsys=None):
    """The command line in this process (a subprocess would re-import torch for every call)."""
    from flap_exp.cli import main
    rc = main([str(x) for x in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def _cli_model(folder: Path, words: int = 3000) -> Path:
    """A tiny sharded LLaMA with a word-level tokenizer, and a text file to calibrate on."""
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    rng = random.Random(0)
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(99)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    save_sharded(tiny_model(heads=4, kv=2), folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    (folder / "text.txt").write_text(" ".join(f"w{rng.randrange(99)}" for _ in range(words)) + "\n")
    return folder


@pytest.mark.parametrize("comp", [[], ["--compensation", "lsq", "--lsq-form", "dense"]], ids=["bias", "lsq-dense"])
def test_cli_streamed_prune_and_ppl_equal_in_memory(tmp_path, capsys, comp):
    folder = _cli_model(tmp_path / "m")
    common = ["--model", str(folder), "--calib", "text", "--calib-path", str(folder / "text.txt"),
              "--nsamples", "6", "--seqlen", "16", "--batch-size", "4", "--ratio", "0.3", "--device", "cpu", *comp]
    tol = 1e-6 if comp else 1e-9  # lsq: the streamed pass recomputes the kept MLP inputs (rounding differs)
    r1 = _cli("prune", *common, "--out", str(tmp_path / "mem"), capsys=capsys)
    r2 = _cli("prune", *common, "--stream", "--memory-budget", "4MiB", "--out", str(tmp_path / "stream"),
              "--eval", "--eval-data", "text", "--eval-data-path", folder / "text.txt", capsys=capsys)
    assert r1.returncode == 0 == r2.returncode, r1.stderr[-2000:] + r2.stderr[-2000:]
    a, b = json.loads(r1.stdout), json.loads(r2.stdout)
    assert a["achieved_ratio"] == b["achieved_ratio"] > 0 and b["streamed"]
    ma, mb = (json.loads((tmp_path / d / "flap_manifest.json").read_text()) for d in ("mem", "stream"))
    assert ma["selection"] == mb["selection"] and ma["base_model"] == mb["base_model"]
    assert ma["compensation"] == mb["compensation"] == (
        {"method": "lsq", "damping": 0.01, "form": "dense"} if comp else {"method": "bias"})
    ppl = ["--data", "text", "--data-path", str(folder / "text.txt"), "--seqlen", "16", "--device", "cpu"]
    p1 = _cli("ppl", str(tmp_path / "mem"), *ppl, capsys=capsys)
    p2 = _cli("ppl", str(tmp_path / "stream"), *ppl, "--stream", "--memory-budget", "1MiB", capsys=capsys)
    assert p1.returncode == 0 == p2.returncode, p1.stderr[-2000:] + p2.stderr[-2000:]
    x, y = json.loads(p1.stdout), json.loads(p2.stdout)
    assert math.isclose(x["ppl"], y["ppl"], rel_tol=tol) and x["windows"] == y["windows"] > 10
    assert b["perplexity"]["streamed"] and math.isclose(b["perplexity"]["ppl"], x["ppl"], rel_tol=tol)


def test_cli_bad_runtime_input_one_line_and_nothing_written(tmp_path, capsys):
    folder = _cli_model(tmp_path / "m")
    base = ["prune", "--model", str(folder), "--calib", "text", "--calib-path", str(folder / "text.txt"),
            "--nsamples", "6", "--seqlen", "16", "--out", str(tmp_path / "o")]
    cases = [(["--stream", "--memory-budget", "20KiB"], "memory budget 0.0 MiB is too small"),
             (["--stream", "--memory-budget", "lots"], "cannot read memory budget 'lots'"),
             (["--memory-budget", "1GiB"], "--memory-budget applies to --stream runs only"),
             (["--dtype", "float8"], "unknown dtype 'float8'; valid: auto, float32, bfloat16, float16"),
             (["--device", "tpu"], "unknown device 'tpu'")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: no CUDA GPU is available here"))
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    for extra, msg in cases:
        r = _cli(*base, *extra, capsys=capsys)
        err = [line for line in r.stderr.splitlines() if line.startswith("flap-exp: error:")]
        assert r.returncode == 2 and len(err) == 1 and msg in err[0], (extra, r.stderr[-1500:])
    shard.write_bytes(shard.read_bytes()[:-10])
    r = _cli(*base, "--stream", capsys=capsys)
    assert r.returncode == 2 and f"shard {shard.name} in {folder} is truncated" in r.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))


# --- a model whose float32 weights are >= 4x the streamed run's peak resident memory ---------------------

@pytest.mark.slow
def test_model_four_times_larger_than_the_streamed_peak_rss(tmp_path):
    # 48 layers of ~15.7M parameters (63 MB in float32) + embedding and head: ~3.1 GB of float32 weights
    weights = write_random_checkpoint(BIG_CONFIG, tmp_path / "big")
    budget = 768 * 2**20  # flap-exp's own working set; the interpreter + torch add ~370 MiB on top
    helper = Path(__file__).parent / "helpers" / "synthetic.py"
    r = subprocess.run([sys.executable, str(helper), str(tmp_path / "big"), str(tmp_path / "pruned"), str(budget),
                        "bias"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    print(got)
    assert got["weights"] == weights > 2.9 * 10**9
    assert got["peak_rss"] * 4 <= weights, (f"peak RSS {got['peak_rss'] / 2**20:.0f} MiB "
                                            "is over a quarter of the weights")
    assert 0.45 < got["ratio"] < 0.55 and math.isfinite(got["ppl"])
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")  # the pruned model loads whole (it is ~half)
    assert m.config.model_type == "flap_llama"
