"""Traffic statistics: arrival rate, trend, daily seasonality, forecast, request shape.

``TrafficStats`` is fed one ``RequestRecord`` at a time in O(1) (``observe``: a few scalar
writes into preallocated numpy ring buffers and three time-bucket rings) or in bulk
(``observe_many``); memory is bounded whatever the traffic. Everything that reads it takes
``now`` (wall-clock epoch seconds) so it is a pure function of what was observed.

Time buckets (all keyed by the arrival epoch, so late records land in the right bucket):

* per second, one hour deep: arrival rate over sliding windows (1 min, 5 min, 1 h);
* per minute, two days deep: the trend, a Theil-Sen line (median of pairwise slopes, robust
  to bursts) through the per-minute counts of the last ``trend_window_s``; the slope of
  counts/minute per minute is exactly requests/s per hour. A slope smaller than twice its
  Poisson standard error is reported but treated as no trend;
* per hour, fourteen days deep: the daily profile (24 hourly means) once at least two days
  of history exist.

Forecast ``rate_at(t)``: with a daily profile, ``profile[hour(t)] * scale`` where ``scale``
is today's level relative to the profile now, ``level / profile[hour(now)]`` clipped to
[0.25, 4] (a quiet or busy day scales the whole curve, a few noisy minutes cannot zero or
explode it; the profile already contains the intra-day ramp, so the short-term trend is not
added on top); otherwise the trend line, clipped at zero.

Records for requests still in flight arrive later, so the last seconds read slightly low;
the windows end at ``now`` regardless (documented bias, at most one request duration).

Longer than the house's 400 lines: the offline ``TrafficProfile`` (CLI text, request logs)
shares ``LengthDist`` and ``TrafficStats`` with the online statistics and lives beside them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from estimator.records import RequestRecord

PRIORITIES: tuple[str, ...] = ("critical", "high", "normal", "low", "sheddable")
OTHER_PRIORITY = len(PRIORITIES)  # integers and unknown names
_PRIORITY_INDEX = {name: i for i, name in enumerate(PRIORITIES)}
WINDOWS_S: tuple[float, ...] = (60.0, 300.0, 3600.0)
_SEC_SLOTS = 3600
_MIN_SLOTS = 2 * 1440
_HOUR_SLOTS = 14 * 24
_DAY_S = 86400.0


class _BucketRing:
    """Counts per time bucket in a fixed ring; a slot is reset when a newer bucket claims it."""

    __slots__ = ("counts", "ids", "size", "width")

    def __init__(self, width_s: float, size: int) -> None:
        self.width = width_s
        self.size = size
        self.ids = [-1] * size
        self.counts = [0] * size

    def add(self, epoch: float) -> None:
        key = int(epoch // self.width)
        slot = key % self.size
        have = self.ids[slot]
        if have == key:
            self.counts[slot] += 1
        elif have < key:
            self.ids[slot] = key
            self.counts[slot] = 1
        # else: older than the ring remembers; dropped

    def series(self, first_key: int, last_key: int) -> np.ndarray:
        """Counts for bucket keys ``first_key..last_key`` inclusive (zeros where unseen)."""
        n = last_key - first_key + 1
        if n <= 0:
            return np.zeros(0)
        keys = np.arange(first_key, last_key + 1)
        slots = keys % self.size
        ids = np.asarray(self.ids)[slots]
        counts = np.asarray(self.counts, dtype=np.float64)[slots]
        return np.where(ids == keys, counts, 0.0)


class ArrivalCounter:
    """Arrivals per second over the last hour only: the cheap rate a backend needs."""

    __slots__ = ("_sec", "count", "first_epoch", "last_epoch")

    def __init__(self) -> None:
        self._sec = _BucketRing(1.0, _SEC_SLOTS)
        self.count = 0
        self.first_epoch: float | None = None
        self.last_epoch: float | None = None

    def add(self, epoch: float) -> None:
        self._sec.add(epoch)
        self.count += 1
        if self.first_epoch is None or epoch < self.first_epoch:
            self.first_epoch = epoch
        if self.last_epoch is None or epoch > self.last_epoch:
            self.last_epoch = epoch

    def rate(self, window_s: float, now: float) -> float:
        """Arrivals per second over the last ``window_s`` complete seconds (at most one hour)."""
        return _rate(self._sec, self.first_epoch, window_s, now)


def _rate(ring: _BucketRing, first: float | None, window_s: float, now: float) -> float:
    if first is None:
        return 0.0
    w = min(window_s, float(_SEC_SLOTS - 1))
    last = int(now // 1.0) - 1
    counts = ring.series(last - int(w) + 1, last)
    span = min(w, max(1.0, now - first))  # young history: don't dilute
    return float(counts.sum()) / span


@dataclass(frozen=True, slots=True, kw_only=True)
class Trend:
    """Robust linear trend of the arrival rate."""

    slope_rps_per_hour: float  # raw Theil-Sen slope
    level_rps: float  # the line's value at ``now``
    significant: bool  # |slope| > 2 x its Poisson standard error
    minutes: int  # complete minutes the fit used

    @property
    def effective_slope(self) -> float:
        return self.slope_rps_per_hour if self.significant else 0.0


def theil_sen(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Median of pairwise slopes and the median intercept; (0, median y) for < 2 points."""
    if len(x) < 2:
        return 0.0, float(np.median(y)) if len(y) else 0.0
    i, j = np.triu_indices(len(x), k=1)
    dx = x[j] - x[i]
    keep = dx != 0
    slope = float(np.median((y[j] - y[i])[keep] / dx[keep])) if keep.any() else 0.0
    return slope, float(np.median(y - slope * x))


@dataclass(frozen=True, slots=True, kw_only=True)
class LengthSummary:
    """Quantiles of a token-length distribution."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    p999: float | None
    max: float | None

    @classmethod
    def of(cls, values: np.ndarray) -> LengthSummary:
        if len(values) == 0:
            return cls(count=0, mean=None, p50=None, p90=None, p99=None, p999=None, max=None)
        q = np.quantile(values, [0.5, 0.9, 0.99, 0.999])
        return cls(
            count=len(values),
            mean=float(values.mean()),
            p50=float(q[0]),
            p90=float(q[1]),
            p99=float(q[2]),
            p999=float(q[3]),
            max=float(values.max()),
        )


class TrafficStats:
    """Bounded-memory traffic statistics of one deployment, fed per record in O(1)."""

    def __init__(self, capacity: int = 1 << 17, *, trend_window_s: float = 3600.0) -> None:
        self.capacity = capacity
        self.trend_window_s = trend_window_s
        self.arrival = np.zeros(capacity, dtype=np.float64)
        self.prompt = np.zeros(capacity, dtype=np.int32)
        self.output = np.zeros(capacity, dtype=np.int32)
        self.cached = np.zeros(capacity, dtype=np.int32)
        self.priority = np.zeros(capacity, dtype=np.int8)
        self.tenant = np.zeros(capacity, dtype=np.int64)
        self.count = 0  # records ever observed
        self.first_epoch: float | None = None
        self.last_epoch: float | None = None
        self._sec = _BucketRing(1.0, _SEC_SLOTS)
        self._min = _BucketRing(60.0, _MIN_SLOTS)
        self._hour = _BucketRing(3600.0, _HOUR_SLOTS)

    def observe(self, record: RequestRecord) -> None:
        """O(1): a handful of scalar writes. Records of any outcome count as arrivals."""
        t = record.arrival_epoch
        i = self.count % self.capacity
        self.arrival[i] = t
        self.prompt[i] = record.prompt_tokens or 0
        self.output[i] = record.completion_tokens or 0
        self.cached[i] = record.cached_tokens or 0
        self.priority[i] = _PRIORITY_INDEX.get(record.priority, OTHER_PRIORITY)
        self.tenant[i] = hash(record.tenant)
        self.count += 1
        if self.first_epoch is None or t < self.first_epoch:
            self.first_epoch = t
        if self.last_epoch is None or t > self.last_epoch:
            self.last_epoch = t
        self._sec.add(t)
        self._min.add(t)
        self._hour.add(t)

    def observe_many(self, records: Iterable[RequestRecord]) -> None:
        for r in records:
            self.observe(r)

    # ---- reading -------------------------------------------------------------------
    def _valid(self) -> slice:
        return slice(0, min(self.count, self.capacity))

    def rate(self, window_s: float, now: float) -> float:
        """Arrivals per second over the last ``window_s`` complete seconds (at most one hour)."""
        return _rate(self._sec, self.first_epoch, window_s, now)

    def rates(self, now: float) -> dict[float, float]:
        return {w: self.rate(w, now) for w in WINDOWS_S}

    def per_minute_counts(self, now: float, window_s: float | None = None) -> np.ndarray:
        """Counts of the complete minutes in the window, oldest first, since history began."""
        if self.first_epoch is None:
            return np.zeros(0)
        window = self.trend_window_s if window_s is None else window_s
        last = int(now // 60.0) - 1  # the current minute is incomplete
        first = max(last - int(window // 60.0) + 1, math.ceil(self.first_epoch / 60.0))
        first = max(first, last - _MIN_SLOTS + 1)
        return self._min.series(first, last)

    def trend(self, now: float) -> Trend:
        counts = self.per_minute_counts(now)
        n = len(counts)
        if n < 3:
            return Trend(slope_rps_per_hour=0.0, level_rps=self.rate(300.0, now), significant=False,
                         minutes=n)  # fmt: skip
        x = np.arange(n, dtype=np.float64)
        slope, intercept = theil_sen(x, counts)
        # the centre of the current minute sits 0.5 + (now % 60)/60 minutes after the last
        x_now = (n - 1) + 0.5 + (now % 60.0) / 60.0
        level = max(0.0, intercept + slope * x_now) / 60.0
        sxx = float(((x - x.mean()) ** 2).sum())
        se = math.sqrt(max(counts.mean(), 1.0) / sxx)
        return Trend(slope_rps_per_hour=slope, level_rps=level,
                     significant=abs(slope) > 2.0 * se, minutes=n)  # fmt: skip

    def daily_profile(self, now: float) -> np.ndarray | None:
        """Mean arrivals/s per UTC hour of day, or None with under two days of history."""
        if self.first_epoch is None or now - self.first_epoch < 2 * _DAY_S:
            return None
        last = int(now // 3600.0) - 1
        first = max(math.ceil(self.first_epoch / 3600.0), last - _HOUR_SLOTS + 1)
        counts = self._hour.series(first, last)
        hours = np.arange(first, last + 1) % 24
        sums = np.bincount(hours, weights=counts, minlength=24)
        n = np.bincount(hours, minlength=24)
        return np.where(n > 0, sums / np.maximum(n, 1) / 3600.0, np.nan)

    def forecaster(self, now: float) -> Forecaster:
        tr = self.trend(now)
        level = tr.level_rps if tr.significant else self.rate(300.0, now)
        return Forecaster(now=now, level_rps=level, slope_rps_per_hour=tr.effective_slope,
                          profile=self.daily_profile(now))  # fmt: skip

    def recent(self, n: int | None = None) -> np.ndarray:
        """Indices of the last ``n`` records still in the ring (all when None)."""
        have = min(self.count, self.capacity)
        n = have if n is None else min(n, have)
        start = self.count - n
        return np.arange(start, self.count) % self.capacity

    def lengths(self) -> tuple[LengthSummary, LengthSummary, LengthSummary]:
        """(prompt, output, prompt + output) summaries over the ring's records with a prompt."""
        s = self._valid()
        has = self.prompt[s] > 0
        p, o = self.prompt[s][has].astype(np.float64), self.output[s][has].astype(np.float64)
        return LengthSummary.of(p), LengthSummary.of(o), LengthSummary.of(p + o)

    def cached_ratio(self) -> float:
        s = self._valid()
        total = float(self.prompt[s].sum())
        return float(self.cached[s].sum()) / total if total > 0 else 0.0

    def priority_mix(self) -> dict[str, float]:
        s = self._valid()
        n = self.priority[s].size
        if n == 0:
            return {}
        counts = np.bincount(self.priority[s], minlength=OTHER_PRIORITY + 1)
        names = (*PRIORITIES, "other")
        return {names[i]: float(c) / n for i, c in enumerate(counts) if c > 0}

    def tenants(self) -> int:
        """Distinct tenants among the records in the ring."""
        return int(np.unique(self.tenant[self._valid()]).size)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(prompt, output) pairs drawn with replacement from the ring's records that have a
        prompt (shed and failed requests carry no token counts); empty arrays when none."""
        have = np.flatnonzero(self.prompt[self._valid()] > 0)
        if have.size == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        idx = have[rng.integers(0, have.size, size=n)]
        return self.prompt[idx].astype(np.int64), self.output[idx].astype(np.int64)

    def profile(self, now: float) -> TrafficProfile:
        """Freeze the current statistics into an offline ``TrafficProfile``."""
        s = self._valid()
        has = self.prompt[s] > 0  # shed and failed requests carry no token counts
        tr = self.trend(now)
        return TrafficProfile(
            rate_rps=self.rate(300.0, now),
            prompt=LengthDist.empirical(self.prompt[s][has]),
            output=LengthDist.empirical(self.output[s][has]),
            cached_ratio=self.cached_ratio(),
            trend_rps_per_hour=tr.effective_slope,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Forecaster:
    """Arrival-rate forecast frozen at ``now``; see the module docstring for the rule."""

    now: float
    level_rps: float
    slope_rps_per_hour: float = 0.0
    profile: np.ndarray | None = None  # 24 hourly rates, UTC

    def rate_at(self, t: float) -> float:
        p = self.profile
        if p is not None and np.isfinite(p).all() and p.max() > 0:
            here = float(p[int(self.now // 3600) % 24])
            there = float(p[int(t // 3600) % 24])
            scale = min(max(self.level_rps / here, 0.25), 4.0) if here > 0 else 1.0
            return there * scale
        return max(0.0, self.level_rps + self.slope_rps_per_hour * (t - self.now) / 3600.0)

    def peak(self, horizon_s: float, step_s: float = 300.0) -> float:
        """Highest forecast rate over ``[now, now + horizon_s]``."""
        steps = max(1, int(horizon_s // step_s))
        return max(self.rate_at(self.now + k * step_s) for k in range(steps + 1))

    def time_to_rate(self, target_rps: float, horizon_s: float = 7 * _DAY_S) -> float | None:
        """Seconds until the forecast first reaches ``target_rps``; None when not in horizon."""
        if self.level_rps >= target_rps:
            return 0.0
        if self.profile is None:
            if self.slope_rps_per_hour <= 0:
                return None
            t = (target_rps - self.level_rps) / self.slope_rps_per_hour * 3600.0
            return t if t <= horizon_s else None
        step = 300.0
        for k in range(1, int(horizon_s // step) + 1):
            if self.rate_at(self.now + k * step) >= target_rps:
                return k * step
        return None


# ---- offline profiles ------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class LengthDist:
    """A token-length distribution: ``const``, ``lognormal`` (median, sigma), ``uniform``
    (lo, hi) or ``empirical`` (values)."""

    kind: str
    params: tuple[float, ...] = ()
    values: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def const(cls, n: float) -> LengthDist:
        return cls(kind="const", params=(float(n),))

    @classmethod
    def empirical(cls, values: Sequence[float] | np.ndarray) -> LengthDist:
        arr = np.asarray(values, dtype=np.float64)
        return cls(kind="empirical", params=(float(arr.mean()) if arr.size else 0.0,),
                   values=arr)  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """``512``, ``const:512``, ``lognormal:MEDIAN:SIGMA``, ``uniform:LO:HI``."""
        parts = text.strip().split(":")
        try:
            nums = tuple(float(p) for p in parts[1:]) if not _is_number(parts[0]) else ()
            if _is_number(parts[0]) and len(parts) == 1:
                dist = cls.const(float(parts[0]))
            elif parts[0] == "const" and len(nums) == 1:
                dist = cls.const(nums[0])
            elif parts[0] in ("lognormal", "uniform") and len(nums) == 2:
                dist = cls(kind=parts[0], params=nums)
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"bad length distribution {text!r}: use N, const:N, lognormal:MEDIAN:SIGMA "
                "or uniform:LO:HI"
            ) from None
        if any(p < 0 for p in dist.params) or (dist.kind != "lognormal" and dist.mean() < 1):
            raise ValueError(f"bad length distribution {text!r}: lengths must be >= 1")
        return dist

    def mean(self) -> float:
        if self.kind == "lognormal":
            median, sigma = self.params
            return median * math.exp(sigma**2 / 2)
        if self.kind == "uniform":
            return (self.params[0] + self.params[1]) / 2
        return self.params[0]

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` integer lengths, each at least 1."""
        if self.kind == "lognormal":
            median, sigma = self.params
            x = rng.lognormal(math.log(max(median, 1.0)), sigma, size=n)
        elif self.kind == "uniform":
            x = rng.uniform(self.params[0], self.params[1], size=n)
        elif self.kind == "empirical" and self.values is not None and self.values.size:
            x = rng.choice(self.values, size=n)
        else:
            x = np.full(n, self.params[0] if self.params else 1.0)
        return np.maximum(1, np.rint(x)).astype(np.int64)

    def quantile(self, q: float, *, n: int = 20000, seed: int = 0) -> float:
        if self.kind == "empirical" and self.values is not None and self.values.size:
            return float(np.quantile(self.values, q))
        if self.kind == "const":
            return self.params[0]
        return float(np.quantile(self.sample(n, np.random.default_rng(seed)), q))

    def describe(self) -> str:
        if self.kind == "const":
            return f"{self.params[0]:g}"
        if self.kind == "empirical":
            return f"empirical(mean {self.mean():.0f})"
        return f"{self.kind}:" + ":".join(f"{p:g}" for p in self.params)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficProfile:
    """Offline traffic: a rate and the request shape. Built from CLI text or a request log."""

    rate_rps: float
    prompt: LengthDist
    output: LengthDist
    cached_ratio: float = 0.0  # fraction of prompt tokens served from the prefix cache
    trend_rps_per_hour: float = 0.0
    requests: int = 0  # records it was built from (0 when synthetic)
    span_s: float | None = None  # seconds of arrivals the log covers (None when synthetic)

    @classmethod
    def parse(cls, text: str) -> TrafficProfile:
        """``rate=5,prompt=lognormal:1024:0.8,output=256[,cached=0.2][,trend=1.5]``."""
        fields: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in ("rate", "prompt", "output", "cached", "trend"):
                raise ValueError(f"bad traffic item {item!r}: expected rate=, prompt=, output=, "
                                 "cached= or trend=")  # fmt: skip
            fields[key] = value
        if "rate" not in fields:
            raise ValueError("traffic needs rate=REQUESTS_PER_SECOND")
        rate = _parse_float("rate", fields["rate"])
        cached = _parse_float("cached", fields.get("cached", "0"))
        if rate < 0 or not 0.0 <= cached < 1.0:
            raise ValueError("traffic needs rate >= 0 and 0 <= cached < 1")
        return cls(
            rate_rps=rate,
            prompt=LengthDist.parse(fields.get("prompt", "512")),
            output=LengthDist.parse(fields.get("output", "128")),
            cached_ratio=cached,
            trend_rps_per_hour=_parse_float("trend", fields.get("trend", "0")),
        )

    @classmethod
    def from_records(cls, records: Sequence[RequestRecord]) -> TrafficProfile:
        if not records:
            raise ValueError("no requests in the log")
        stats = TrafficStats(capacity=max(1, len(records)), trend_window_s=6 * 3600.0)
        stats.observe_many(records)
        now = max(r.arrival_epoch for r in records)
        span = max(now - (stats.first_epoch or now), 1.0)
        base = stats.profile(now + 1.0)
        return cls(rate_rps=len(records) / span, prompt=base.prompt, output=base.output,
                   cached_ratio=base.cached_ratio, trend_rps_per_hour=base.trend_rps_per_hour,
                   requests=len(records), span_s=span)  # fmt: skip

    @classmethod
    def from_log(cls, path: str | Path) -> TrafficProfile:
        return cls.from_records(read_log(path))

    def describe(self) -> str:
        return (f"{self.rate_rps:g} req/s, prompt {self.prompt.describe()}, "
                f"output {self.output.describe()}")  # fmt: skip


def _parse_float(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"traffic {key}={value!r}: not a number") from None


def read_log(path: str | Path) -> list[RequestRecord]:
    """RequestRecords from a JSON-lines log (``RequestRecord.to_dict`` per line)."""
    out: list[RequestRecord] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(RequestRecord.from_dict(json.loads(line)))
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{path}:{lineno}: not a RequestRecord ({e})") from None
    return out
