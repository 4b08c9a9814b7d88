"""The Estimator: the one object the proxy holds (and the only estimator module that keeps
time, state or reads files).

Threading: ``observe`` and ``observe_backend`` run on the event loop and only append to a
bounded ``collections.deque`` (atomic under the GIL, O(1), never raises; when ``refresh`` falls
behind the oldest pending records are dropped and counted). ``refresh`` runs off the loop (a
worker thread, or a child process: ``Estimator(config)`` needs only the picklable
``EstimatorConfig``, and the report travels back as ``Report.to_dict()`` plus
``Report.gauge_families()``): it drains the deques into per-model and per-backend state that
only it touches, builds each deployment's ``DeploymentInputs`` and calls the pure
``estimator.projection.project`` once per deployment, then swaps one reference; ``report()``
reads that reference. A lock keeps two refreshes from overlapping. A projection that raises
(bad data) makes that deployment's report ``error`` with the reason, logged; the others are
unaffected.

Measured latencies (``LatencyWindow``): the TTFT p95 of the OK requests of the last
``latency_window_s``, and the ITL p95 over all their token gaps, read from the records' gap
histograms summed in 30 time buckets (the SLO's definition; records without a histogram, from
an older proxy, count towards neither the gaps nor that p95).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from estimator.calibrate import OnlineCalibrator
from estimator.catalog import GpuSpec, load_gpu_catalog
from estimator.compare import ExperimentsSpec
from estimator.engine import StepModel, roofline_prior
from estimator.experiments import ExperimentTracker
from estimator.limits import assumed_limits
from estimator.modelarch import ModelArch, load_model_arch
from estimator.projection import (
    DeploymentInputs,
    ObservedLatency,
    Projection,
    ProjectionCache,
    engine_observed,
    failed,
    project,
    traffic_from_stats,
)
from estimator.records import (
    GAP_BINS,
    BackendSnapshot,
    Outcome,
    RequestRecord,
    add_gap_histogram,
    gap_quantiles,
)
from estimator.report import BackendReport, DeploymentReport, Report, SloReport
from estimator.settings import EstimatorConfig, resolve_model_config, validate
from estimator.traffic import ArrivalCounter, TrafficStats, read_log

__all__ = ["Estimator", "EstimatorConfig", "LatencyWindow"]

log = logging.getLogger(__name__)
_BUCKETS = 30


class LatencyWindow:
    """Measured TTFT (streamed OK requests) and ITL (all their gaps), by arrival epoch, bounded:
    a TTFT ring and gap histograms in ``_BUCKETS`` time buckets spanning ``window_s``."""

    __slots__ = ("epoch", "first", "gap_ids", "gaps", "n", "ttft", "width")

    def __init__(self, window_s: float, size: int = 1 << 14) -> None:
        self.epoch = np.full(size, -np.inf)
        self.ttft = np.full(size, np.nan)
        self.n = 0
        self.first: float | None = None
        self.width = max(window_s, 1.0) / _BUCKETS
        self.gap_ids = [-1] * (_BUCKETS + 1)
        self.gaps = [[0] * GAP_BINS for _ in range(_BUCKETS + 1)]

    def observe(self, r: RequestRecord) -> None:
        if r.outcome is not Outcome.OK:
            return
        t = r.arrival_epoch
        i = self.n % self.epoch.size
        self.epoch[i] = t
        ttft = r.ttft_s
        self.ttft[i] = np.nan if ttft is None or not r.streamed else ttft
        self.n += 1
        self.first = t if self.first is None else min(self.first, t)
        if r.itl.gap_bins:
            key = int(t // self.width)
            slot = key % len(self.gap_ids)
            if self.gap_ids[slot] < key:  # a newer bucket claims the slot
                self.gap_ids[slot] = key
                self.gaps[slot] = [0] * GAP_BINS
            if self.gap_ids[slot] == key:  # else older than the ring remembers: dropped
                add_gap_histogram(self.gaps[slot], r.itl)

    def observed(self, now: float, window_s: float) -> ObservedLatency:
        recent = self.epoch >= now - window_s
        ttft = self.ttft[recent]
        ttft = ttft[np.isfinite(ttft)]
        lo = int((now - window_s) // self.width)
        rows = [g for k, g in zip(self.gap_ids, self.gaps, strict=True) if k >= lo]
        dense = np.sum(rows, axis=0) if rows else np.zeros(GAP_BINS)
        span = window_s if self.first is None else min(window_s, max(0.0, now - self.first))
        return ObservedLatency(
            ttft_p95_s=float(np.quantile(ttft, 0.95)) if ttft.size else None,
            itl_p95_s=gap_quantiles(dense.tolist(), [0.95])[0], window_s=span,
            requests=int(ttft.size), gaps=int(dense.sum()),
        )  # fmt: skip


class DeploymentState:
    """Everything kept about one model (mutated by the refresh thread only)."""

    def __init__(self, model: str, cfg: EstimatorConfig, prior: StepModel | None) -> None:
        self.model = model
        self.traffic = TrafficStats(cfg.records_per_model, trend_window_s=cfg.trend_window_s)
        self.latency = LatencyWindow(cfg.latency_window_s)
        self.calibrator = OnlineCalibrator(prior=prior)
        self.prior = prior
        self.backends: set[str] = set()
        self.cache = ProjectionCache()  # simulations of past passes; owned here, passed in

    def observe(self, r: RequestRecord) -> None:
        self.traffic.observe(r)
        self.latency.observe(r)
        self.calibrator.observe(r)
        if r.backend is not None:
            self.backends.add(r.backend)


class BackendState:
    """Requests seen on one backend and its last two snapshots."""

    def __init__(self, name: str, window_s: float) -> None:
        self.name = name
        self.arrivals = ArrivalCounter()
        self.latency = LatencyWindow(window_s, 4096)
        self.models: set[str] = set()
        self.last: BackendSnapshot | None = None
        self.prev: BackendSnapshot | None = None

    def observe(self, r: RequestRecord) -> None:
        self.arrivals.add(r.arrival_epoch)
        self.latency.observe(r)
        self.models.add(r.model)

    def observe_snapshot(self, s: BackendSnapshot) -> None:
        if self.last is None or s.time_s >= self.last.time_s:
            self.prev, self.last = self.last, s
        self.models.update(s.models)

    def report(self, now: float, window_s: float) -> BackendReport:
        s, p = self.last, self.prev
        obs = self.latency.observed(now, window_s)
        preempt = None
        if s and p and s.preemptions is not None and p.preemptions is not None:
            dt = s.time_s - p.time_s
            preempt = max(0.0, s.preemptions - p.preemptions) / dt if dt > 0 else None
        gpus = s.gpus if s is not None else ()
        util = [g.utilization for g in gpus if g.utilization is not None]
        mem = [g.memory_used_bytes / g.memory_total_bytes for g in gpus
               if g.memory_used_bytes is not None and g.memory_total_bytes]  # fmt: skip
        return BackendReport(
            backend=self.name, models=tuple(sorted(self.models)), up=s.up if s else None,
            requests_observed=self.arrivals.count, rate_rps=self.arrivals.rate(300.0, now),
            observed_ttft_p95_s=obs.ttft_p95_s, observed_itl_p95_s=obs.itl_p95_s,
            running=s.running if s else None, waiting=s.waiting if s else None,
            kv_usage=s.kv_usage if s else None,
            kv_capacity_tokens=s.kv_capacity_tokens if s else None,
            prefix_cache_hit_ratio=_hit_ratio(s, p) if s else None, preemptions_per_s=preempt,
            gpu_utilization=sum(util) / len(util) if util else None,
            gpu_memory_used_ratio=sum(mem) / len(mem) if mem else None,
            snapshot_age_s=now - s.epoch if s is not None and s.epoch else None,
        )  # fmt: skip


def _hit_ratio(s: BackendSnapshot, p: BackendSnapshot | None) -> float | None:
    """Prefix-cache hits / queries between the last two scrapes (since start without a previous
    one, or after a counter reset); the engine's own rate when it only exposes that."""
    if s.prefix_cache_queries and s.prefix_cache_hits is not None:
        if p is not None and p.prefix_cache_queries is not None and p.prefix_cache_hits is not None:
            dq = s.prefix_cache_queries - p.prefix_cache_queries
            dh = s.prefix_cache_hits - p.prefix_cache_hits
            if dq > 0 and dh >= 0:
                return dh / dq
        return s.prefix_cache_hits / s.prefix_cache_queries
    return s.prefix_cache_hit_rate


class Estimator:
    """Observes records and snapshots (O(1)), refreshes projections on demand."""

    def __init__(
        self,
        config: EstimatorConfig | None = None,
        *,
        catalog: Mapping[str, GpuSpec] | None = None,
        experiments: ExperimentsSpec | None = None,
    ) -> None:
        """``experiments``: the proxy's deployment groups and experiments (from its ``groups``
        and ``experiments`` sections): each group is judged as a deployment of its own and the
        report carries a verdict per experiment (``estimator.experiments``)."""
        config = config or EstimatorConfig()
        self.catalog = dict(catalog) if catalog is not None else load_gpu_catalog(
            extra=config.catalog
        )  # fmt: skip
        self.config = validate(config, self.catalog)
        self._pending: deque[RequestRecord] = deque(maxlen=self.config.pending_records)
        self._snapshots: deque[BackendSnapshot] = deque(maxlen=4 * self.config.max_backends)
        self._submitted = 0  # written by the event loop only
        self._drained = 0  # written by refresh only
        self._invalid = 0
        self._models: dict[str, DeploymentState] = {}
        self._backends: dict[str, BackendState] = {}
        self._archs: dict[str, ModelArch | str] = {}  # model -> arch, or why there is none
        self._projections: dict[str, Projection] = {}
        self._lock = threading.Lock()
        self._report: Report | None = None
        self._experiments = (
            ExperimentTracker(self.config, self.catalog, experiments)
            if experiments is not None and experiments.groups
            else None
        )

    # ---- hot path ------------------------------------------------------------------------
    def observe(self, record: RequestRecord) -> None:
        """O(1), never blocks, never raises."""
        self._pending.append(record)
        self._submitted += 1

    def observe_backend(self, snapshot: BackendSnapshot) -> None:
        """O(1), never blocks, never raises."""
        self._snapshots.append(snapshot)

    def report(self) -> Report | None:
        """The latest report (None before the first refresh)."""
        return self._report

    def projection(self, model: str) -> Projection | None:
        """The latest projection of ``model``, with the numbers behind it (``basis``)."""
        return self._projections.get(model)

    # ---- off the hot path ----------------------------------------------------------------
    def refresh(self, now: float | None = None) -> Report:
        """Drain, fit and project as of ``now`` (wall-clock epoch; default: the clock)."""
        with self._lock:
            started = time.perf_counter()
            at = time.time() if now is None else now
            self._drain()
            deployments = tuple(self._project(name, at) for name in sorted(self._models))
            window = self.config.latency_window_s
            backends = tuple(self._backends[n].report(at, window) for n in sorted(self._backends))
            slo = self.config.slo
            report = Report(
                generated_at=at,
                slo=SloReport(ttft_p95_s=slo.ttft_p95_s, itl_p95_s=slo.itl_p95_s,
                              quantile=slo.quantile),
                deployments=deployments,
                backends=backends,
                refresh_seconds=time.perf_counter() - started,
                records_dropped=self.records_dropped,
                experiments=self._experiments.refresh(at) if self._experiments else (),
            )  # fmt: skip
            self._report = report
            return report

    @property
    def records_dropped(self) -> int:
        """Records submitted but never counted: buffer overflow, invalid, or too many models."""
        submitted = self._submitted  # read before the queue: a racing observe then can only
        pending = len(self._pending)  # make the count lag, never overshoot
        return max(0, submitted - self._drained - pending) + self._invalid

    def replay(self, path: str | Path, *, now: float | None = None) -> Report:
        """Feed a JSON-lines request log (``RequestRecord.to_dict`` per line) and refresh as of
        ``now`` (default: one second after the last arrival in the log)."""
        return self.replay_records(read_log(path), now=now)

    def replay_records(
        self, records: Iterable[RequestRecord], *, now: float | None = None
    ) -> Report:
        last = 0.0
        for r in records:
            self.observe(r)
            last = max(last, r.arrival_epoch)
            if len(self._pending) >= self.config.pending_records // 2:
                with self._lock:
                    self._drain()
        return self.refresh(now if now is not None else last + 1.0)

    def _drain(self) -> None:
        pending = self._pending
        while pending:
            r = pending.popleft()
            self._drained += 1
            try:
                self._ingest(r)
            except (AttributeError, TypeError, ValueError, OverflowError):
                self._invalid += 1
        snaps = self._snapshots
        while snaps:
            s = snaps.popleft()
            b = self._backend(s.backend)
            if b is not None:
                b.observe_snapshot(s)
            if self._experiments is not None:
                self._experiments.observe_backend(s)

    def _ingest(self, r: RequestRecord) -> None:
        if self._experiments is not None:
            self._experiments.observe(r)
        if r.shadow:  # a copy for an experiment: load on its backend, not the model's traffic
            b = self._backend(r.backend) if r.backend is not None else None
            if b is not None:
                b.observe(r)
            return
        dep = self._models.get(r.model)
        if dep is None:
            if len(self._models) >= self.config.max_models:
                self._invalid += 1
                return
            prior = self._prior(r.model, r.backend)
            dep = self._models[r.model] = DeploymentState(r.model, self.config, prior)
        dep.observe(r)
        if r.backend is not None:
            b = self._backend(r.backend)
            if b is not None:
                b.observe(r)

    def _backend(self, name: str) -> BackendState | None:
        b = self._backends.get(name)
        if b is None and len(self._backends) < self.config.max_backends:
            b = self._backends[name] = BackendState(name, self.config.latency_window_s)
        return b

    def _prior(self, model: str, backend: str | None) -> StepModel | None:
        cfg = self.config
        arch, gpu = self._arch(model), self._gpu(cfg.gpu_for(backend))
        if not isinstance(arch, ModelArch) or gpu is None:
            return None
        try:
            return roofline_prior(arch, gpu, tp=cfg.gpus_per_backend, quant=cfg.quant,
                                  kv_dtype=cfg.kv_dtype, engine=cfg.engine,
                                  enforce_eager=cfg.enforce_eager)  # fmt: skip
        except ValueError as e:  # e.g. a TP degree the architecture cannot split into
            self._archs[model] = f"no roofline prior for {model}: {e}"
            return None

    def _arch(self, model: str) -> ModelArch | str:
        if model not in self._archs:
            spec = self.config.model_configs.get(model)
            if spec is None:
                self._archs[model] = "no model config given"
            else:
                try:
                    self._archs[model] = load_model_arch(resolve_model_config(spec))
                except (OSError, ValueError) as e:
                    self._archs[model] = f"model config {spec}: {e}"
        return self._archs[model]

    def _gpu(self, key: str | None) -> GpuSpec | None:
        return None if key is None else self.catalog.get(key)

    def _inputs(self, model: str, now: float) -> DeploymentInputs:
        cfg, dep = self.config, self._models[model]
        names = self._active(model, dep.backends, now) or tuple(sorted(dep.backends))
        snaps = [s for s in (self._backends[n].last for n in names if n in self._backends)
                 if s is not None]  # fmt: skip
        engine = engine_observed(snaps)
        gpu = self._gpu(cfg.gpu_for(names[0] if names else None))
        cal = None
        if len(dep.calibrator):
            seqs = engine.max_num_seqs or cfg.max_num_seqs
            cal = dep.calibrator.fit(
                max_num_seqs=seqs or assumed_limits(cfg.engine, gpu).max_num_seqs
            )
        arch = self._arch(model)
        return DeploymentInputs(
            model=model, now=now, config=cfg, catalog=self.catalog,
            arch=arch if isinstance(arch, ModelArch) else None,
            arch_note=arch if isinstance(arch, str) else None,
            gpu=gpu, backends=names,
            replicas=max(1, len(names)), running=True, requests_observed=dep.traffic.count,
            traffic=traffic_from_stats(dep.traffic, now, cfg.forecast_horizon_s),
            observed=dep.latency.observed(now, cfg.latency_window_s), engine=engine,
            calibration=cal, prior=dep.prior,
        )  # fmt: skip

    def _project(self, model: str, now: float) -> DeploymentReport:
        inputs = None
        try:
            inputs = self._inputs(model, now)
            proj = project(inputs, self._models[model].cache)
        except (ValueError, ArithmeticError) as e:  # one model's bad data must not hide the rest
            log.warning("estimator: projection of %r failed: %s", model, e)
            self._projections.pop(model, None)
            return failed(inputs or self._bare_inputs(model, now), str(e))
        self._projections[model] = proj
        return proj.report

    def _bare_inputs(self, model: str, now: float) -> DeploymentInputs:
        dep = self._models[model]
        names = tuple(sorted(dep.backends))
        return DeploymentInputs(
            model=model, now=now, config=self.config, catalog=self.catalog, arch=None,
            gpu=self._gpu(self.config.gpu_for(names[0] if names else None)), backends=names,
            replicas=max(1, len(names)), requests_observed=dep.traffic.count, traffic=None,
        )  # fmt: skip

    def _active(self, model: str, names: Iterable[str], now: float) -> tuple[str, ...]:
        """Backends serving ``model`` now: a recent request, or an up scrape listing it."""
        out = []
        for name in sorted(names):
            b = self._backends.get(name)
            if b is None:
                continue
            last, snap = b.arrivals.last_epoch, b.last
            recent = last is not None and last >= now - self.config.active_window_s
            up = snap is not None and snap.up and model in snap.models
            if recent or up:
                out.append(name)
        return tuple(out)
