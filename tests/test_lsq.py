"""Least-squares compensation: the solve against numpy, exactness, the bias limit, the forms, surgery."""
import copy

import numpy as np
import pytest
import torch

from flap_exp.arch import ArchView
from flap_exp.calibrate import collect_stats
from flap_exp.compensation.base import CompensationConfig
from flap_exp.compensation.bias import compensation_bias, compensation_biases
from flap_exp.compensation.covariance import CovAccumulator
from flap_exp.compensation.lsq import lsq_compensation
from flap_exp.compensation.lsq_solve import lsq_solve
from flap_exp.errors import FlapError
from flap_exp.metrics import channel_scores, get_metric
from flap_exp.persist import load_pruned, save_pruned
from flap_exp.selection import Selection
from flap_exp.structures import StructureOptions, get_structure
from flap_exp.surgery import mask_model, prune_model

from helpers.models import tiny_model

X = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(7))
LSQ = CompensationConfig("lsq", 0.01, "sequential")


def logits(model, x=X):
    with torch.no_grad():
        return model(x).logits


def accumulate(x: torch.Tensor, sizes=(7, 50, 1, 100), target=None) -> CovAccumulator:
    acc = CovAccumulator(x.shape[1], target_dim=None if target is None else target.shape[1])
    start = 0
    for s in sizes:
        acc.update(x[start:start + s], None if target is None else target[start:start + s])
        start += s
    assert start == x.shape[0]
    return acc


def test_accumulator_matches_numpy():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(158, 9, generator=g) * 3 + 5).to(torch.float32)
    t = torch.randn(158, 4, generator=g) + x[:, :4]
    acc = accumulate(x, target=t)
    xn, tn = x.double().numpy(), t.double().numpy()
    np.testing.assert_allclose(acc.mean.numpy(), xn.mean(0), rtol=1e-6)
    np.testing.assert_allclose(acc.cov.numpy(), np.cov(xn.T, bias=True), rtol=1e-5, atol=1e-5)
    cross = (tn - tn.mean(0)).T @ (xn - xn.mean(0)) / len(xn)
    np.testing.assert_allclose(acc.cross_cov.numpy(), cross, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(acc.target_mean.numpy(), tn.mean(0), rtol=1e-6)
    # finish(): the same matrices, made in place (the lsq pass's memory), and the accumulator is spent
    cov, cross_cov = acc.cov, acc.cross_cov
    got, got_cross = acc.finish()
    assert got.data_ptr() == acc.m2.data_ptr() and got_cross is not None
    torch.testing.assert_close(got, cov, rtol=1e-15, atol=0)
    torch.testing.assert_close(got_cross, cross_cov, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="update\\(\\) after finish"):
        acc.update(x[:3], t[:3])


@pytest.mark.parametrize("drift", [False, True], ids=["plain", "drift"])
def test_kept_columns_only_give_the_same_moments_and_fit(drift):
    """CovAccumulator(cols=K) keeps Σ[:, K] (and the cross covariance's columns K): the same numbers as the
    full matrices' columns, and lsq_solve gives the same fit from either layout."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(158, 9, generator=g, dtype=torch.float64) @ torch.randn(9, 9, generator=g, dtype=torch.float64)
    t = x + 0.1 * torch.randn(158, 9, generator=g, dtype=torch.float64) if drift else None
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    full = accumulate(x, target=t)
    part = CovAccumulator(9, target_dim=9 if drift else None, cols=keep)
    start = 0
    for s in (7, 50, 1, 100):
        part.update(x[start:start + s], None if t is None else t[start:start + s])
        start += s
    assert part.m2.shape == (9, 6)
    torch.testing.assert_close(part.cov, full.cov[:, keep], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(part.mean, full.mean, rtol=0, atol=0)
    torch.testing.assert_close(part.variances(), full.variances()[keep], rtol=1e-12, atol=1e-12)
    w = torch.randn(4, 9, generator=g, dtype=torch.float64)
    extra = {}
    if drift:
        extra = {"cross": full.cross_cov, "target_mean": full.target_mean}
    ref = lsq_solve(w, full.cov, full.mean, keep, 0.05, **extra)
    if drift:
        extra = {"cross": part.cross_cov, "target_mean": part.target_mean}
    got = lsq_solve(w, part.cov, part.mean, keep, 0.05, **extra)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(FlapError, match="the covariance is \\(9, 5\\); expected \\[9, 9\\] or its kept columns"):
        lsq_solve(w, full.cov[:, :5], full.mean, keep, 0.05)


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_solve_equals_numpy_lstsq_with_intercept(damping):
    g = torch.Generator().manual_seed(1)
    n, d, d_out = 158, 10, 6
    w = torch.randn(d_out, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    x += torch.randn(d, generator=g, dtype=torch.float64)  # a non-zero mean: the intercept matters
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    acc = accumulate(x)
    cov = acc.cov
    before = cov.clone()
    w_k, b = lsq_solve(w, cov, acc.mean, keep, damping)
    assert torch.equal(cov, before)  # the damping is added to a copy of Σ[K, K], never to the caller's Σ

    # independent: ordinary least squares on the stacked tokens, [x_K, 1] -> W x, ridge rows toward W[:, K]
    xn, wn, kn = x.numpy(), w.numpy(), keep.numpy()
    a = np.hstack([xn[:, kn], np.ones((n, 1))])
    y = xn @ wn.T
    lam = damping * np.diag(np.cov(xn[:, kn].T, bias=True)).mean()
    if damping:
        ridge = np.sqrt(lam * n) * np.eye(kn.sum(), kn.sum() + 1)  # no penalty on the intercept
        a, y = np.vstack([a, ridge]), np.vstack([y, np.sqrt(lam * n) * wn[:, kn].T])
    sol = np.linalg.lstsq(a, y, rcond=None)[0]
    np.testing.assert_allclose(w_k.numpy(), sol[:-1].T, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(b.numpy(), sol[-1], rtol=1e-8, atol=1e-9)


def test_solve_large_damping_is_flap_bias_and_converges_monotonically():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64) + 1.5
    keep = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    acc = accumulate(x, sizes=(200,))
    dists = []
    for damping in (0.0, 0.1, 10.0, 1e3, 1e9):
        w_k, b = lsq_solve(w, acc.cov, acc.mean, keep, damping)
        dists.append(float((w_k - w[:, keep]).norm()))
    assert all(a > b for a, b in zip(dists, dists[1:], strict=False)) and dists[0] > 0.1
    torch.testing.assert_close(w_k, w[:, keep], rtol=0, atol=1e-7)
    torch.testing.assert_close(b, compensation_bias(w, keep, acc.mean), rtol=1e-7, atol=1e-7)


def duplicated_model(heads: int, kv: int):
    """A float64 tiny model where k/v group 1 repeats group 0 and MLP channels 5, 7 repeat 3 (x1, x2):
    the pruned inputs are exact linear combinations of the kept ones."""
    model = tiny_model(heads=heads, kv=kv, layers=3).double()
    arch = ArchView.from_config(model.config)
    hd, qg = arch.head_dim, arch.group_size * arch.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            a.q_proj.weight[qg:2 * qg] = a.q_proj.weight[:qg]
            for lin in (a.k_proj, a.v_proj):
                lin.weight[hd:2 * hd] = lin.weight[:hd]
            for j, scale in ((5, 1.0), (7, 2.0)):
                m.gate_proj.weight[j] = m.gate_proj.weight[3]
                m.up_proj.weight[j] = scale * m.up_proj.weight[3]
    keep_g = torch.ones(arch.num_kv_heads, dtype=torch.bool)
    keep_g[1] = False
    keep_c = torch.ones(arch.intermediate_size, dtype=torch.bool)
    keep_c[[5, 7]] = False
    return model, arch, Selection([keep_g] * arch.num_layers, [keep_c] * arch.num_layers)


@pytest.mark.parametrize("heads,kv", [(4, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("form", ["sequential", "dense", "drift"])
def test_exact_linear_combinations_reproduce_the_dense_model(heads, kv, form, windows):
    model, arch, sel = duplicated_model(heads, kv)
    dense = logits(model)
    comps = lsq_compensation(model, sel, arch, windows, CompensationConfig("lsq", 0.0, form), progress=False)
    lsq_m, bias_m = copy.deepcopy(model), copy.deepcopy(model)
    mask_model(lsq_m, sel, comps, arch)
    mask_model(bias_m, sel, compensation_biases(model, collect_stats(model, windows, progress=False), sel, arch),
               arch)
    torch.testing.assert_close(logits(lsq_m), dense, rtol=1e-8, atol=1e-8)
    assert (logits(bias_m) - dense).abs().max() > 1e-2  # the bias alone cannot: the test can fail


def al_am(model, windows, p=0.4, **opts):
    arch = ArchView.from_config(model.config)
    stats = collect_stats(model, windows, progress=False)
    sel = get_structure("al_am")(channel_scores(get_metric("wifv"), model, stats), arch, p, StructureOptions(**opts))
    return arch, stats, sel


def test_large_damping_gives_flap_bias_on_the_model(model, windows):
    arch, stats, sel = al_am(model, windows)
    comps = lsq_compensation(model, sel, arch, windows, CompensationConfig("lsq", 1e9, "dense"), progress=False)
    for i, ((o_b, d_b), c) in enumerate(zip(compensation_biases(model, stats, sel, arch), comps, strict=True)):
        layer = model.model.layers[i]
        torch.testing.assert_close(c.o_weight, layer.self_attn.o_proj.weight[:, sel.channel_mask(i, arch)].double(),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(c.down_weight, layer.mlp.down_proj.weight[:, sel.keep_channels[i]].double(),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(c.o_bias, o_b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c.down_bias, d_b, rtol=1e-4, atol=1e-5)


def record_moments(model, sel, arch, windows, form):
    seen = {}
    lsq_compensation(model, sel, arch, windows, CompensationConfig("lsq", 0.01, form), progress=False,
                     on_moments=lambda i, name, acc: seen.__setitem__((i, name), (acc.mean.clone(),
                                                                                  acc.variances().clone(),
                                                                                  acc.cols)))
    return seen


def test_sequential_and_dense_statistics_differ_exactly_where_they_must(windows):
    model = tiny_model(heads=4, kv=2, layers=3).double()
    arch, stats, sel = al_am(model, windows, 0.5)
    assert not sel.keep_groups[0].all()  # layer 0 loses attention, so its MLP input changes too
    seq, den = record_moments(model, sel, arch, windows, "sequential"), record_moments(model, sel, arch, windows,
                                                                                       "dense")
    # dense form: exactly collect_stats on the dense model (an independent accumulator)
    for i, s in enumerate(stats):
        for name, cs in (("o_proj", s.attn), ("down_proj", s.mlp)):
            torch.testing.assert_close(den[i, name][0], cs.mean, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(den[i, name][1], cs.m2[den[i, name][2]], rtol=1e-9, atol=1e-9)
    # layer 0's attention input is the same stream; everything after it sees the pruned, reconstructed model
    torch.testing.assert_close(seq[0, "o_proj"][0], den[0, "o_proj"][0], rtol=0, atol=0)
    torch.testing.assert_close(seq[0, "o_proj"][1], den[0, "o_proj"][1], rtol=0, atol=0)
    assert torch.equal(seq[0, "o_proj"][2], sel.channel_mask(0, arch).nonzero().squeeze(1))  # the kept columns
    for key in [(0, "down_proj")] + [(i, n) for i in range(1, arch.num_layers) for n in ("o_proj", "down_proj")]:
        assert (seq[key][0] - den[key][0]).abs().max() > 1e-3, key
    # sequential: the kept inputs' statistics are those of the masked model carrying the lsq result
    comps = lsq_compensation(model, sel, arch, windows, CompensationConfig("lsq", 0.01, "sequential"),
                             progress=False)
    masked = copy.deepcopy(model)
    mask_model(masked, sel, comps, arch)
    for i, s in enumerate(collect_stats(masked, windows, progress=False)):
        for name, cs, keep in (("o_proj", s.attn, sel.channel_mask(i, arch)), ("down_proj", s.mlp,
                                                                              sel.keep_channels[i])):
            torch.testing.assert_close(seq[i, name][0][keep], cs.mean[keep], rtol=1e-7, atol=1e-9)
            torch.testing.assert_close(seq[i, name][1], cs.m2[keep], rtol=1e-7, atol=1e-9)


def test_layer0_attention_unpruned_gives_identical_layer0(windows):
    model = tiny_model(heads=4, kv=2, layers=3).double()
    arch, _, sel = al_am(model, windows, 0.5)
    sel.keep_groups[0] = torch.ones_like(sel.keep_groups[0])
    seq, den = record_moments(model, sel, arch, windows, "sequential"), record_moments(model, sel, arch, windows,
                                                                                       "dense")
    for name in ("o_proj", "down_proj"):
        torch.testing.assert_close(seq[0, name][0], den[0, name][0], rtol=1e-10, atol=1e-10)
    assert (seq[1, "o_proj"][0] - den[1, "o_proj"][0]).abs().max() > 1e-3


@pytest.mark.parametrize("form", ["sequential", "drift"])
def test_masked_equals_physical_equals_reloaded_with_lsq(model, windows, tmp_path, form):
    arch, stats, sel = al_am(model, windows)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    comps = lsq_compensation(model, sel, arch, windows, CompensationConfig("lsq", 0.01, form), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the caller's model untouched
    masked, pruned, biased = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    mask_model(masked, sel, comps, arch)
    prune_model(pruned, sel, comps, arch)
    prune_model(biased, sel, compensation_biases(model, stats, sel, arch), arch)  # old tuple form still works
    torch.testing.assert_close(logits(pruned), logits(masked), rtol=1e-5, atol=1e-5)
    assert (logits(pruned) - logits(biased)).abs().max() > 1e-3  # the new weights were applied
    save_pruned(pruned, None, {"selection": sel.to_json(), "compensation": {"method": "lsq", "form": form}},
                tmp_path / "m")
    back, _, manifest = load_pruned(tmp_path / "m")
    torch.testing.assert_close(logits(back), logits(pruned), rtol=0, atol=0)
    assert manifest["compensation"]["method"] == "lsq"


def test_singular_covariance_without_damping_names_the_layer(windows):
    model, arch, sel = duplicated_model(4, 2)
    sel.keep_channels[0] = torch.ones_like(sel.keep_channels[0])  # keep channel 3 and its copies 5, 7
    with pytest.raises(FlapError, match=r"layer 0 down_proj: .*singular.*damping > 0"):
        lsq_compensation(model, sel, arch, windows, CompensationConfig("lsq", 0.0), progress=False)
    lsq_compensation(model, sel, arch, windows, CompensationConfig("lsq", 0.01), progress=False)  # damped: fine


def test_nan_in_covariance_is_an_error(windows):
    w, keep = torch.randn(3, 4), torch.tensor([True, False, True, True])
    cov = torch.eye(4, dtype=torch.float64)
    cov[1, 2] = float("nan")
    with pytest.raises(FlapError, match="layer 2 o_proj: .*NaN"):
        lsq_solve(w, cov, torch.zeros(4), keep, 0.01, name="layer 2 o_proj")
    model = tiny_model(heads=4, kv=2, layers=3)
    arch, _, sel = al_am(model, windows)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FlapError, match="layer 1 down_proj: .*NaN"):
        lsq_compensation(model, sel, arch, windows, LSQ, progress=False)


@pytest.mark.parametrize("cfg,msg", [(CompensationConfig("lsq", 0.01, "bogus"),
                                      "unknown lsq form 'bogus'; known forms: sequential, dense, drift"),
                                     (CompensationConfig("lsq", -1.0), "damping must be a finite number >= 0"),
                                     (CompensationConfig("lsq", float("nan")), "damping must be")])
def test_bad_options_are_refused_before_any_work(cfg, msg, windows):
    model = tiny_model()
    arch, _, sel = al_am(model, windows)
    with pytest.raises(FlapError, match=msg):
        lsq_compensation(model, sel, arch, windows, cfg, progress=False)


def test_holding_the_kept_mlp_inputs_or_recomputing_them_gives_the_same_result(windows):
    model = tiny_model(heads=4, kv=2, layers=3)
    arch, _, sel = al_am(model, windows, 0.5)
    held = lsq_compensation(model, sel, arch, windows, LSQ, progress=False)
    recomputed = lsq_compensation(model, sel, arch, windows, LSQ, progress=False, store_budget=0)
    for a, b in zip(held, recomputed, strict=True):
        for x, y in ((a.o_weight, b.o_weight), (a.down_weight, b.down_weight), (a.o_bias, b.o_bias),
                     (a.down_bias, b.down_bias)):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
