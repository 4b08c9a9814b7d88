"""The contracts between the proxy and the estimator.

``RequestRecord``: one per request the proxy accepted, produced exactly once (in a
``finally``), immutable. ``BackendSnapshot``: one per scrape of a backend's ``/metrics``
(plus GPU samples when a pynvml sampler runs beside the engine).

Both are plain frozen dataclasses with a JSON round trip (``to_dict`` / ``from_dict``) so
they can travel through a JSON-lines request log or a Redis stream and be replayed by an
estimator that runs alone. ``None`` always means "unknown"; never ``-1``.

Timestamps: ``*_s`` fields are seconds on the proxy's monotonic clock (comparable within one
proxy process only); ``arrival_epoch`` is the wall-clock time of arrival, for joining across
processes and for daily seasonality. Durations are derived properties.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class Outcome(enum.StrEnum):
    """How a request ended."""

    OK = "ok"
    CLIENT_ERROR = "client_error"  # 4xx from validation or from the backend
    UPSTREAM_ERROR = "upstream_error"  # backend failed (connect, 5xx, broken stream)
    SHED = "shed"  # rejected by admission (429/503), never sent upstream
    TIMEOUT = "timeout"  # upstream did not answer in time (504)
    CLIENT_CANCELLED = "client_cancelled"  # the client went away; upstream was cancelled
    SHUTDOWN = "shutdown"  # still open when the proxy's shutdown grace ran out (503 / SSE error)
    INTERNAL_ERROR = "internal_error"  # a fault in the proxy itself (500), never the client's


GAP_MIN_S = 1e-4
"""Lower edge of the first finite gap bin (100 µs)."""
GAP_BINS_PER_OCTAVE = 8
"""Bins per doubling: each bin is 2^(1/8) = 9% wide; a quantile read inside one is off by at most
that width (interpolated geometrically, typically much less)."""
GAP_EDGES_S: tuple[float, ...] = tuple(
    GAP_MIN_S * 2.0 ** (k / GAP_BINS_PER_OCTAVE) for k in range(160)
)
"""Fixed bin edges of every gap histogram (100 µs to 95 s). Bin ``b`` counts the gaps ``g``
with ``GAP_EDGES_S[b - 1] <= g < GAP_EDGES_S[b]`` (``bisect_right(GAP_EDGES_S, g)``): bin 0
holds the gaps under 100 µs, bin ``len(GAP_EDGES_S)`` those of 95 s and more."""
GAP_BINS = len(GAP_EDGES_S) + 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ItlSummary:
    """Inter-token (inter-chunk) gaps of one streamed request, in seconds.

    ``count``, ``mean``, ``p50``, ``p95``, ``max`` summarise this request's own gaps (a
    per-request figure). ``gap_bins`` / ``gap_counts`` are the same gaps as a sparse histogram
    on the fixed edges ``GAP_EDGES_S`` (ascending bins and their counts): histograms of many
    requests add up, so percentiles over all gaps, the SLO's definition, can be read from
    them (``gap_quantiles``). Records written before the histogram existed have none (empty).
    """

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p95: float | None = None
    max: float | None = None
    gap_bins: tuple[int, ...] = ()
    gap_counts: tuple[int, ...] = ()

    @classmethod
    def from_gaps(cls, gaps: Sequence[float]) -> ItlSummary:
        """The summary and histogram of one request's gaps (per request, on the proxy: one
        sort and a bisection per occupied bin)."""
        n = len(gaps)
        if n == 0:
            return cls()
        s = sorted(gaps)
        bins: list[int] = []
        counts: list[int] = []
        i, top = 0, len(GAP_EDGES_S)
        while i < n:  # one pass per occupied bin, not per gap
            b = bisect.bisect_right(GAP_EDGES_S, s[i])
            j = n if b == top else bisect.bisect_left(s, GAP_EDGES_S[b], i)
            bins.append(b)
            counts.append(j - i)
            i = j
        return cls(
            count=n,
            mean=sum(s) / n,
            p50=s[(n - 1) // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2,
            p95=s[min(n - 1, int(0.95 * (n - 1) + 0.5))],
            max=s[-1],
            gap_bins=tuple(bins),
            gap_counts=tuple(counts),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count, "mean": self.mean, "p50": self.p50, "p95": self.p95,
            "max": self.max, "gap_bins": self.gap_bins, "gap_counts": self.gap_counts,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ItlSummary:
        """Tolerant: unknown keys are ignored, a missing or malformed histogram is empty."""
        bins, counts = d.get("gap_bins") or (), d.get("gap_counts") or ()
        if len(bins) != len(counts):
            bins = counts = ()
        return cls(count=d.get("count", 0), mean=d.get("mean"), p50=d.get("p50"),
                   p95=d.get("p95"), max=d.get("max"), gap_bins=tuple(bins),
                   gap_counts=tuple(counts))  # fmt: skip


def add_gap_histogram(dense: list[int], itl: ItlSummary) -> int:
    """Add ``itl``'s sparse histogram into ``dense`` (``GAP_BINS`` counts); the gaps added."""
    for b, c in zip(itl.gap_bins, itl.gap_counts, strict=True):
        dense[b] += c
    return sum(itl.gap_counts)


def gap_quantiles(dense: Sequence[float], qs: Sequence[float]) -> list[float | None]:
    """Quantiles of the gaps counted in ``dense`` (``GAP_BINS`` counts, e.g. summed over
    requests), interpolated geometrically inside a bin; None when it counts no gap. A quantile
    in the top bin (95 s or more) reads as its lower edge."""
    total = float(sum(dense))
    if total <= 0:
        return [None for _ in qs]
    out: list[float | None] = []
    for q in qs:
        target = min(max(q, 0.0), 1.0) * total
        cum = 0.0
        for b, c in enumerate(dense):
            if c > 0 and cum + c >= target:
                out.append(_inside(b, (target - cum) / c))
                break
            cum += c
        else:
            out.append(GAP_EDGES_S[-1])
    return out


def _inside(b: int, frac: float) -> float:
    if b == 0:
        return GAP_EDGES_S[0] * frac
    if b >= len(GAP_EDGES_S):
        return GAP_EDGES_S[-1]
    lo, hi = GAP_EDGES_S[b - 1], GAP_EDGES_S[b]
    return float(lo * (hi / lo) ** frac)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRecord:
    """Everything the proxy measured about one request."""

    request_id: str
    model: str
    backend: str | None = (
        None  # backend name that served it (last one tried); None if never dispatched
    )
    tenant: str = "default"
    priority: str = "normal"
    endpoint: str = "chat"  # "chat", "completions" or another /v1 path's last segment
    streamed: bool = False
    status: int | None = None  # HTTP status the client got
    outcome: Outcome = Outcome.OK
    finish_reason: str | None = None
    # clock (monotonic seconds, proxy-local) and wall clock
    arrival_s: float = 0.0
    dispatch_s: float | None = None  # upstream request sent (after queueing)
    first_token_s: float | None = None  # first content-bearing chunk; None when not streamed
    end_s: float | None = None
    arrival_epoch: float = 0.0
    # tokens
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    tokens_estimated: bool = False  # True when counts were estimated, not reported by the backend
    max_tokens: int | None = None  # what the client asked for
    # inter-token gaps
    itl: ItlSummary = field(default_factory=ItlSummary)
    # load on the chosen backend at dispatch (proxy's own accounting, this request excluded)
    inflight_requests: int | None = None
    inflight_tokens: int | None = None
    attempts: int = 0  # upstream attempts (2 when retried before the first byte)
    # experiments: the deployment group of the backend that served it (``groups[].name``),
    # and whether it was a shadow copy (sent to a candidate; its answer never reached a client)
    group: str | None = None
    shadow: bool = False

    @property
    def queue_wait_s(self) -> float | None:
        return None if self.dispatch_s is None else self.dispatch_s - self.arrival_s

    @property
    def ttft_s(self) -> float | None:
        """Time to first token as the client saw it: arrival to first content chunk."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.arrival_s

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``from_dict`` reads it back); a flat copy, cheap enough per record."""
        d = {name: getattr(self, name) for name in _RECORD_FIELDS}
        d["outcome"] = self.outcome.value
        d["itl"] = self.itl.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RequestRecord:
        """Tolerant of older and newer writers: unknown keys are ignored, missing ones default."""
        kw = {k: v for k, v in d.items() if k in _RECORD_FIELD_SET}
        kw["outcome"] = Outcome(kw.get("outcome", "ok"))
        itl = kw.get("itl")
        kw["itl"] = ItlSummary.from_dict(itl) if isinstance(itl, Mapping) else ItlSummary()
        return cls(**kw)


_RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RequestRecord))
_RECORD_FIELD_SET = frozenset(_RECORD_FIELDS)


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuSample:
    """One pynvml reading of one GPU."""

    index: int
    name: str | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    utilization: float | None = None  # 0..1
    power_watts: float | None = None
    temperature_c: float | None = None
    throttle_reasons: int | None = None  # NVML bitmask


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendSnapshot:
    """One scrape of one backend's engine state; counters as cumulative as the engine has them."""

    backend: str  # backend name
    time_s: float  # monotonic, proxy-local
    epoch: float = 0.0
    up: bool = True
    dialect: str | None = None  # "vllm", "sglang", "tgi", "llamacpp" or None when unknown
    models: tuple[str, ...] = ()
    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None  # ratio 0..1
    prefix_cache_queries: float | None = None  # counter, tokens
    prefix_cache_hits: float | None = None  # counter, tokens
    prefix_cache_hit_rate: float | None = None  # when the engine only exposes a rate (SGLang)
    preemptions: float | None = None  # counter
    prompt_tokens_total: float | None = None  # counter
    generation_tokens_total: float | None = None  # counter
    requests_total: float | None = None  # counter, finished requests
    # engine configuration, when exposed (vLLM cache_config_info)
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    gpus: tuple[GpuSample, ...] = ()

    @property
    def kv_capacity_tokens(self) -> int | None:
        if self.block_size is None or self.num_gpu_blocks is None:
            return None
        return self.block_size * self.num_gpu_blocks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BackendSnapshot:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["models"] = tuple(kw.get("models", ()))
        kw["gpus"] = tuple(GpuSample(**g) for g in kw.get("gpus", ()))
        return cls(**kw)


class EstimatorSink(Protocol):
    """What the proxy needs from an estimator. ``observe*`` are O(1), never block, never raise."""

    def observe(self, record: RequestRecord) -> None: ...

    def observe_backend(self, snapshot: BackendSnapshot) -> None: ...
