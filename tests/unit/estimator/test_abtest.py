"""The experiment statistics: interval coverage, the rollback rule's false alarms under
repeated looks and its power, quantile comparisons."""

from __future__ import annotations

import numpy as np
import pytest

from estimator.abtest import (
    compare_quantiles,
    compare_rates,
    diff_interval,
    percentile_interval,
    wilson,
    worse_by,
    z_of,
)


@pytest.mark.parametrize(("x", "n", "lo", "hi"), [
    (0, 10, 0.0, 0.2775),  # the textbook value: Wald would say [0, 0]
    (10, 10, 0.7225, 1.0),
    (5, 10, 0.2366, 0.7634),
    (0, 0, 0.0, 1.0),
], ids=["none", "all", "half", "no-data"])  # fmt: skip
def test_wilson(x: int, n: int, lo: float, hi: float) -> None:
    got = wilson(x, n, 1.959964)
    assert got == pytest.approx((lo, hi), abs=5e-4)


@pytest.mark.parametrize(("p1", "p2", "n1", "n2"), [
    (0.02, 0.02, 40, 800), (0.1, 0.05, 200, 200), (0.0, 0.01, 30, 1000),
], ids=["rare-small", "moderate", "zero-rate"])  # fmt: skip
def test_newcombe_interval_covers_the_difference(p1: float, p2: float, n1: int, n2: int) -> None:
    rng = np.random.default_rng(7)
    x1, x2 = rng.binomial(n1, p1, 2000), rng.binomial(n2, p2, 2000)
    z = z_of(0.95, two_sided=True)
    covered = 0
    for a, b in zip(x1, x2, strict=True):
        _, lo, hi = diff_interval(int(a), n1, int(b), n2, z)
        covered += lo <= p1 - p2 <= hi
    assert covered / 2000 >= 0.93  # nominal 95%; Wald falls far below at these counts


# the defaults of the proxy's rollback rule (proxy.config.RollbackConfig; a proxy test checks
# they agree): 99.9% one-sided, margins of 2 points (errors) and 5 points (SLO misses), 10
# candidate requests at least, a 60 s window checked every second
CONFIDENCE, ERROR_MARGIN, SLO_MARGIN, MIN_SAMPLES, WINDOW = 0.999, 0.02, 0.05, 10, 60


def _looks(p_cand: float, p_base: float, seed: int, *, margin: float = ERROR_MARGIN,
           seconds: int = 600) -> int | None:  # fmt: skip
    """A canary of 1 req/s beside 19 req/s of baseline, judged every second on the window:
    the second it is rolled back at, None when never."""
    rng = np.random.default_rng(seed)
    nc, nb = rng.poisson(1.0, seconds), rng.poisson(19.0, seconds)
    xc, xb = rng.binomial(nc, p_cand), rng.binomial(nb, p_base)
    cum = [np.concatenate([[0], np.cumsum(a)]) for a in (nc, xc, nb, xb)]
    for t in range(seconds):
        lo = max(0, t + 1 - WINDOW)
        n_c, x_c, n_b, x_b = (int(c[t + 1] - c[lo]) for c in cum)
        if n_c >= MIN_SAMPLES and worse_by(x_c, n_c, x_b, n_b, margin=margin,
                                           confidence=CONFIDENCE)[0]:  # fmt: skip
            return t
    return None


@pytest.mark.parametrize(("rate", "margin", "most"), [
    (0.02, ERROR_MARGIN, 4),  # errors at 2%: measured 2 of 50 hours
    (0.10, SLO_MARGIN, 2),  # SLO misses at 10%: measured 0 of 50 hours
], ids=["errors", "slo"])  # fmt: skip
def test_an_hour_of_looks_rarely_rolls_back_an_equal_candidate(
    rate: float, margin: float, most: int
) -> None:
    """3,600 looks (one hour) on equal rates, in 50 simulated experiments."""
    alarms = sum(_looks(rate, rate, seed, margin=margin, seconds=3600) is not None
                 for seed in range(50))  # fmt: skip
    assert alarms <= most, f"{alarms} false rollbacks in 50 hours"


@pytest.mark.parametrize(("p_cand", "p_base", "margin", "within"), [
    (1.0, 0.02, ERROR_MARGIN, 30),  # every request fails
    (0.5, 0.02, ERROR_MARGIN, 40),
    (0.4, 0.10, SLO_MARGIN, 60),  # 40% miss the SLO instead of 10%
], ids=["all-fail", "half-fail", "slow"])  # fmt: skip
def test_a_failing_candidate_is_caught_within_a_window(
    p_cand: float, p_base: float, margin: float, within: int
) -> None:
    caught = [_looks(p_cand, p_base, seed, margin=margin, seconds=180) for seed in range(30)]
    assert all(t is not None for t in caught)
    assert max(t for t in caught if t is not None) < within


def test_compare_rates_reports_significance_both_ways() -> None:
    same = compare_rates(10, 1000, 1, 100)
    assert not same.significant and same.low is not None and same.low < 0 < same.high  # type: ignore[operator]
    worse = compare_rates(10, 1000, 30, 100)
    assert worse.significant and worse.difference == pytest.approx(0.29)
    empty = compare_rates(0, 0, 3, 10)
    assert empty.difference is None and not empty.significant


def test_quantile_comparison_finds_a_shift_and_not_noise() -> None:
    rng = np.random.default_rng(3)
    a = rng.lognormal(np.log(0.1), 0.4, 800)
    b_same = rng.lognormal(np.log(0.1), 0.4, 800)
    b_slow = rng.lognormal(np.log(0.13), 0.4, 800)
    (p50, p95) = compare_quantiles(a, b_slow)
    assert p50.significant and p50.difference_low > 0  # type: ignore[operator]
    assert p50.ratio == pytest.approx(1.3, rel=0.12)
    assert p95.quantile == 0.95 and p95.baseline_n == 800
    assert not any(q.significant for q in compare_quantiles(a, b_same))


def test_paired_comparison_is_sharper_on_the_same_requests() -> None:
    rng = np.random.default_rng(5)
    size = rng.lognormal(0.0, 0.8, 400)  # the request's own size drives both latencies
    base = 0.05 * size * rng.lognormal(0, 0.05, 400)
    cand = 0.045 * size * rng.lognormal(0, 0.05, 400)
    (paired,) = compare_quantiles(base, cand, (0.5,), paired=True)
    (indep,) = compare_quantiles(base, cand, (0.5,))
    width = paired.difference_high - paired.difference_low  # type: ignore[operator]
    assert width < 0.5 * (indep.difference_high - indep.difference_low)  # type: ignore[operator]
    assert paired.significant
    with pytest.raises(ValueError):
        compare_quantiles(base, cand[:-1], paired=True)


def test_small_samples_give_no_interval() -> None:
    (q,) = compare_quantiles([0.1], [0.2, 0.3], (0.5,))
    assert q.difference is None and not q.significant and q.baseline == 0.1
    assert percentile_interval([1.0]) is None
