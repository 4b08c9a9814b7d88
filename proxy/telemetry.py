"""Every Prometheus metric rightsizer exports, defined once, on an injected registry.

Names: ``rightsizer_`` prefix, base units. Label sets are bounded: ``model`` carries only a
model a backend announced or the config names (others are ``unknown``, decided where the
request is parsed), ``backend`` comes from config, ``priority`` and ``outcome`` are enums,
``tenant`` is capped (beyond ``metrics.max_tenants`` distinct values, the rest become
``other``), and every label value is cut to ``MAX_LABEL_CHARS``. Never an API key, never a
prompt.

Two kinds of metric live here:

* request metrics (counters and histograms), updated once per request when it ends
  (``Metrics.record``); the per-token histogram (inter-token latency) is a bulk collector: a
  request's gaps are binned with one numpy call instead of one ``observe`` per chunk;
* state owned elsewhere (backend health, engine gauges and counters, queue depth, shared
  state, GPU samples, the estimator's projections, routing plugin timings), read by
  collectors at scrape time from the owning component's read-only API (``watch_*``).

``metrics_handler`` is the one ``/metrics`` handler every program serves.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from estimator.records import GpuSample, Outcome, RequestRecord

if TYPE_CHECKING:
    from estimator.records import BackendSnapshot

MAX_LABEL_CHARS = 128

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                2.0, 3.0, 5.0, 10.0, 20.0, 60.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.5, 1.0, 2.5)  # fmt: skip
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                 30.0)  # fmt: skip
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536,
                 131072)  # fmt: skip

GPU_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("rightsizer_gpu_memory_used_bytes", "GPU memory in use (NVML).", "memory_used_bytes"),
    ("rightsizer_gpu_memory_total_bytes", "GPU memory installed (NVML).", "memory_total_bytes"),
    ("rightsizer_gpu_utilization_ratio", "Fraction of the last sample period a kernel ran.",
     "utilization"),
    ("rightsizer_gpu_power_watts", "GPU board power draw.", "power_watts"),
    ("rightsizer_gpu_temperature_celsius", "GPU core temperature.", "temperature_c"),
    ("rightsizer_gpu_throttle_reasons", "NVML clocks-event (throttle) reasons bitmask; 0: none.",
     "throttle_reasons"),
)  # fmt: skip
"""``(metric, doc, GpuSample field)`` of every GPU gauge; labels ``gpu`` (index), ``name``."""

GPU_METRICS: dict[str, tuple[str, ...]] = {name: ("gpu", "name") for name, _, _ in GPU_GAUGES}
"""Every GPU metric, with its label names (for dashboards and alert checks)."""

ESTIMATOR_PREFIX = "rightsizer_"
"""Prefix of the estimator report's gauge families (``Report.gauge_families()`` names them)."""

_ENGINE_GAUGES = (
    ("running", "rightsizer_engine_running_requests", "Engine-reported running requests."),
    ("waiting", "rightsizer_engine_waiting_requests", "Engine-reported queued requests."),
    ("kv_usage", "rightsizer_engine_kv_cache_usage_ratio", "Engine KV-cache usage, 0..1."),
)
_ENGINE_COUNTERS = (
    ("prefix_cache_hits", "rightsizer_engine_prefix_cache_hits",
     "Engine counter of prefix-cache hits (tokens), as the engine reports it."),
    ("prefix_cache_queries", "rightsizer_engine_prefix_cache_queries",
     "Engine counter of prefix-cache queries (tokens), as the engine reports it."),
    ("preemptions", "rightsizer_engine_preemptions", "Engine counter of preemptions."),
)  # fmt: skip


def label(value: str) -> str:
    """A label value cut to ``MAX_LABEL_CHARS`` (a bounded series name whatever the input)."""
    return value if len(value) <= MAX_LABEL_CHARS else value[:MAX_LABEL_CHARS]


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
    """One gauge family computed at scrape time: name, doc, label names, samples."""

    name: str
    doc: str
    labelnames: tuple[str, ...]
    samples: Sequence[tuple[tuple[str, ...], float]]


class StateCollector(Collector):
    """Metric families computed at scrape time from state owned elsewhere."""

    def __init__(self, source: Callable[[], Iterable[Metric | GaugeRow]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        for row in self._source():
            if isinstance(row, Metric):
                yield row
                continue
            fam = GaugeMetricFamily(row.name, row.doc, labels=row.labelnames)
            for labels, value in row.samples:
                fam.add_metric([label(v) for v in labels], value)
            yield fam

    def describe(self) -> Iterable[Metric]:
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


# --- read-only views of the components whose state is exported at scrape time ------------


class BackendView(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def inflight(self) -> int: ...
    @property
    def inflight_tokens(self) -> int: ...
    @property
    def limit(self) -> int: ...
    @property
    def snapshot(self) -> BackendSnapshot | None: ...
    def available(self, now: float) -> bool: ...


class EstimatorView(Protocol):
    @property
    def stats(self) -> Any: ...
    def families(self) -> Iterable[Any]: ...


class WindowView(Protocol):
    def counts(self, now: float) -> tuple[int, int, int, int]: ...


class ExperimentView(Protocol):
    """What telemetry reads of one experiment (``proxy.experiments.control.Experiment``)."""

    name: str
    baseline: str
    candidate: str
    weight: float
    shadow_share: float
    state: str
    windows: Mapping[str, WindowView]
    rollbacks: Mapping[str, int]
    assignments: Mapping[tuple[str, str], int]
    shadow: Mapping[str, int]


class DriftView(Protocol):
    group: str
    model: str
    versions: Mapping[str, str]

    @property
    def distinct(self) -> int: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ExperimentsView:
    """Read-only sources of the experiment families (``watch_experiments``)."""

    experiments: Callable[[], Sequence[ExperimentView]]
    group_of_backends: Callable[[], Iterable[tuple[str, str]]]  # (backend, group)
    drift: Callable[[], Sequence[DriftView]]
    shadow_depth: Callable[[str], int]
    verdicts: Callable[[], Sequence[Mapping[str, Any]]]  # the estimator's experiment reports
    clock: Callable[[], float] = time.monotonic


EXPERIMENT_STATES = ("running", "rolled_back")


class PluginTimer:
    """Cumulative time and calls per routing plugin (plain floats on the request path; read
    as counters at scrape time)."""

    __slots__ = ("calls", "seconds")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, plugin: str, seconds: float) -> None:
        self.seconds[plugin] = self.seconds.get(plugin, 0.0) + seconds
        self.calls[plugin] = self.calls.get(plugin, 0) + 1


class Metrics:
    """The proxy's metrics. Build one per registry (tests use a fresh registry each)."""

    def __init__(self, registry: CollectorRegistry, *, max_tenants: int = 50) -> None:
        self.registry = registry
        self.tenant_label = TenantLabels(max_tenants)
        self.plugin_timer = PluginTimer()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # as bounded as the labels
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
            "Gaps between content-bearing chunks as the proxy received them (pooled over gaps).",
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
            "Request records dropped by a full or failing sink.",
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
        self.loop_lag = Histogram(
            "rightsizer_event_loop_lag_seconds",
            "How late a 50 ms timer fires on the proxy's event loop: time the loop was busy "
            "(a long callback, the GIL held by a thread) while requests waited.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.client_errors = Counter(
            "rightsizer_client_protocol_errors",
            "Connections or requests refused before the app saw them, by reason.",
            ["reason"],
            registry=r,
        )
        r.register(StateCollector(self._plugin_families))
        self._group_metrics(r)

    def _group_metrics(self, r: CollectorRegistry) -> None:
        """Per deployment group, live and shadow traffic apart (``traffic``: live, shadow)."""
        gl = ["model", "group", "traffic"]
        self.group_requests = Counter(
            "rightsizer_group_requests",
            "Requests served by a deployment group, by outcome (shadow copies included, apart).",
            [*gl, "outcome"],
            registry=r,
        )
        self.group_ttft = Histogram(
            "rightsizer_group_time_to_first_token_seconds",
            "TTFT per deployment group (live: as the client saw it; shadow: from sending).",
            gl,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.group_itl = BulkHistogram(
            "rightsizer_group_inter_token_latency_seconds",
            "Inter-token gaps per deployment group (pooled over gaps).",
            gl,
            ITL_BUCKETS,
        )
        r.register(self.group_itl)
        self.group_tokens = Counter(
            "rightsizer_group_tokens",
            "Tokens of finished requests per deployment group (kind: prompt, completion).",
            [*gl, "kind"],
            registry=r,
        )

    def record_group(self, rec: RequestRecord, itl_gaps: Sequence[float] = ()) -> None:
        """A request (or shadow copy) of a deployment group, once, when it ends."""
        labels = (label(rec.model), label(rec.group or "none"), "shadow" if rec.shadow else "live")
        self.group_requests.labels(*labels, rec.outcome.value).inc()
        if rec.outcome is not Outcome.OK:
            return
        if rec.streamed and rec.ttft_s is not None:
            self.group_ttft.labels(*labels).observe(rec.ttft_s)
        self.group_itl.observe_many(labels, itl_gaps)
        if rec.prompt_tokens is not None:
            self.group_tokens.labels(*labels, "prompt").inc(rec.prompt_tokens)
        if rec.completion_tokens is not None:
            self.group_tokens.labels(*labels, "completion").inc(rec.completion_tokens)

    def add_state(self, source: Callable[[], Iterable[Metric | GaugeRow]]) -> None:
        self.registry.register(StateCollector(source))

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: the label lookup costs more than the update."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def record(self, rec: RequestRecord, itl_gaps: Sequence[float] = ()) -> None:
        """Everything per request, once, when it ends. ``rec.model`` is already bounded (a
        served or configured model, else ``unknown``); values are length-capped here too."""
        child = self.child
        model = label(rec.model)
        backend = rec.backend or "none"
        tenant = self.tenant_label(label(rec.tenant))
        outcome = rec.outcome.value
        child(self.requests, model, backend, tenant, rec.priority, outcome).inc()
        if rec.e2e_s is not None:
            child(self.e2e, model, backend, outcome).observe(rec.e2e_s)
        if rec.queue_wait_s is not None:
            child(self.queue_wait, model, rec.priority).observe(rec.queue_wait_s)
        if rec.outcome is not Outcome.OK:
            return
        if rec.streamed and rec.ttft_s is not None:
            child(self.ttft, model, backend).observe(rec.ttft_s)
        self.itl.observe_many((model, backend), itl_gaps)
        if rec.prompt_tokens is not None:
            child(self.prompt_tokens, model, backend, tenant).inc(rec.prompt_tokens)
            child(self.prompt_len, model).observe(rec.prompt_tokens)
        if rec.completion_tokens is not None:
            child(self.completion_tokens, model, backend, tenant).inc(rec.completion_tokens)
            child(self.completion_len, model).observe(rec.completion_tokens)
        if rec.cached_tokens:
            child(self.cached_tokens, model, backend).inc(rec.cached_tokens)
        if rec.tokens_estimated:
            child(self.estimated_tokens, model, backend).inc()

    def _plugin_families(self) -> Iterator[Metric]:
        t = self.plugin_timer
        seconds = CounterMetricFamily(
            "rightsizer_routing_plugin_seconds",
            "Time spent in each routing plugin (filters, scorers, picker).",
            labels=["plugin"],
        )
        calls = CounterMetricFamily(
            "rightsizer_routing_plugin_calls", "Calls of each routing plugin.", labels=["plugin"]
        )
        for name in sorted(t.seconds):
            seconds.add_metric([name], t.seconds[name])
            calls.add_metric([name], t.calls[name])
        yield seconds
        yield calls

    # --- state owned elsewhere ------------------------------------------------------------

    def watch_backends(self, backends: Sequence[BackendView]) -> None:
        """Backend health, the proxy's in-flight counts and the engine's own /metrics."""
        self.add_state(lambda: backend_families(backends, time.monotonic()))

    def watch_queue(self, depths: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        """Requests waiting in the proxy's queue: ``depths()`` gives (model, class, n)."""

        def rows() -> Iterator[GaugeRow]:
            yield GaugeRow(
                "rightsizer_queue_depth",
                "Requests waiting in the proxy's queue.",
                ("model", "priority"),
                [((m, c), float(n)) for m, c, n in depths()],
            )

        self.add_state(rows)

    def watch_limits(self, limits: Callable[[], Iterable[tuple[str, int, str]]]) -> None:
        """The in-flight limit admission applies per backend: (backend, limit, source)."""

        def rows() -> Iterator[GaugeRow]:
            yield GaugeRow(
                "rightsizer_backend_inflight_limit",
                "In-flight requests admission allows on the backend, and where the limit "
                "comes from (config, engine, learned, probing).",
                ("backend", "source"),
                [((b, src), float(n)) for b, n, src in limits()],
            )

        self.add_state(rows)

    def watch_shared(
        self,
        up: Callable[[], bool],
        remote: Callable[[], dict[str, int]],
        syncs: Callable[[], dict[str, int]],
    ) -> None:
        def rows() -> Iterator[Metric | GaugeRow]:
            fam = CounterMetricFamily(
                "rightsizer_shared_state_syncs",
                "Sync rounds with the shared state (Redis), by result.",
                labels=["result"],
            )
            for result, n in sorted(syncs().items()):
                fam.add_metric([result], float(n))
            yield fam
            yield GaugeRow(
                "rightsizer_shared_state_up",
                "1 when the shared state (Redis) is reachable (0: serving on local state).",
                (),
                [((), 1.0 if up() else 0.0)],
            )
            yield GaugeRow(
                "rightsizer_shared_state_remote_inflight",
                "Requests other proxy replicas have in flight on each backend.",
                ("backend",),
                [((b,), float(n)) for b, n in remote().items()],
            )

        self.add_state(rows)

    def watch_gpus(self, samples: Callable[[], Sequence[GpuSample]]) -> None:
        self.add_state(lambda: gpu_families(samples()))

    def watch_estimator(self, runner: EstimatorView) -> None:
        """The estimator report's gauge families ``(name, doc, labelnames, samples)`` and the
        runner's own counters."""
        self.add_state(lambda: estimator_families(runner))

    def watch_experiments(self, view: ExperimentsView) -> None:
        """Groups, experiments, shadow traffic, drift and the estimator's verdict figures."""
        self.add_state(lambda: experiment_families(view))

    def watch_slo(self, ttft_p95_s: float, itl_p95_s: float) -> None:
        """The SLO targets, so alert rules and dashboards read them instead of repeating them."""
        self.add_state(lambda: slo_families(ttft_p95_s, itl_p95_s))


def estimator_families(runner: EstimatorView) -> Iterator[Metric | GaugeRow]:
    for name, doc, labelnames, samples in runner.families():
        yield GaugeRow(ESTIMATOR_PREFIX + name, doc, tuple(labelnames), samples)
    st = runner.stats
    for name, doc, value in (
        ("rightsizer_estimator_refreshes", "Estimator refreshes completed.", st.refreshes),
        ("rightsizer_estimator_refresh_seconds", "Time spent in estimator refreshes (in the "
         "estimator's own process unless it runs in the proxy's).", st.refresh_seconds),
        ("rightsizer_estimator_refresh_failures", "Estimator refreshes that failed (each is "
         "logged, at most once a minute).", st.failures),
        ("rightsizer_estimator_records_dropped", "Records the estimator never saw (its input "
         "buffer was full).", st.dropped),
    ):  # fmt: skip
        fam = CounterMetricFamily(name, doc)
        fam.add_metric([], float(value))
        yield fam


def experiment_families(v: ExperimentsView) -> Iterator[Metric | GaugeRow]:
    exps, now = v.experiments(), v.clock()
    ex = ("experiment",)
    yield GaugeRow(
        "rightsizer_backend_group_info",
        "1 for each backend's deployment group.",
        ("backend", "group"),
        [((b, g), 1.0) for b, g in v.group_of_backends()],
    )
    yield GaugeRow(
        "rightsizer_experiment_weight",
        "Share of the experiment's traffic each group gets (the candidate's is the canary weight).",
        ("experiment", "group"),
        [
            ((e.name, g), w)
            for e in exps
            for g, w in ((e.baseline, 1.0 - e.weight), (e.candidate, e.weight))
        ],
    )
    yield GaugeRow(
        "rightsizer_experiment_shadow_share",
        "Share of the baseline's requests mirrored to the candidate.",
        ex,
        [((e.name,), e.shadow_share) for e in exps],
    )
    yield GaugeRow(
        "rightsizer_experiment_state",
        "1 for the experiment's current state.",
        ("experiment", "state"),
        [((e.name, st), float(e.state == st)) for e in exps for st in EXPERIMENT_STATES],
    )
    yield GaugeRow(
        "rightsizer_shadow_queue_depth",
        "Shadow copies waiting for a worker.",
        ex,
        [((e.name,), float(v.shadow_depth(e.name))) for e in exps],
    )
    for name, doc, pairs in (
        (
            "rightsizer_experiment_rollbacks",
            "Automatic rollbacks of the canary, by reason (errors, slo, unavailable).",
            ("reason",),
        ),
        (
            "rightsizer_experiment_assignments",
            "Requests assigned to a group, by reason (weight, header, tenant).",
            ("group", "reason"),
        ),
        (
            "rightsizer_shadow_requests",
            "Shadow copies by result (ok, error, dropped_*).",
            ("result",),
        ),
    ):
        fam = CounterMetricFamily(name, doc, labels=["experiment", *pairs])
        for e in exps:
            by_name: dict[str, Mapping[Any, int]] = {
                "rightsizer_experiment_rollbacks": e.rollbacks,
                "rightsizer_experiment_assignments": e.assignments,
                "rightsizer_shadow_requests": e.shadow,
            }
            counts = by_name[name]
            for key, n in sorted(counts.items()):
                keys = key if isinstance(key, tuple) else (key,)
                fam.add_metric([label(e.name), *map(label, keys)], float(n))
        yield fam
    windows = [(e.name, g, w.counts(now)) for e in exps for g, w in e.windows.items()]
    for i, (what, doc) in enumerate(
        (
            ("requests", "Request attempts of a group in the rollback window."),
            ("errors", "Failed attempts (errors, timeouts, backend 4xx) in the rollback window."),
            ("slo_samples", "Streamed requests judged against the SLO in the rollback window."),
            ("slo_misses", "Requests that missed the SLO in the rollback window."),
        )
    ):
        yield GaugeRow(
            f"rightsizer_experiment_window_{what}",
            doc,
            ("experiment", "group"),
            [((n, g), float(c[i])) for n, g, c in windows],
        )
    drifts = v.drift()
    yield GaugeRow(
        "rightsizer_model_version_drift",
        "Distinct model versions or engine settings "
        "announced by the up backends of one group, minus one (0: consistent).",
        ("group", "model"),
        [((d.group, d.model), float(d.distinct - 1)) for d in drifts],
    )
    yield GaugeRow(
        "rightsizer_backend_model_version_info",
        "1 per backend and model: a digest "
        "of what the backend announces about the model (its version).",
        ("backend", "group", "model", "version"),
        [
            ((b, d.group, d.model, ver), 1.0)
            for d in drifts
            for b, ver in sorted(d.versions.items())
        ],
    )
    yield from verdict_families(v.verdicts())


_VERDICT_GAUGES = (
    (
        "capacity_rps",
        "rightsizer_experiment_capacity_requests_per_second",
        "Estimated capacity at the SLO per replica of a group, on the experiment's traffic mix.",
    ),
    (
        "usd_per_month",
        "rightsizer_experiment_cost_usd_per_month",
        "Cost per month of a group serving all the experiment's traffic at the current rate.",
    ),
    (
        "usd_per_1m_tokens",
        "rightsizer_experiment_cost_usd_per_1m_tokens",
        "Cost per 1M tokens of a group at its capacity (GPU groups) or list price (managed).",
    ),
)


def verdict_families(verdicts: Sequence[Mapping[str, Any]]) -> Iterator[GaugeRow]:
    """Gauges from the estimator's experiment reports (``estimator.compare.Verdict``)."""
    for key, name, doc in _VERDICT_GAUGES:
        rows = []
        for vd in verdicts:
            for g in vd.get("groups") or ():
                value = g.get(key)
                if isinstance(value, int | float) and value == value:
                    rows.append(((str(vd.get("experiment")), str(g.get("group"))), float(value)))
        yield GaugeRow(name, doc, ("experiment", "group"), rows)
    ratios = [
        ((str(vd.get("experiment")),), float(vd["cost_ratio"]))
        for vd in verdicts
        if isinstance(vd.get("cost_ratio"), int | float)
    ]
    yield GaugeRow(
        "rightsizer_experiment_cost_ratio",
        "Candidate / baseline cost per month "
        "at the current rate (below 1: the candidate is cheaper).",
        ("experiment",),
        ratios,
    )


def slo_families(ttft_p95_s: float, itl_p95_s: float) -> Iterator[GaugeRow]:
    yield GaugeRow("rightsizer_slo_ttft_p95_seconds", "SLO target: p95 TTFT.", (),
                   [((), ttft_p95_s)])  # fmt: skip
    yield GaugeRow("rightsizer_slo_itl_p95_seconds", "SLO target: p95 ITL.", (),
                   [((), itl_p95_s)])  # fmt: skip


def backend_families(backends: Sequence[BackendView], now: float) -> Iterator[Metric | GaugeRow]:
    lb = ("backend",)
    yield GaugeRow(
        "rightsizer_backend_up",
        "1 when the backend passes health checks and is not ejected.",
        lb,
        [((b.name,), float(b.available(now))) for b in backends],
    )
    yield GaugeRow(
        "rightsizer_backend_inflight_requests",
        "Requests this proxy has in flight upstream.",
        lb,
        [((b.name,), float(b.inflight)) for b in backends],
    )
    yield GaugeRow(
        "rightsizer_backend_inflight_tokens",
        "Estimated tokens (prompt + max output) this proxy has in flight upstream.",
        lb,
        [((b.name,), float(b.inflight_tokens)) for b in backends],
    )
    for attr, name, doc in _ENGINE_GAUGES:
        rows = [
            ((b.name,), float(v))
            for b in backends
            if b.snapshot is not None and (v := getattr(b.snapshot, attr)) is not None
        ]
        yield GaugeRow(name, doc, lb, rows)
    for attr, name, doc in _ENGINE_COUNTERS:
        fam = CounterMetricFamily(name, doc, labels=list(lb))
        for b in backends:
            if b.snapshot is not None and (v := getattr(b.snapshot, attr)) is not None:
                fam.add_metric([b.name], float(v))
        yield fam


def gpu_families(samples: Sequence[GpuSample]) -> Iterator[GaugeRow]:
    """The latest GPU samples as gauges (nothing when there are none)."""
    if not samples:
        return
    for metric, doc, attr in GPU_GAUGES:
        rows = [((str(s.index), s.name or "unknown"), float(v))
                for s in samples if (v := getattr(s, attr)) is not None]  # fmt: skip
        yield GaugeRow(metric, doc, ("gpu", "name"), rows)


def generate_latest(registry: CollectorRegistry) -> bytes:
    return _generate_latest(registry)


MACHINE_WIDE = (
    "rightsizer_estimator_", "rightsizer_slo_", "rightsizer_engine_", "rightsizer_backend_up",
    "rightsizer_gpu_", "rightsizer_backend_inflight_limit", "rightsizer_shared_state_up",
)  # fmt: skip
"""Metrics every worker of a machine reports alike (one estimator, the same engines and GPUs):
the aggregate takes one worker's values. Every other metric is the worker's own share (its
requests, tokens, in-flight counts, queue) and the aggregate sums them."""


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_expositions(texts: Sequence[str]) -> bytes:
    """One exposition for a process group from each process's own (see ``MACHINE_WIDE``)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                values[fam.name] = {}
            wide = fam.name.startswith(MACHINE_WIDE)
            acc = values[fam.name]
            for smp in fam.samples:
                if smp.name.endswith("_created"):
                    continue  # per-process timestamps, not additive
                key = (smp.name, tuple(sorted(smp.labels.items())))
                if wide:
                    acc.setdefault(key, smp.value)
                else:
                    acc[key] = acc.get(key, 0.0) + smp.value
    out = []
    for name, fam in families.items():
        for (sample, labels), value in values[name].items():
            fam.add_sample(sample, dict(labels), value)
        out.append(fam)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(out))
    return _generate_latest(registry)


def metrics_handler(
    registry: CollectorRegistry, siblings: Callable[[], Any] | None = None
) -> Callable[[web.Request], Any]:
    """The ``/metrics`` handler every program serves. With ``siblings`` (a coroutine function
    returning the other workers' expositions), the answer covers the whole process group;
    ``?scope=local`` gives this process's own."""

    async def handle(request: web.Request) -> web.Response:
        local = _generate_latest(registry)
        body = local
        if siblings is not None and request.query.get("scope") != "local":
            others = await siblings()
            body = await asyncio.to_thread(
                merge_expositions, [local.decode(), *(o.decode() for o in others)]
            )
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    return handle
