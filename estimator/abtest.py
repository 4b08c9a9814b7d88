"""Statistics for comparing two deployments on live traffic: rates, quantiles, ratios.

Pure functions on counts and numpy arrays; the methods are named in every report that uses
them, so a reader can check them.

* **Proportions** (error rate, SLO-miss rate): Wilson score intervals per group, and for the
  difference ``p_candidate - p_baseline`` Newcombe's hybrid score interval (Newcombe 1998,
  method 10): good coverage at small counts and at rates near 0 or 1, where the normal
  (Wald) interval collapses to a point (0 errors in 30 requests is not "exactly 0%").
* **Rollback rule** (``worse_by``): the candidate is worse when the one-sided lower bound of
  that difference, at the configured confidence, exceeds the margin. The rule is evaluated
  again and again on a sliding window, so its false-alarm rate is higher than one look's
  ``1 - confidence``; the margin is what keeps two equal deployments from tripping it (the
  bound must clear ``margin`` above 0, not 0). tests/unit/estimator/test_abtest.py measures
  the false-alarm rate of repeated looks on simulated equal groups.
* **Quantiles** (TTFT, ITL percentiles): the percentile bootstrap of the difference and the
  ratio of the two groups' quantiles (independent resampling of each group; paired resampling
  when the samples are the same requests, as shadow copies are), seeded, so a report is
  reproducible. Samples beyond ``max_n`` per group are thinned to the most recent ``max_n``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

PROPORTION_METHOD = "Newcombe hybrid score interval (Wilson per group)"
QUANTILE_METHOD = "percentile bootstrap"


def z_of(confidence: float, *, two_sided: bool) -> float:
    """The standard normal quantile for a confidence level (0.95 two-sided: 1.96)."""
    tail = (1.0 - confidence) / (2.0 if two_sided else 1.0)
    return NormalDist().inv_cdf(1.0 - tail)


def wilson(x: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion ``x / n``; ``(0, 1)`` without data."""
    if n <= 0:
        return 0.0, 1.0
    p = x / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / n + z2n / (4 * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def diff_interval(x1: int, n1: int, x2: int, n2: int, z: float) -> tuple[float, float, float]:
    """``(p1 - p2, low, high)`` by Newcombe's hybrid score interval."""
    p1 = x1 / n1 if n1 else 0.0
    p2 = x2 / n2 if n2 else 0.0
    l1, u1 = wilson(x1, n1, z)
    l2, u2 = wilson(x2, n2, z)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, max(-1.0, low), min(1.0, high)


def worse_by(
    x_cand: int, n_cand: int, x_base: int, n_base: int, *, margin: float, confidence: float
) -> tuple[bool, float]:
    """Is the candidate's rate higher than the baseline's by more than ``margin`` with one-sided
    ``confidence``? Returns the decision and the lower bound of the difference."""
    _, low, _ = diff_interval(x_cand, n_cand, x_base, n_base, z_of(confidence, two_sided=False))
    return low > margin, low


@dataclass(frozen=True, slots=True, kw_only=True)
class RateComparison:
    """Two groups' rates of one kind of event, and their difference with a two-sided CI."""

    baseline: float | None
    candidate: float | None
    baseline_n: int
    candidate_n: int
    difference: float | None
    low: float | None
    high: float | None
    significant: bool
    method: str = PROPORTION_METHOD


def compare_rates(
    x_base: int, n_base: int, x_cand: int, n_cand: int, *, confidence: float = 0.95
) -> RateComparison:
    if n_base == 0 or n_cand == 0:
        return RateComparison(
            baseline=x_base / n_base if n_base else None,
            candidate=x_cand / n_cand if n_cand else None,
            baseline_n=n_base,
            candidate_n=n_cand,
            difference=None,
            low=None,
            high=None,
            significant=False,
        )
    d, low, high = diff_interval(x_cand, n_cand, x_base, n_base, z_of(confidence, two_sided=True))
    return RateComparison(
        baseline=x_base / n_base,
        candidate=x_cand / n_cand,
        baseline_n=n_base,
        candidate_n=n_cand,
        difference=d,
        low=low,
        high=high,
        significant=low > 0 or high < 0,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantileComparison:
    """One quantile of one latency in both groups, with bootstrap CIs of their difference
    (candidate - baseline, seconds) and ratio (candidate / baseline)."""

    quantile: float
    baseline: float | None
    candidate: float | None
    difference: float | None
    difference_low: float | None
    difference_high: float | None
    ratio: float | None
    ratio_low: float | None
    ratio_high: float | None
    significant: bool  # the difference's CI excludes 0
    baseline_n: int
    candidate_n: int
    paired: bool
    method: str = QUANTILE_METHOD


def _thin(x: np.ndarray, max_n: int) -> np.ndarray:
    return x[-max_n:] if x.size > max_n else x


def compare_quantiles(
    base: Sequence[float] | np.ndarray,
    cand: Sequence[float] | np.ndarray,
    quantiles: Sequence[float] = (0.5, 0.95),
    *,
    paired: bool = False,
    confidence: float = 0.95,
    resamples: int = 500,
    max_n: int = 2000,
    seed: int = 0,
) -> list[QuantileComparison]:
    """Bootstrap CIs of quantile differences and ratios (module docstring). ``paired``: the
    i-th values of both samples belong to the same request (equal lengths)."""
    a = _thin(np.asarray(base, dtype=np.float64), max_n)
    b = _thin(np.asarray(cand, dtype=np.float64), max_n)
    if paired and a.size != b.size:
        raise ValueError("paired samples need equal lengths")
    qs = np.asarray(quantiles, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        return [_empty_quantile(float(q), a, b, paired) for q in qs]
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, a.size, size=(resamples, a.size))
    ib = ia if paired else rng.integers(0, b.size, size=(resamples, b.size))
    qa = np.quantile(a[ia], qs, axis=1)  # (len(qs), resamples)
    qb = np.quantile(b[ib], qs, axis=1)
    pa, pb = np.quantile(a, qs), np.quantile(b, qs)
    lo_p, hi_p = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    out = []
    for k, q in enumerate(qs):
        diff = qb[k] - qa[k]
        ratio = qb[k] / np.where(qa[k] > 0, qa[k], np.nan)
        d_lo, d_hi = (float(v) for v in np.percentile(diff, [lo_p, hi_p]))
        finite = ratio[np.isfinite(ratio)]
        r_lo, r_hi = (
            (float(v) for v in np.percentile(finite, [lo_p, hi_p])) if finite.size else (None, None)
        )
        out.append(
            QuantileComparison(
                quantile=float(q),
                baseline=float(pa[k]),
                candidate=float(pb[k]),
                difference=float(pb[k] - pa[k]),
                difference_low=d_lo,
                difference_high=d_hi,
                ratio=float(pb[k] / pa[k]) if pa[k] > 0 else None,
                ratio_low=r_lo,
                ratio_high=r_hi,
                significant=d_lo > 0 or d_hi < 0,
                baseline_n=int(a.size),
                candidate_n=int(b.size),
                paired=paired,
            )
        )
    return out


def _empty_quantile(q: float, a: np.ndarray, b: np.ndarray, paired: bool) -> QuantileComparison:
    va = float(np.quantile(a, q)) if a.size else None
    vb = float(np.quantile(b, q)) if b.size else None
    return QuantileComparison(
        quantile=q,
        baseline=va,
        candidate=vb,
        difference=None,
        difference_low=None,
        difference_high=None,
        ratio=None,
        ratio_low=None,
        ratio_high=None,
        significant=False,
        baseline_n=int(a.size),
        candidate_n=int(b.size),
        paired=paired,
    )


def percentile_interval(
    values: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> tuple[float, float] | None:
    """The central ``confidence`` interval of bootstrap replicates (None without finite ones)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return None
    lo, hi = np.percentile(x, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2])
    return float(lo), float(hi)
