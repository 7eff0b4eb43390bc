import numpy as np
import pytest
import torch

from flap_exp.hooks import input_hooks
from flap_exp.stats import ChannelStats, stats_from_tensors, stats_to_tensors, LayerStats


@pytest.mark.parametrize("splits", [[1000], [1, 999], [7, 300, 2, 691], [500, 500]])
def test_batched_merge_equals_one_shot(splits):
    g = torch.Generator().manual_seed(0)
    # a large offset makes the naive sum-of-squares formula lose digits; Chan's merge must not
    x = torch.randn(sum(splits), 12, generator=g, dtype=torch.float64) * 0.01 + 1000.0
    acc = ChannelStats.empty(12)
    for part in x.split(splits):
        acc = acc.update(part.float().double())
    ref = x.float().double().numpy()
    assert acc.count == x.shape[0]
    np.testing.assert_allclose(acc.mean.numpy(), ref.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(acc.var.numpy(), ref.var(0, ddof=1), rtol=1e-9)
    np.testing.assert_allclose(acc.meansq.numpy(), (ref ** 2).mean(0), rtol=1e-12)


def test_stats_flatten_leading_dims_and_roundtrip():
    x = torch.randn(3, 5, 4)
    s = ChannelStats.of(x)
    np.testing.assert_allclose(s.var.numpy(), x.reshape(-1, 4).double().numpy().var(0, ddof=1), rtol=1e-10)
    back = stats_from_tensors(stats_to_tensors([LayerStats(s, s), LayerStats(s, s)]))
    assert len(back) == 2 and back[1].mlp.count == 15 and torch.equal(back[0].attn.m2, s.m2)


def test_hooks_removed_even_when_forward_raises():
    lin = torch.nn.Linear(3, 3)
    seen = []
    with pytest.raises(RuntimeError):
        with input_hooks({"a": lin}, lambda n, x: seen.append(n)):
            lin(torch.randn(2, 3))
            raise RuntimeError("boom")
    lin(torch.randn(2, 3))
    assert seen == ["a"] and not lin._forward_hooks
