import numpy as np
import pytest

from flap_exp.calibrate import collect_stats
from flap_exp.catalogue import METHODS, METRICS
from flap_exp.errors import FlapError
from flap_exp.metrics import channel_scores, get_metric

from reference import capture_inputs, metric_np


def test_statistics_match_a_full_dense_forward(model, windows):
    stats = collect_stats(model, windows, batch_size=3, progress=False)
    ref = capture_inputs(model, windows)
    for i, s in enumerate(stats):
        a, x = ref[i]
        assert s.attn.count == a.shape[0] == windows.numel()
        np.testing.assert_allclose(s.attn.mean.numpy(), a.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.attn.var.numpy(), a.var(0, ddof=1), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(s.mlp.var.numpy(), x.var(0, ddof=1), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(s.mlp.meansq.numpy(), (x ** 2).mean(0), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", [m for m in METRICS if METHODS[m].selector == "score"])  # obs has no score
def test_metric_matches_plain_rederivation(model, windows, name):
    metric = get_metric(name)
    stats = collect_stats(model, windows, progress=False) if metric.needs_data else None
    got = channel_scores(metric, model, stats)
    ref = capture_inputs(model, windows)
    for i, layer in enumerate(model.model.layers):
        wo = layer.self_attn.o_proj.weight.detach().double().numpy()
        wd = layer.mlp.down_proj.weight.detach().double().numpy()
        a = metric_np(name, wo, ref[i][0])
        if name in ("ifv", "wifv", "wifn"):  # the official code squares the attention score of FLAP's metrics
            a = a ** 2
        np.testing.assert_allclose(got[i][0].numpy(), a, rtol=2e-4, atol=1e-10)
        np.testing.assert_allclose(got[i][1].numpy(), metric_np(name, wd, ref[i][1]), rtol=2e-4, atol=1e-10)


def test_square_attn_can_be_switched_off(model, windows):
    stats = collect_stats(model, windows, progress=False)
    on = channel_scores(get_metric("wifv"), model, stats)
    off = channel_scores(get_metric("wifv"), model, stats, square_attn=False)
    np.testing.assert_allclose(on[0][0].numpy(), off[0][0].numpy() ** 2)
    np.testing.assert_allclose(on[0][1].numpy(), off[0][1].numpy())


def test_unknown_metric_lists_known():
    with pytest.raises(FlapError, match="known metrics: ifv, wifv, wifn, weight_magnitude, wanda_sp"):
        get_metric("fluct")
