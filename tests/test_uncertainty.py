"""Uncertainty of the reported numbers, against plain numpy: the perplexity interval over windows, the
standard error of a zero-shot average, and the within-noise verdict on a gap."""
import math

import numpy as np
import pytest
import torch

from flap_exp.errors import FlapError
from flap_exp.uncertainty import Z95, average_stderr, gap_within_noise, nll_stats, ppl_interval

from conftest import tiny_model


def test_ppl_interval_equals_numpy_normal_interval_on_the_mean_nll():
    nll = np.random.default_rng(0).gamma(4.0, 1.0, size=64)  # skewed, like per-window losses
    mean, std = nll_stats(nll.tolist())
    assert mean == pytest.approx(nll.mean(), rel=1e-12) and std == pytest.approx(nll.std(ddof=1), rel=1e-12)
    half = 1.959963984540054 * nll.std(ddof=1) / np.sqrt(64)
    lo, hi = ppl_interval(mean, std, 64)
    assert lo == pytest.approx(np.exp(nll.mean() - half), rel=1e-12)
    assert hi == pytest.approx(np.exp(nll.mean() + half), rel=1e-12)
    assert lo < math.exp(mean) < hi
    assert Z95 == pytest.approx(float(torch.distributions.Normal(0, 1).icdf(torch.tensor(0.975, dtype=torch.float64))))


def test_ppl_interval_covers_the_true_perplexity_about_95_percent_of_the_time():
    """Windows drawn from a known distribution (gamma(4, 1): mean NLL 4, true PPL e^4): the interval built on
    64 of them holds e^4 in ~95% of 4000 draws."""
    draws = np.random.default_rng(1).gamma(4.0, 1.0, size=(4000, 64))
    hits = 0
    for row in draws:
        lo, hi = ppl_interval(*nll_stats(row.tolist()), 64)
        hits += lo <= math.exp(4.0) <= hi
    assert 0.93 <= hits / 4000 <= 0.965


def test_one_window_has_no_interval_and_nan_is_refused():
    assert nll_stats([3.0]) == (3.0, None) and ppl_interval(3.0, None, 1) is None
    with pytest.raises(FlapError, match="not finite"):
        nll_stats([3.0, float("nan")])
    with pytest.raises(FlapError, match="not finite"):
        ppl_interval(3.0, float("inf"), 8)


def test_perplexity_carries_its_window_statistics_and_headline_unchanged():
    import torch.nn.functional as F

    from flap_exp.ppl import perplexity
    model = tiny_model()
    tokens = torch.randint(0, 101, (16 * 9 + 3,), generator=torch.Generator().manual_seed(2))
    got = perplexity(model, tokens, seqlen=16, batch_size=4, progress=False)
    with torch.no_grad():
        losses = np.array([F.cross_entropy(model(w[None]).logits[0, :-1], w[1:]).item()
                           for w in tokens[:16 * 9].view(9, 16)])
    assert math.isclose(got.ppl, math.exp(losses.mean()), rel_tol=1e-5)
    np.testing.assert_allclose(got.window_nll, losses, rtol=1e-5)
    assert got.nll_mean == pytest.approx(losses.mean(), rel=1e-5)
    assert got.nll_std == pytest.approx(losses.std(ddof=1), rel=1e-4)
    d = got.to_dict()
    assert "window_nll" not in d and d["nll_std"] == got.nll_std
    half = 1.959963984540054 * losses.std(ddof=1) / 3
    np.testing.assert_allclose(d["ppl_ci95"], np.exp(losses.mean() + np.array([-half, half])), rtol=1e-4)


def test_average_stderr_matches_the_spread_of_simulated_averages():
    """Three tasks of 50, 80 and 200 Bernoulli documents: the closed form equals numpy's formula and the
    empirical spread of the average over 20000 simulated evaluations."""
    p, n = np.array([0.45, 0.6, 0.3]), np.array([50, 80, 200])
    se = np.sqrt(p * (1 - p) / n)
    assert average_stderr(se.tolist()) == pytest.approx(np.sqrt((se ** 2).sum()) / 3, rel=1e-12)
    rng = np.random.default_rng(3)
    avgs = np.mean([rng.binomial(n, p) / n for _ in range(20000)], axis=1)
    assert average_stderr(se.tolist()) == pytest.approx(avgs.std(), rel=0.03)
    assert average_stderr([0.1, None]) is None and average_stderr([]) is None


def test_gap_within_noise_at_fifty_documents():
    """The committed zero-shot table: 48.6 vs 43.7 (averages of 7 tasks x 50 documents) is within noise; at
    1,000 documents per task the same gap is not."""
    def se(avg, n):  # the average's standard error when every task scores about `avg`
        return math.sqrt(7 * avg * (1 - avg) / (n - 1)) / 7
    assert gap_within_noise(0.486, se(0.486, 50), 0.437, se(0.437, 50)) is True
    assert gap_within_noise(0.486, se(0.486, 1000), 0.437, se(0.437, 1000)) is False
    assert 0.049 < 1.959963984540054 * np.sqrt(se(0.486, 50) ** 2 + se(0.437, 50) ** 2)  # numpy's own verdict
    assert gap_within_noise(0.5, None, 0.4, 0.01) is None


def test_paired_ratio_interval_equals_numpy_and_is_tighter_than_unpaired():
    from flap_exp.uncertainty import paired_ratio_interval
    rng = np.random.default_rng(4)
    hard = rng.gamma(4.0, 1.0, size=64)  # how hard each window is, shared by both models
    a, b = hard + 0.10 + rng.normal(0, 0.05, 64), hard + rng.normal(0, 0.05, 64)
    ratio, lo, hi = paired_ratio_interval(a.tolist(), b.tolist())
    d = a - b
    half = 1.959963984540054 * d.std(ddof=1) / 8
    assert ratio == pytest.approx(np.exp(a.mean()) / np.exp(b.mean()), rel=1e-12)
    assert (lo, hi) == pytest.approx((np.exp(d.mean() - half), np.exp(d.mean() + half)), rel=1e-12)
    assert lo > 1.0  # the 10% gap is resolved pairwise ...
    ia, ib = ppl_interval(*nll_stats(a.tolist()), 64), ppl_interval(*nll_stats(b.tolist()), 64)
    assert ia[0] < ib[1]  # ... though the two perplexities' own intervals overlap
    assert paired_ratio_interval([1.0, 2.0], [1.0]) is None


def test_lsq_sample_rule_on_smollm2_shapes_and_against_numpy_least_squares():
    """The rule in numbers (SmolLM2-135M: 3 groups of 3 query heads x 64 columns, MLP 1536), and the fact
    behind it: an OLS fit's held-out excess error is ~p/(n-p-1) of the noise (numpy, simulated)."""
    from flap_exp.adequacy import lsq_coefficients, lsq_sample_warning
    p = lsq_coefficients([3, 2, 3], [1200, 1536, 700], 3 * 64)
    assert p == 1537
    w = lsq_sample_warning(8, 128, p)
    assert "8 x 128 = 1,024" in w and "underdetermined" in w and "N >= 121 at T=128" in w
    assert "a noisy fit" in lsq_sample_warning(64, 128, p) and lsq_sample_warning(121, 128, p) is None
    rng = np.random.default_rng(5)
    k = 20  # coefficients
    for n, bound in ((10 * k, 0.12), (2 * k, 1.06)):
        excess = []
        for _ in range(300):
            x, beta = rng.normal(size=(n, k)), rng.normal(size=k)
            y = x @ beta + rng.normal(size=n)
            fit = np.linalg.lstsq(x, y, rcond=None)[0]
            xt = rng.normal(size=(2000, k))
            excess.append(np.mean((xt @ (fit - beta)) ** 2))
        assert np.mean(excess) == pytest.approx(k / (n - k - 1), rel=0.15) and k / (n - k - 1) < bound
