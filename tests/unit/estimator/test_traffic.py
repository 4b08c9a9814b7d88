"""Traffic statistics: windows, trend, seasonality, forecast, distributions, profiles."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from estimator.records import RequestRecord
from estimator.traffic import (
    Forecaster,
    LengthDist,
    TrafficProfile,
    TrafficStats,
    read_log,
    theil_sen,
)

T0 = 1_700_000_000.0 - (1_700_000_000.0 % 86400)  # a UTC midnight


def rec(t: float, *, prompt: int = 100, output: int = 20, priority: str = "normal",
        tenant: str = "a", cached: int | None = None) -> RequestRecord:  # fmt: skip
    return RequestRecord(request_id=f"r{t}", model="m", arrival_epoch=t, prompt_tokens=prompt,
                         completion_tokens=output, priority=priority, tenant=tenant,
                         cached_tokens=cached)  # fmt: skip


def ramp_arrivals(r0: float, slope_per_hour: float, duration_s: float) -> np.ndarray:
    """Deterministic arrivals whose rate is r0 + slope * t/3600 (inverse of the cumulative)."""
    a, b = slope_per_hour / 3600.0 / 2.0, r0
    total = a * duration_s**2 + b * duration_s
    n = np.arange(1, int(total))
    t = n / b if a == 0 else (-b + np.sqrt(b * b + 4 * a * n)) / (2 * a)
    return T0 + t


def stats_of(times: np.ndarray, **kw: float) -> TrafficStats:
    s = TrafficStats(**kw)  # type: ignore[arg-type]
    for t in times:
        s.observe(rec(float(t)))
    return s


@pytest.mark.parametrize(("rate", "window"), [(2.0, 60.0), (2.0, 300.0), (0.5, 3600.0)],
                         ids=["2rps-1m", "2rps-5m", "0.5rps-1h"])  # fmt: skip
def test_rate_windows_on_steady_arrivals(rate: float, window: float) -> None:
    s = stats_of(T0 + np.arange(0, 7200, 1 / rate))
    assert s.rate(window, T0 + 7200) == pytest.approx(rate, rel=0.02)


def test_young_history_is_not_diluted() -> None:
    s = stats_of(T0 + np.arange(0, 120, 0.5))
    assert s.rate(3600.0, T0 + 120) == pytest.approx(2.0, rel=0.05)


def test_late_records_land_in_their_bucket() -> None:
    s = TrafficStats()
    times = T0 + np.arange(0, 600, 0.25)
    for t in times[::-1]:  # worst order
        s.observe(rec(float(t)))
    assert s.rate(300.0, T0 + 600) == pytest.approx(4.0, rel=0.01)


def test_theil_sen_ignores_outliers() -> None:
    x = np.arange(60.0)
    y = 10 + 0.5 * x
    y[[5, 17, 40]] = 500.0
    slope, intercept = theil_sen(x, y)
    assert slope == pytest.approx(0.5, rel=0.05)
    assert intercept == pytest.approx(10, abs=1.0)


@pytest.mark.parametrize("slope", [2.0, 6.0, 20.0], ids=["slow", "medium", "steep"])
def test_trend_recovers_ramp_slope(slope: float) -> None:
    s = stats_of(ramp_arrivals(1.0, slope, 3600.0))
    tr = s.trend(T0 + 3600.0)
    assert tr.significant
    assert tr.slope_rps_per_hour == pytest.approx(slope, rel=0.15)
    assert tr.level_rps == pytest.approx(1.0 + slope, rel=0.1)


def test_flat_noisy_traffic_has_no_significant_trend() -> None:
    rng = np.random.default_rng(1)
    times = T0 + np.cumsum(rng.exponential(1 / 3.0, size=3 * 3600 * 2))
    s = stats_of(times[times < T0 + 7200])
    tr = s.trend(T0 + 7200)
    assert not tr.significant
    assert s.forecaster(T0 + 7200).time_to_rate(10.0) is None


def test_time_to_breach_shrinks_as_ramp_steepens() -> None:
    breach = []
    for slope in (1.0, 3.0, 9.0):
        s = stats_of(ramp_arrivals(1.0, slope, 3600.0))
        breach.append(s.forecaster(T0 + 3600.0).time_to_rate(30.0))
    assert all(b is not None for b in breach)
    assert breach[0] > breach[1] > breach[2] > 0  # type: ignore[operator]


def test_falling_traffic_never_breaches() -> None:
    s = stats_of(ramp_arrivals(10.0, -6.0, 3600.0))
    assert s.trend(T0 + 3600).slope_rps_per_hour < 0
    assert s.forecaster(T0 + 3600).time_to_rate(20.0) is None


def daily_arrivals(days: int) -> np.ndarray:
    """Rate 0.2 + 0.18 sin(2 pi (h - 6)/24): peak 0.38 rps at 12:00 UTC, trough 0.02 at 00:00."""
    grid = np.arange(0, days * 86400, 1.0)
    rate = 0.2 + 0.18 * np.sin(2 * np.pi * ((grid / 3600) - 6) / 24)
    cum = np.cumsum(rate)
    return T0 + np.searchsorted(cum, np.arange(1, int(cum[-1])))


def test_daily_profile_needs_two_days_and_forecasts_the_peak() -> None:
    one = stats_of(daily_arrivals(1))
    assert one.daily_profile(T0 + 86400) is None
    s = stats_of(daily_arrivals(3))
    now = T0 + 3 * 86400 - 120  # 23:58, near the trough
    profile = s.daily_profile(now)
    assert profile is not None
    assert int(np.argmax(profile)) in (11, 12) and int(np.argmin(profile)) in (23, 0)
    f = s.forecaster(now)
    assert f.rate_at(now + 12.5 * 3600) > 5 * f.rate_at(now)
    assert f.peak(24 * 3600.0) == pytest.approx(f.rate_at(now + 12.5 * 3600), rel=0.01)


def test_memory_stays_bounded_over_a_long_replay() -> None:
    s = TrafficStats(capacity=1024)
    before = (s.arrival.nbytes, len(s._sec.ids), len(s._min.ids), len(s._hour.ids))
    for t in daily_arrivals(3)[::4]:
        s.observe(rec(float(t)))
    assert (s.arrival.nbytes, len(s._sec.ids), len(s._min.ids), len(s._hour.ids)) == before
    assert s.count > 1024


def test_lengths_mix_and_sample() -> None:
    s = TrafficStats()
    for i in range(1000):
        s.observe(rec(T0 + i, prompt=100 + i, output=10, priority="high" if i % 4 else "low",
                      tenant=f"t{i % 3}", cached=50))  # fmt: skip
    prompt, output, total = s.lengths()
    assert prompt.p50 == pytest.approx(599.5, abs=1)
    assert output.max == 10 and total.count == 1000
    assert s.priority_mix() == {"high": 0.75, "low": 0.25}
    assert s.tenants() == 3
    assert s.cached_ratio() == pytest.approx(50 / 599.5, rel=1e-3)
    p, o = s.sample(500, np.random.default_rng(0))
    assert p.min() >= 100 and p.max() <= 1099 and (o == 10).all()


@pytest.mark.parametrize(
    ("text", "kind", "mean"),
    [("512", "const", 512.0), ("const:64", "const", 64.0),
     ("lognormal:512:0.6", "lognormal", 512 * math.exp(0.18)), ("uniform:10:30", "uniform", 20.0)],
    ids=["bare", "const", "lognormal", "uniform"],
)  # fmt: skip
def test_length_dist_parse(text: str, kind: str, mean: float) -> None:
    d = LengthDist.parse(text)
    assert d.kind == kind and d.mean() == pytest.approx(mean)
    x = d.sample(20000, np.random.default_rng(0))
    assert x.min() >= 1 and x.mean() == pytest.approx(mean, rel=0.05)


@pytest.mark.parametrize("text", ["", "lognormal:5", "gauss:1:2", "abc", "uniform:0:0", "-5"],
                         ids=["empty", "short", "unknown", "word", "zero", "negative"])  # fmt: skip
def test_length_dist_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="length distribution"):
        LengthDist.parse(text)


def test_traffic_profile_parse_and_errors() -> None:
    p = TrafficProfile.parse("rate=5,prompt=lognormal:1024:0.8,output=256")
    assert p.rate_rps == 5 and p.prompt.kind == "lognormal" and p.output.mean() == 256
    for bad, msg in [("prompt=5", "rate"), ("rate=x", "rate"), ("rate=1,foo=2", "foo"),
                     ("rate=1,cached=1.5", "cached")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            TrafficProfile.parse(bad)


def test_profile_from_log(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with path.open("w") as f:
        for i in range(600):
            f.write(json.dumps(rec(T0 + i * 0.5, prompt=200 + i % 5, output=40).to_dict()) + "\n")
    assert len(read_log(path)) == 600
    p = TrafficProfile.from_log(path)
    assert p.requests == 600 and p.rate_rps == pytest.approx(2.0, rel=0.01)
    assert p.prompt.kind == "empirical" and p.prompt.mean() == pytest.approx(202, abs=0.5)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"log\.jsonl:1"):
        read_log(path)


def test_forecaster_linear() -> None:
    f = Forecaster(now=0.0, level_rps=2.0, slope_rps_per_hour=1.0)
    assert f.rate_at(7200.0) == pytest.approx(4.0)
    assert f.peak(3600.0) == pytest.approx(3.0)
    assert f.time_to_rate(5.0) == pytest.approx(3 * 3600.0)
