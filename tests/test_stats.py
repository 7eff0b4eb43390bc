import numpy as np
import pytest
import torch

from flap_exp.hooks import input_hooks
from flap_exp.stats import ChannelStats, LayerStats, stats_from_tensors, stats_to_tensors


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


def _reference_of(x: torch.Tensor):
    """The former float64 per-batch formulas (centred copy, squared copy): the reference of record."""
    x = x.reshape(-1, x.shape[-1]).double()
    mean = x.mean(0)
    return mean, ((x - mean) ** 2).sum(0), (x * x).mean(0)


@pytest.mark.parametrize("offset,scale", [(0.0, 1.0), (3.0, 0.5), (1000.0, 0.01), (-20.0, 50.0)])
def test_fast_batch_stats_match_float64_reference(offset, scale):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(8, 128, 40, generator=g) * scale + offset).float()  # float32 activations, as hooks see
    s = ChannelStats.of(x)
    mean, m2, meansq = _reference_of(x)
    for got, ref in ((s.mean, mean), (s.m2, m2), (s.meansq, meansq)):
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-9, atol=0)


def test_float32_accumulation_would_break_the_1e9_promise():
    """Why the per-batch moments stay float64: float32 sums over 1024 tokens miss 1e-9 relative."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(1024, 64, generator=g) * 0.5 + 0.1).float()
    m2_32 = ((x - x.mean(0)) ** 2).sum(0).double()
    _, m2, _ = _reference_of(x)
    assert ((m2_32 - m2).abs() / m2).max() > 1e-9
    assert ((ChannelStats.of(x).m2 - m2).abs() / m2).max() < 1e-12
