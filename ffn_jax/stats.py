"""Statistics for the variant-comparison report: paired seed contrasts, multiplicity, power,
bootstrap intervals for corpus-level loss, learning-rate grid edges and scaling-law fits.

Every function is pure (numpy/scipy in, Python floats or numpy arrays out). Losses are
per-token negative log-likelihoods in nats; a paired difference is one seed's loss of
variant A minus variant B, so a negative mean favours A.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, stats


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} must lie strictly between 0 and 1 (e.g. 0.95)")


@dataclass(frozen=True)
class Paired:
    """Summary of paired differences: mean, standard error, t interval [lo, hi], p vs 0, n."""

    mean: float
    se: float
    lo: float
    hi: float
    p: float
    n: int


def paired(diffs: Sequence[float], level: float = 0.95) -> Paired:
    """Mean of paired differences (n,) with its t confidence interval and two-sided t-test p.

    se is the sample SD (ddof=1) over sqrt(n); the interval is mean +- t_{(1+level)/2, n-1} se.
    With n < 2 only the mean is defined (the rest is nan). Identical differences have se = 0:
    the interval collapses to the mean and p is 0 (mean != 0) or 1 (mean == 0).
    """
    _check_level(level)
    d = np.asarray(diffs, dtype=np.float64)
    n = d.size
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return Paired(mean, math.nan, math.nan, math.nan, math.nan, n)
    if np.all(d == d[0]):  # exact test: a float std of equal values need not be exactly 0
        return Paired(mean, 0.0, mean, mean, 0.0 if mean != 0 else 1.0, n)
    se = float(d.std(ddof=1) / math.sqrt(n))
    df = n - 1
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    p = float(2 * stats.t.sf(abs(mean) / se, df))
    return Paired(mean, se, mean - half, mean + half, p, n)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values, in the input order.

    The k-th smallest of m p-values (k from 0) is scaled by m - k, made non-decreasing by a
    running max and capped at 1; reject at family-wise alpha iff adjusted p <= alpha. nan
    entries stay nan and are not counted in m.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m = order.size
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return [float(x) for x in out]


def bonferroni_level(level: float, m: int) -> float:
    """Per-comparison confidence level 1 - (1 - level)/m for m simultaneous intervals."""
    _check_level(level)
    if m < 1:
        raise ValueError(f"m={m} must be >= 1 (the number of comparisons in the family)")
    return 1.0 - (1.0 - level) / m


def min_detectable_effect(sd_diff: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided paired t-test on n pairs detects with `power`.

    sd_diff is the SD of the paired differences. Power at noncentrality nc = delta sqrt(n)/sd
    is P(|T| > t_{1-alpha/2, n-1}) with T ~ noncentral t(n-1, nc); solved for nc by brentq.
    nan when n < 2 or sd_diff is 0 or nan.
    """
    if not (0 < alpha < 1 and alpha < power < 1):
        raise ValueError(f"need 0 < alpha < power < 1, got alpha={alpha}, power={power}")
    if n < 2 or not sd_diff > 0 or not math.isfinite(sd_diff):
        return math.nan
    df = n - 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))

    def gap(nc: float) -> float:
        # P(T < -crit | nc) = P(T > crit | -nc); scipy's nct.cdf can return nan far in the tail.
        return float(stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc)) - power

    hi = crit + 1.0
    while gap(hi) < 0:  # power rises with nc; df=1 needs nc far beyond crit
        hi *= 2
    nc, _ = optimize.brentq(gap, 0.0, hi, xtol=1e-12, full_output=True)
    return float(nc) * sd_diff / math.sqrt(n)


def blocks(values: np.ndarray, block: int) -> np.ndarray:
    """Sums consecutive groups of `block` rows: (N, ...) -> (ceil(N/block), ...).

    The last, partial block is kept. Turns per-window sums into contiguous-block bootstrap
    units, so correlation between neighbouring windows stays inside a unit.
    """
    if block < 1:
        raise ValueError(f"block={block} must be >= 1")
    values = np.asarray(values)
    if values.shape[0] == 0:
        return values.copy()
    return np.add.reduceat(values, np.arange(0, values.shape[0], block), axis=0)


def bootstrap_ci(
    unit_nll: np.ndarray,
    unit_tokens: np.ndarray,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(nll)/sum(tokens), resampling units with replacement.

    unit_nll (U,) is each unit's summed NLL, unit_tokens (U,) its scored-token count (> 0).
    Each resample is a row of a (n_boot, U) multinomial count matrix, drawn in row chunks so
    memory stays bounded for large U.
    """
    _check_level(level)
    nll = np.asarray(unit_nll, dtype=np.float64)
    tok = np.asarray(unit_tokens, dtype=np.float64)
    if nll.ndim != 1 or nll.shape != tok.shape or nll.size == 0:
        raise ValueError(f"need equal non-empty (U,) arrays, got {nll.shape} and {tok.shape}")
    if np.any(tok <= 0):
        raise ValueError("every unit needs unit_tokens > 0; drop empty units first")
    u = nll.size
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // u)  # rows per draw: <= ~32 MB of int64 counts
    ratios = []
    for start in range(0, n_boot, chunk):
        counts = rng.multinomial(u, np.full(u, 1.0 / u), size=min(chunk, n_boot - start))
        ratios.append((counts @ nll) / (counts @ tok))  # (rows,)
    lo, hi = np.quantile(np.concatenate(ratios), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def best_index(losses: Sequence[float]) -> int:
    """Index of the lowest finite loss (a diverged run is nan/inf); first one on ties."""
    loss = np.asarray(losses, dtype=np.float64)
    finite = np.isfinite(loss)
    if not finite.any():
        raise ValueError(f"every run diverged (losses={list(losses)}); lower the grid")
    return int(np.argmin(np.where(finite, loss, np.inf)))


def grid_edge(values: Sequence[float], losses: Sequence[float]) -> str | None:
    """Which grid edge holds the best run: "low" (smallest value), "high" (largest) or None.

    values (K,) need not be sorted; losses (K,) are aligned with them. The edge is judged on
    the sorted values, so a best run whose outside neighbour diverged counts as interior.
    """
    if len(values) != len(losses) or len(set(values)) < 2:
        raise ValueError(
            f"need >= 2 distinct grid values and one loss each, got {len(set(values))} "
            f"distinct values and {len(losses)} losses"
        )
    best = values[best_index(losses)]
    if best == min(values):
        return "low"
    if best == max(values):
        return "high"
    return None


def extend_grid(values: Sequence[float], losses: Sequence[float], factor: float) -> float | None:
    """Next grid value beyond the edge holding the best run (min/factor or max*factor)."""
    if not factor > 1:
        raise ValueError(f"factor={factor} must be > 1 (e.g. 2 or 3 for a log grid)")
    edge = grid_edge(values, losses)
    if edge == "low":
        return min(values) / factor
    if edge == "high":
        return max(values) * factor
    return None


@dataclass(frozen=True)
class PowerLaw:
    """Loss as a function of compute: L(C) = a C^(-b) + c, with c the irreducible loss."""

    a: float
    b: float
    c: float

    def __call__(self, compute: ArrayLike) -> np.ndarray:
        return self.a * np.asarray(compute, dtype=np.float64) ** (-self.b) + self.c


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> PowerLaw:
    """Least-squares fit of L = a C^(-b) + c to points (K,) with b > 0 and 0 <= c < min(loss).

    Fits (log A, b, c) of L = A x^(-b) + c on x = C / geomean(C), which keeps the problem well
    conditioned for C ~ 1e18; a = A geomean(C)^b. The start point is the best of a grid of c,
    each with (log A, b) from a straight line through log(L - c) against log x.
    """
    c_arr = np.asarray(compute, dtype=np.float64)
    l_arr = np.asarray(loss, dtype=np.float64)
    if c_arr.shape != l_arr.shape or np.unique(c_arr).size < 3:
        raise ValueError(
            f"need >= 3 distinct compute values with one loss each, got compute={list(compute)}"
            f", loss={list(loss)}"
        )
    if not (np.all(np.isfinite(l_arr)) and np.all(c_arr > 0) and l_arr.min() > 0):
        raise ValueError("compute must be > 0 and losses finite and > 0 (drop diverged runs)")
    log_c0 = float(np.log(c_arr).mean())
    log_x = np.log(c_arr) - log_c0

    def model(lx: np.ndarray, log_a: float, b: float, c: float) -> np.ndarray:
        return np.exp(log_a - b * lx) + c

    l_min = float(l_arr.min())
    starts = []
    for c in l_min * np.linspace(0.0, 0.99, 34):
        slope, log_a = np.polyfit(log_x, np.log(l_arr - c), 1)
        if slope < 0:
            sse = float(np.sum((model(log_x, log_a, -slope, c) - l_arr) ** 2))
            starts.append((sse, [log_a, -slope, c]))
    if not starts:
        raise ValueError(f"loss={list(loss)} does not fall with compute; no b > 0 fits it")
    p0 = min(starts, key=lambda s: s[0])[1]
    params, _ = optimize.curve_fit(
        model,
        log_x,
        l_arr,
        p0=p0,
        bounds=([-np.inf, 0.0, 0.0], [np.inf, np.inf, l_min]),
        ftol=1e-12,
        xtol=1e-12,
        gtol=1e-12,
        max_nfev=10_000,  # nearly flat data converge slowly
    )
    log_a, b, c = (float(v) for v in params)
    return PowerLaw(a=math.exp(log_a + b * log_c0), b=b, c=c)


def compute_multiplier(fit: PowerLaw, ref: PowerLaw, loss: float) -> float:
    """C_ref(loss) / C_fit(loss): how many times more compute `ref` needs to reach `loss`.

    Inverts L = a C^(-b) + c as C = (a / (L - c))^(1/b), in logs. nan when `loss` is at or
    below either law's asymptote c (that loss is never reached).
    """
    if loss <= fit.c or loss <= ref.c:
        return math.nan

    def log_compute(law: PowerLaw) -> float:
        return (math.log(law.a) - math.log(loss - law.c)) / law.b

    return math.exp(log_compute(ref) - log_compute(fit))


def mean_contrast(
    group_a: Sequence[Mapping[int, float]],
    group_b: Sequence[Mapping[int, float]],
    level: float = 0.95,
) -> Paired:
    """Paired contrast of two groups of variants, each variant given as {seed: loss}.

    Uses the seeds present in every variant of both groups; per seed, d = mean loss over
    group_a minus mean loss over group_b. Returns paired(d) over those seeds (sorted).
    """
    if not group_a or not group_b:
        raise ValueError("both groups need at least one variant")
    seeds = sorted(set.intersection(*(set(v) for v in (*group_a, *group_b))))
    diffs = [
        float(np.mean([v[s] for v in group_a]) - np.mean([v[s] for v in group_b])) for s in seeds
    ]
    return paired(diffs, level)
