"""Every Prometheus metric the proxy exports, defined once, on an injected registry.

Names: ``rightsizer_`` prefix, base units. Label sets are bounded: ``model`` and ``backend``
come from config/discovery, ``priority`` and ``outcome`` are enums, ``tenant`` is capped
(beyond ``metrics.max_tenants`` distinct values, the rest become ``other``). Never an API
key, never a prompt.

The per-token histogram (inter-token latency) is a bulk collector: a request's gaps are
binned with one numpy call when the request ends, instead of one ``observe`` per chunk.
State owned elsewhere (backend health, engine gauges, in-flight counts) is exposed by
collectors read at scrape time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from estimator.records import Outcome, RequestRecord

TTFT_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
    20.0,
    60.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (
    1,
    8,
    16,
    32,
    64,
    128,
    256,
    512,
    1024,
    2048,
    4096,
    8192,
    16384,
    32768,
    65536,
    131072,
)


class BulkHistogram(Collector):
    """A labelled histogram fed whole arrays at a time (one numpy binning per call)."""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str], buckets: Sequence[float]):
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self._edges = np.asarray(buckets, dtype=np.float64)
        self._series: dict[tuple[str, ...], tuple[np.ndarray, list[float]]] = {}
        self._lock = threading.Lock()

    def observe_many(self, labels: tuple[str, ...], values: Sequence[float]) -> None:
        if not values:
            return
        arr = np.asarray(values, dtype=np.float64)
        # bucket i counts values <= edges[i]; the last slot is +Inf
        idx = np.searchsorted(self._edges, arr, side="left")
        binned = np.bincount(idx, minlength=len(self._edges) + 1)
        with self._lock:
            series = self._series.get(labels)
            if series is None:
                series = self._series[labels] = (np.zeros(len(self._edges) + 1, np.int64), [0.0])
            series[0][:] += binned
            series[1][0] += float(arr.sum())

    def collect(self) -> Iterable[HistogramMetricFamily]:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        with self._lock:
            items = [(k, c.cumsum(), s[0]) for k, (c, s) in self._series.items()]
        for labels, cum, total in items:
            buckets = [
                (repr(float(e)), float(n)) for e, n in zip(self._edges, cum[:-1], strict=True)
            ]
            buckets.append(("+Inf", float(cum[-1])))
            fam.add_metric(list(labels), buckets, total)
        yield fam

    def describe(self) -> Iterable[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)


@dataclass(frozen=True, slots=True)
class GaugeRow:
    name: str
    doc: str
    labelnames: tuple[str, ...]
    samples: Sequence[tuple[tuple[str, ...], float]]


class StateCollector(Collector):
    """Gauges computed at scrape time from state owned elsewhere (backends, queues, estimator)."""

    def __init__(self, source: Callable[[], Iterable[GaugeRow]]) -> None:
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for row in self._source():
            fam = GaugeMetricFamily(row.name, row.doc, labels=row.labelnames)
            for labels, value in row.samples:
                fam.add_metric(list(labels), value)
            yield fam

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


class TenantLabels:
    """Caps the number of distinct tenant label values."""

    def __init__(self, limit: int) -> None:
        self._limit, self._seen = limit, set[str]()

    def __call__(self, tenant: str) -> str:
        if tenant in self._seen:
            return tenant
        if len(self._seen) < self._limit:
            self._seen.add(tenant)
            return tenant
        return "other"


class Metrics:
    """The proxy's metrics. Build one per registry (tests use a fresh registry each)."""

    def __init__(self, registry: CollectorRegistry, *, max_tenants: int = 50) -> None:
        self.registry = registry
        self.tenant_label = TenantLabels(max_tenants)
        r = registry
        self.requests = Counter(
            "rightsizer_requests",
            "Requests finished, by outcome.",
            ["model", "backend", "tenant", "priority", "outcome"],
            registry=r,
        )
        self.ttft = Histogram(
            "rightsizer_time_to_first_token_seconds",
            "Arrival at the proxy to the first content-bearing chunk (streamed requests).",
            ["model", "backend"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = BulkHistogram(
            "rightsizer_inter_token_latency_seconds",
            "Gaps between content-bearing chunks as the proxy received them.",
            ["model", "backend"],
            ITL_BUCKETS,
        )
        r.register(self.itl)
        self.e2e = Histogram(
            "rightsizer_request_duration_seconds",
            "Arrival to the last byte sent to the client.",
            ["model", "backend", "outcome"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "rightsizer_queue_wait_seconds",
            "Arrival to dispatch upstream.",
            ["model", "priority"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "rightsizer_prompt_tokens",
            "Prompt tokens of finished requests.",
            ["model", "backend", "tenant"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "rightsizer_completion_tokens",
            "Completion tokens of finished requests.",
            ["model", "backend", "tenant"],
            registry=r,
        )
        self.cached_tokens = Counter(
            "rightsizer_cached_prompt_tokens",
            "Prompt tokens the backend reported as cached.",
            ["model", "backend"],
            registry=r,
        )
        self.prompt_len = Histogram(
            "rightsizer_request_prompt_tokens",
            "Prompt length per request.",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.completion_len = Histogram(
            "rightsizer_request_completion_tokens",
            "Completion length per request.",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.estimated_tokens = Counter(
            "rightsizer_token_counts_estimated",
            "Requests whose token counts were estimated (the backend sent no usage).",
            ["model", "backend"],
            registry=r,
        )
        self.retries = Counter(
            "rightsizer_upstream_retries",
            "Retries before the first byte (another backend, or a fresh connection).",
            ["backend", "reason"],
            registry=r,
        )
        self.backend_failures = Counter(
            "rightsizer_backend_failures",
            "Upstream failures by backend and kind.",
            ["backend", "kind"],
            registry=r,
        )
        self.records_dropped = Counter(
            "rightsizer_records_dropped",
            "Request records dropped by a full sink.",
            ["sink"],
            registry=r,
        )
        self.shed = Counter(
            "rightsizer_shed",
            "Requests rejected by admission (429/503), never sent upstream.",
            ["model", "priority", "reason"],
            registry=r,
        )
        self.routing = Counter(
            "rightsizer_routing_decisions",
            "Routing decisions by chosen backend and reason.",
            ["backend", "reason"],
            registry=r,
        )
        self.prefix_match = Histogram(
            "rightsizer_prefix_match_ratio",
            "Share of the prompt's prefix blocks the chosen backend was believed to hold.",
            ["model"],
            buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0),
            registry=r,
        )
        self.scrapes = Counter(
            "rightsizer_backend_scrapes",
            "Scrapes of backends' /metrics by result.",
            ["backend", "result"],
            registry=r,
        )

    def add_state(self, source: Callable[[], Iterable[GaugeRow]]) -> None:
        self.registry.register(StateCollector(source))

    def record(self, rec: RequestRecord, itl_gaps: Sequence[float] = ()) -> None:
        """Everything per request, once, when it ends."""
        backend = rec.backend or "none"
        tenant = self.tenant_label(rec.tenant)
        self.requests.labels(rec.model, backend, tenant, rec.priority, rec.outcome.value).inc()
        if rec.e2e_s is not None:
            self.e2e.labels(rec.model, backend, rec.outcome.value).observe(rec.e2e_s)
        if rec.queue_wait_s is not None:
            self.queue_wait.labels(rec.model, rec.priority).observe(rec.queue_wait_s)
        if rec.outcome is not Outcome.OK:
            return
        if rec.streamed and rec.ttft_s is not None:
            self.ttft.labels(rec.model, backend).observe(rec.ttft_s)
        self.itl.observe_many((rec.model, backend), itl_gaps)
        if rec.prompt_tokens is not None:
            self.prompt_tokens.labels(rec.model, backend, tenant).inc(rec.prompt_tokens)
            self.prompt_len.labels(rec.model).observe(rec.prompt_tokens)
        if rec.completion_tokens is not None:
            self.completion_tokens.labels(rec.model, backend, tenant).inc(rec.completion_tokens)
            self.completion_len.labels(rec.model).observe(rec.completion_tokens)
        if rec.cached_tokens:
            self.cached_tokens.labels(rec.model, backend).inc(rec.cached_tokens)
        if rec.tokens_estimated:
            self.estimated_tokens.labels(rec.model, backend).inc()
