"""The Estimator: the one object the proxy holds (and the only estimator module that keeps
time or reads files).

Threading: ``observe`` and ``observe_backend`` run on the event loop and only append to a
bounded ``collections.deque`` (atomic under the GIL, O(1), never raises; when ``refresh`` falls
behind the oldest pending records are dropped and counted). ``refresh`` runs in a worker thread
(``asyncio.to_thread``): it drains the deques into per-model and per-backend statistics that only
it touches, fits, projects and swaps one reference; ``report()`` reads that reference. A lock
keeps two refreshes from overlapping.

Per deployment (model) the step model is, in order of preference: the calibrated fit when
trusted; the roofline prior (needs a model config and a GPU key); otherwise the report says
``insufficient_data`` and gives no capacity figures. A projection that raises (bad data) makes
that deployment's report ``error`` with the reason, logged; the others are unaffected. The
alternatives search (seconds of simulation) runs at most every ``advisor_interval_s`` and is
reused in between.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from estimator.calibrate import OnlineCalibrator
from estimator.capacity import Slo
from estimator.catalog import GpuSpec, get_quantization, load_gpu_catalog
from estimator.compare import ExperimentsSpec
from estimator.engine import StepModel, roofline_prior
from estimator.experiments import ExperimentTracker
from estimator.modelarch import ModelArch, load_model_arch
from estimator.projection import BackendState, DeploymentState, backend_report, failed, project
from estimator.records import BackendSnapshot, RequestRecord
from estimator.report import BackendReport, DeploymentReport, Report, SloReport
from estimator.traffic import read_log

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class EstimatorConfig:
    """Settings of the Estimator. Durations in seconds, rates in requests/s."""

    slo_ttft_p95_s: float = 1.0
    """Target p95 time to first token, seconds."""
    slo_itl_p95_s: float = 0.1
    """Target p95 inter-token latency, seconds."""
    gpu: str | None = None
    """Catalog key of the GPU type behind every backend (cost, roofline prior); None: unknown."""
    backend_gpus: Mapping[str, str] = field(default_factory=dict)
    """Per-backend GPU key, overriding ``gpu``."""
    gpus_per_backend: int = 1
    """GPUs per backend (tensor parallel size); cost is price x this x backends."""
    quant: str = "bf16"
    """Weight format the backends run (bf16, fp8, int8, int4; int4-awq and int4-gptq too)."""
    kv_dtype: str = "auto"
    """KV-cache dtype the backends run (auto or fp8)."""
    model_configs: Mapping[str, str] = field(default_factory=dict)
    """Model name -> path of its Hugging Face config.json (enables the roofline prior)."""
    catalog_path: str | None = None
    """A GPU catalog YAML merged over the packaged one (prices, extra GPUs)."""
    gpu_memory_utilization: float = 0.9
    """vLLM's gpu_memory_utilization, for memory plans."""
    max_num_seqs: int = 256
    """Engine max_num_seqs assumed when the backend does not expose it."""
    max_model_len: int | None = None
    """Engine max_model_len assumed when not exposed; None: the model's maximum."""
    records_per_model: int = 1 << 17
    """Records kept per model for length distributions (a ring)."""
    pending_records: int = 1 << 18
    """Records buffered between refreshes; beyond it the oldest are dropped and counted."""
    trend_window_s: float = 3600.0
    """Window of per-minute counts the trend is fitted on."""
    latency_window_s: float = 300.0
    """Window of the observed TTFT/ITL p95."""
    forecast_horizon_s: float = 3600.0
    """Horizon of the forecast peak that sizes recommended replicas."""
    breach_horizon_s: float = 7 * 86400.0
    """How far ahead the time to SLO breach is searched; beyond it: None."""
    refresh_interval_s: float = 30.0
    """How often the proxy should call ``refresh``."""
    advisor_interval_s: float = 600.0
    """How often the alternatives search reruns (it simulates for seconds)."""
    advisor_gpus: tuple[str, ...] = ()
    """GPU keys the alternatives search considers; empty: the whole catalog but CPUs."""
    advisor_max_simulated: int = 8
    """Alternatives simulated per search at most (the cheapest by a first estimate)."""
    sim_requests: int = 800
    """Requests per simulated capacity probe."""
    spare_replicas: int = 1
    """Spare replicas on top of those the forecast peak needs (N+1)."""
    min_records: int = 50
    """Records a model needs before its traffic and fit are projected."""
    max_models: int = 64
    """Models tracked at most (about 10 MB of rings each); records of further models are
    dropped and counted."""
    max_backends: int = 256
    """Backends tracked at most."""
    active_window_s: float = 600.0
    """A backend counts as a replica of a model while it served one of its requests within
    this window, or while its last scrape says it is up and lists the model."""
    experiments: ExperimentsSpec | None = None
    """Deployment groups and their experiments: each group is judged as a deployment of its
    own and the report carries a verdict per experiment (``estimator.experiments``)."""

    @property
    def slo(self) -> Slo:
        return Slo(ttft_p95_s=self.slo_ttft_p95_s, itl_p95_s=self.slo_itl_p95_s)

    def gpu_for(self, backend: str | None) -> str | None:
        if backend is not None and backend in self.backend_gpus:
            return self.backend_gpus[backend]
        return self.gpu


_QUANT_ALIASES = {"int4-awq": "int4", "int4-gptq": "int4", "awq": "int4", "gptq": "int4"}


def check_config(config: EstimatorConfig, catalog: Mapping[str, GpuSpec]) -> str:
    """Validate GPU keys and the weight format; returns the format's canonical name.

    Raises ``ValueError`` naming the field (``estimator.gpu``, ``estimator.backend_gpus.b1``,
    ``estimator.quant``, ``estimator.kv_dtype``)."""
    keys = [("estimator.gpu", config.gpu)]
    keys += [(f"estimator.backend_gpus.{b}", g) for b, g in config.backend_gpus.items()]
    for where, key in keys:
        if key is not None and key not in catalog:
            raise ValueError(f"{where}: unknown GPU {key!r}; known: {', '.join(sorted(catalog))}")
    quant = _QUANT_ALIASES.get(config.quant.lower(), config.quant.lower())
    try:
        get_quantization(quant)
    except ValueError as e:
        raise ValueError(f"estimator.quant: {e}") from None
    if config.kv_dtype not in ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bf16", "fp16"):
        raise ValueError(f"estimator.kv_dtype: unknown {config.kv_dtype!r}; use auto or fp8")
    if config.gpus_per_backend < 1:
        raise ValueError("estimator.gpus_per_backend: must be >= 1")
    return quant


class Estimator:
    """Observes records and snapshots (O(1)), refreshes projections on demand."""

    def __init__(
        self, config: EstimatorConfig | None = None, *, catalog: Mapping[str, GpuSpec] | None = None
    ) -> None:
        self.config = config or EstimatorConfig()
        self.catalog = dict(catalog) if catalog is not None else load_gpu_catalog(
            extra=self.config.catalog_path
        )  # fmt: skip
        self.config = replace(self.config, quant=check_config(self.config, self.catalog))
        self._pending: deque[RequestRecord] = deque(maxlen=self.config.pending_records)
        self._snapshots: deque[BackendSnapshot] = deque(maxlen=4 * self.config.max_backends)
        self._submitted = 0  # written by the event loop only
        self._drained = 0  # written by refresh only
        self._invalid = 0
        self._models: dict[str, DeploymentState] = {}
        self._backends: dict[str, BackendState] = {}
        self._archs: dict[str, ModelArch | str] = {}  # model -> arch, or why there is none
        self._lock = threading.Lock()
        self._report: Report | None = None
        self._experiments = (
            ExperimentTracker(self.config, self.catalog) if self.config.experiments else None
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

    # ---- off the hot path ----------------------------------------------------------------
    def refresh(self, now: float | None = None) -> Report:
        """Drain, fit and project as of ``now`` (wall-clock epoch; default: the clock)."""
        with self._lock:
            started = time.perf_counter()
            at = time.time() if now is None else now
            self._drain()
            deployments = tuple(self._project(name, at) for name in sorted(self._models))
            backends = tuple(self._backend_report(name, at) for name in sorted(self._backends))
            report = Report(
                generated_at=at,
                slo=SloReport(ttft_p95_s=self.config.slo_ttft_p95_s,
                              itl_p95_s=self.config.slo_itl_p95_s),
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
        records = read_log(path)
        return self.replay_records(records, now=now)

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
            dep = self._models[r.model] = self._new_deployment(r.model, r.backend)
        dep.observe(r)
        if r.backend is not None:
            b = self._backend(r.backend)
            if b is not None:
                b.observe(r)

    def _backend(self, name: str) -> BackendState | None:
        b = self._backends.get(name)
        if b is None and len(self._backends) < self.config.max_backends:
            b = self._backends[name] = BackendState(name)
        return b

    def _new_deployment(self, model: str, backend: str | None) -> DeploymentState:
        cfg = self.config
        arch = self._arch(model)
        gpu = self._gpu(cfg.gpu_for(backend))
        prior: StepModel | None = None
        if isinstance(arch, ModelArch) and gpu is not None:
            try:
                prior = roofline_prior(arch, gpu, tp=cfg.gpus_per_backend, quant=cfg.quant,
                                       kv_dtype=cfg.kv_dtype)  # fmt: skip
            except ValueError as e:  # e.g. a TP degree the architecture cannot split into
                self._archs[model] = f"no roofline prior for {model}: {e}"
        return DeploymentState(
            model=model,
            records=cfg.records_per_model,
            trend_window_s=cfg.trend_window_s,
            calibrator=OnlineCalibrator(prior=prior),
            prior=prior,
        )

    def _arch(self, model: str) -> ModelArch | str:
        if model not in self._archs:
            path = self.config.model_configs.get(model)
            if path is None:
                self._archs[model] = "no model config given"
            else:
                try:
                    self._archs[model] = load_model_arch(path)
                except (OSError, ValueError) as e:
                    self._archs[model] = f"model config {path}: {e}"
        return self._archs[model]

    def _gpu(self, key: str | None) -> GpuSpec | None:
        return None if key is None else self.catalog.get(key)

    def _project(self, model: str, now: float) -> DeploymentReport:
        dep = self._models[model]
        names = self._active(model, dep.backends, now) or tuple(sorted(dep.backends))
        snaps = [self._backends[n].last for n in names if n in self._backends]
        gpu = self._gpu(self.config.gpu_for(names[0] if names else None))
        try:
            return project(
                dep,
                config=self.config,
                arch=self._arch(model),
                gpu=gpu,
                catalog=self.catalog,
                snapshots=[s for s in snaps if s is not None],
                backends=names,
                now=now,
            )
        except (ValueError, ArithmeticError) as e:  # one model's bad data must not hide the rest
            log.warning("estimator: projection of %r failed: %s", model, e)
            return failed(dep, config=self.config, gpu=gpu, backends=names, now=now, reason=str(e))

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

    def _backend_report(self, name: str, now: float) -> BackendReport:
        return backend_report(self._backends[name], now=now, window_s=self.config.latency_window_s)
