"""Known-answer tests for ffn_jax.stats; each expected value is computed independently here."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from ffn_jax import stats

DIFFS = [-0.031, -0.012, -0.025, 0.004, -0.018, -0.022, -0.009]


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_paired_matches_hand_formula_and_ttest(level):
    n = len(DIFFS)
    mean = sum(DIFFS) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in DIFFS) / (n - 1))
    se = sd / math.sqrt(n)
    q = sps.t.ppf(1 - (1 - level) / 2, n - 1)
    r = stats.paired(DIFFS, level)
    assert r.n == n
    assert r.mean == pytest.approx(mean, rel=1e-12)
    assert r.se == pytest.approx(se, rel=1e-12)
    assert (r.lo, r.hi) == pytest.approx((mean - q * se, mean + q * se), rel=1e-12)
    assert r.p == pytest.approx(sps.ttest_1samp(DIFFS, 0.0).pvalue, rel=1e-10)


def test_paired_degenerate_cases():
    one = stats.paired([0.3])
    assert one.mean == 0.3 and one.n == 1
    assert all(math.isnan(x) for x in (one.se, one.lo, one.hi, one.p))
    same = stats.paired([0.1, 0.1, 0.1])
    assert (same.se, same.lo, same.hi, same.p) == (0.0, same.mean, same.mean, 0.0)
    assert same.mean == pytest.approx(0.1)
    zero = stats.paired([0.0, 0.0])
    assert (zero.mean, zero.se, zero.p) == (0.0, 0.0, 1.0)


def test_holm_textbook_example():
    adj = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)


def test_holm_nan_is_kept_and_not_counted():
    adj = stats.holm([0.01, math.nan, 0.04, 0.03, 0.005])
    assert math.isnan(adj[1])
    assert [adj[i] for i in (0, 2, 3, 4)] == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)


def _holm_slow(p):
    """Definition: adj_(i) = max over j <= i (sorted) of min(1, (m - j) p_(j)), j from 0."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    for rank, i in enumerate(order):
        out[i] = max(min(1.0, (m - j) * p[order[j]]) for j in range(rank + 1))
    return out


def test_holm_monotone_capped_and_matches_definition():
    p = list(np.random.default_rng(1).uniform(0, 0.4, size=12))
    adj = stats.holm(p)
    assert adj == pytest.approx(_holm_slow(p), rel=1e-12)
    in_p_order = [adj[i] for i in np.argsort(p)]
    assert all(a <= b for a, b in zip(in_p_order, in_p_order[1:], strict=False))
    assert all(a >= raw for a, raw in zip(adj, p, strict=True))
    assert max(adj) == 1.0
    assert stats.holm([0.4, 0.9, 0.45]) == [1.0, 1.0, 1.0]


def test_bonferroni_level():
    assert stats.bonferroni_level(0.95, 5) == pytest.approx(0.99)
    assert stats.bonferroni_level(0.9, 1) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        stats.bonferroni_level(0.95, 0)


def _paired_t_power(delta, sd, n, alpha):
    df = n - 1
    crit = sps.t.ppf(1 - alpha / 2, df)
    nc = delta * math.sqrt(n) / sd
    return sps.nct.sf(crit, df, nc) + sps.nct.sf(crit, df, -nc)  # upper + lower rejection


@pytest.mark.parametrize("n", [2, 3, 5, 20])
def test_mde_has_the_requested_power(n):
    mde = stats.min_detectable_effect(0.02, n)
    assert _paired_t_power(mde, 0.02, n, 0.05) == pytest.approx(0.8, abs=1e-8)
    assert stats.min_detectable_effect(0.04, n) == pytest.approx(2 * mde, rel=1e-8)


def test_mde_shrinks_with_n_and_approaches_normal_formula():
    mdes = [stats.min_detectable_effect(1.0, n) for n in (2, 3, 5, 10, 50)]
    assert all(a > b for a, b in zip(mdes, mdes[1:], strict=False))
    n = 2000
    normal = (sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) / math.sqrt(n)
    assert stats.min_detectable_effect(1.0, n) == pytest.approx(normal, rel=2e-3)
    assert math.isnan(stats.min_detectable_effect(1.0, 1))
    assert math.isnan(stats.min_detectable_effect(0.0, 5))
    assert math.isnan(stats.min_detectable_effect(math.nan, 5))


def _units(u, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(50, 500, size=u).astype(np.float64)
    nll = tokens * rng.normal(3.0, 0.3, size=u)
    return nll, tokens


def test_bootstrap_contains_point_and_narrows_with_more_units():
    nll, tok = _units(100)
    lo, hi = stats.bootstrap_ci(nll, tok)
    assert lo < nll.sum() / tok.sum() < hi
    nll_big, tok_big = _units(1600)
    lo_big, hi_big = stats.bootstrap_ci(nll_big, tok_big)
    assert hi_big - lo_big < 0.5 * (hi - lo)  # ~sqrt(16) = 4x narrower
    assert stats.bootstrap_ci(nll, tok, seed=3) == stats.bootstrap_ci(nll, tok, seed=3)


def test_bootstrap_width_matches_delta_method():
    nll, tok = _units(2000, seed=5)
    u, ratio = nll.size, nll.sum() / tok.sum()
    # Ratio-estimator SE: sqrt(sum((nll_i - R tok_i)^2)) / sum(tok), with the U/(U-1) dropped.
    se = math.sqrt(np.sum((nll - ratio * tok) ** 2)) / tok.sum()
    lo, hi = stats.bootstrap_ci(nll, tok, level=0.9)
    z = sps.norm.ppf(0.95)
    assert ratio - lo == pytest.approx(z * se, rel=0.1)
    assert hi - ratio == pytest.approx(z * se, rel=0.1)
    assert u == 2000


def test_bootstrap_equal_ratio_units_give_a_point():
    tok = np.array([10.0, 40.0, 25.0, 5.0, 80.0])
    lo, hi = stats.bootstrap_ci(2.5 * tok, tok)
    assert lo == pytest.approx(2.5, rel=1e-12) and hi == pytest.approx(2.5, rel=1e-12)


def test_blocks():
    np.testing.assert_array_equal(stats.blocks(np.arange(7), 3), [3, 12, 6])
    np.testing.assert_array_equal(stats.blocks(np.arange(6), 1), np.arange(6))
    np.testing.assert_array_equal(stats.blocks(np.arange(4), 10), [6])
    x = np.arange(10).reshape(5, 2)
    np.testing.assert_array_equal(stats.blocks(x, 2), [[2, 4], [10, 12], [8, 9]])


def test_best_index_skips_diverged_runs():
    assert stats.best_index([3.1, math.nan, 2.9, math.inf, 3.0]) == 2
    with pytest.raises(ValueError):
        stats.best_index([math.nan, math.inf])


@pytest.mark.parametrize(
    ("values", "losses", "edge", "nxt"),
    [
        ([3e-3, 1e-3, 1e-2], [2.9, 2.8, 3.0], "low", 1e-3 / 3),  # unsorted grid, best smallest
        ([1e-3, 3e-3, 1e-2], [3.0, 2.9, 2.8], "high", 3e-2),
        ([1e-3, 3e-3, 1e-2], [3.0, 2.8, 2.9], None, None),
        ([1e-3, 3e-3, 1e-2], [3.0, 2.8, math.nan], None, None),  # bracketed by divergence
        ([1e-2, 1e-3, 3e-3], [math.inf, 2.7, math.nan], "low", 1e-3 / 3),
    ],
)
def test_grid_edge_and_extend(values, losses, edge, nxt):
    assert stats.grid_edge(values, losses) == edge
    got = stats.extend_grid(values, losses, factor=3.0)
    assert got is None if nxt is None else got == pytest.approx(nxt)


def test_fit_power_law_recovers_noiseless_law():
    true = stats.PowerLaw(a=2.0e3, b=0.17, c=1.7)
    compute = np.logspace(17, 21, 7)
    fit = stats.fit_power_law(list(compute), list(true(compute)))
    assert fit.a == pytest.approx(true.a, rel=1e-3)
    assert fit.b == pytest.approx(true.b, rel=1e-3)
    assert fit.c == pytest.approx(true.c, rel=1e-3)


def test_fit_power_law_needs_three_distinct_points():
    with pytest.raises(ValueError, match="3 distinct"):
        stats.fit_power_law([1e18, 1e18, 2e18], [3.0, 3.0, 2.9])
    with pytest.raises(ValueError, match="does not fall"):
        stats.fit_power_law([1e17, 1e18, 1e19], [2.0, 2.5, 3.0])


def test_compute_multiplier_matches_analytic_ratio():
    ref = stats.PowerLaw(a=2.0e3, b=0.17, c=1.7)
    fit = stats.PowerLaw(a=1.5e3, b=0.19, c=1.6)
    loss = 2.5
    c_ref = (ref.a / (loss - ref.c)) ** (1 / ref.b)
    c_fit = (fit.a / (loss - fit.c)) ** (1 / fit.b)
    assert float(ref(c_ref)) == pytest.approx(loss) and float(fit(c_fit)) == pytest.approx(loss)
    assert stats.compute_multiplier(fit, ref, loss) == pytest.approx(c_ref / c_fit, rel=1e-9)
    same_b = stats.PowerLaw(a=1.0e3, b=0.17, c=1.7)
    assert stats.compute_multiplier(same_b, ref, 2.2) == pytest.approx(2.0 ** (1 / 0.17))
    assert math.isnan(stats.compute_multiplier(fit, ref, 1.7))


def test_mean_contrast_uses_common_seeds_and_group_means():
    # Seeds 0-2 are in every variant; 3, 4 and 5 are each missing somewhere and must be ignored.
    group_a = [{0: 3.0, 1: 3.1, 2: 3.2, 5: 1.0}, {0: 2.9, 1: 3.0, 2: 3.3, 3: 9.0}]
    group_b = [{0: 3.1, 1: 3.3, 2: 3.3, 4: 0.0}, {0: 3.3, 1: 3.1, 2: 3.5, 3: 2.0}]
    r = stats.mean_contrast(group_a, group_b)
    d = [2.95 - 3.2, 3.05 - 3.2, 3.25 - 3.4]  # per seed: mean of group_a - mean of group_b
    expected = stats.paired(d)
    assert r.n == 3
    assert r.mean == pytest.approx(sum(d) / 3)
    assert (r.se, r.lo, r.hi, r.p) == pytest.approx(
        (expected.se, expected.lo, expected.hi, expected.p)
    )
