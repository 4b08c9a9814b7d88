"""The estimator's report: typed, immutable, JSON-serialisable (``to_dict()``).

``Report`` holds one ``DeploymentReport`` per model (the backends serving it) and one
``BackendReport`` per backend. Every figure is in base units (seconds, requests/s, tokens,
ratio 0..1, USD); ``None`` means unknown, never -1. ``DeploymentReport.gauges()`` and
``BackendReport.gauges()`` list the numeric figures worth exporting as gauges (name without
the ``rightsizer_`` prefix, value or None); ``Report.gauge_families()`` groups them as
``(name, doc, labelnames, samples)`` for a scrape-time collector (the fields of the proxy's
``GaugeRow``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from estimator.cost import CostFigures

Number = float | int


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` with non-finite floats turned into None."""
    out: dict[str, Any] = _jsonable(dataclasses.asdict(obj))
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Uncertainty:
    """A band around a figure: ``low <= value <= high``, from the model's own fit error."""

    low: float
    high: float
    rel_error: float  # e.g. the p90 relative error of the step-time fit
    source: str  # where the band comes from


@dataclass(frozen=True, slots=True, kw_only=True)
class Recommendation:
    """One piece of advice, with the numbers behind it."""

    kind: str  # "replicas", "max_num_seqs", "max_model_len", "kv_cache_dtype", "gpu",
    # "oom_risk", "underutilized", "no_option_meets_slo", "insufficient_data", ...
    severity: str  # "info", "warning" or "critical"
    message: str
    value: str | float | int | None = None  # the recommended setting, when there is one
    numbers: dict[str, str | float | int | None] = dataclasses.field(default_factory=dict)
    assumptions: tuple[str, ...] = ()
    uncertainty: Uncertainty | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Alternative:
    """One candidate deployment: GPU type x GPUs per replica x quantization x replicas."""

    gpu: str
    gpu_name: str
    gpus_per_replica: int
    quant: str
    kv_dtype: str
    replicas: int  # for the forecast peak, N+1 included
    capacity_rps_per_replica: float  # at the SLO
    capacity_rps: float  # all replicas but the spare
    meets_slo: bool
    limiting: str | None  # what caps capacity: "ttft", "itl", "kv", ...
    kv_capacity_tokens: int
    max_concurrent_seqs: int | None
    oom_risk: str  # "none", "low", "high" or "certain" (estimator.memory)
    usd_per_hour: float
    usd_per_month: float
    usd_per_1m_tokens: float | None  # at ``priced_at_rps`` (the forecast peak); None: no SLO
    usd_per_1m_input_tokens: float | None
    usd_per_1m_output_tokens: float | None
    priced_at_rps: float | None = None  # the rate the per-token prices hold at
    fits: bool = True  # the weights and one max_model_len sequence fit in GPU memory
    current: bool = False  # the configuration running now
    uncertainty: Uncertainty | None = None  # on capacity_rps_per_replica
    assumptions: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()

    def label(self) -> str:
        return f"{self.replicas}x {self.gpus_per_replica}x{self.gpu} {self.quant}"

    def verdict(self) -> str:
        """``meets the SLO``, ``misses the SLO at any rate`` or ``does not fit``."""
        if not self.fits:
            return "does not fit"
        return "meets the SLO" if self.meets_slo else "misses the SLO at any rate"


@dataclass(frozen=True, slots=True, kw_only=True)
class FitReport:
    """How well the step-time model explains the observed latencies."""

    source: str  # "calibrated", "prior" (roofline only), "calibrated_only" or "none"
    samples: int
    rel_error_p50: float | None
    rel_error_p90: float | None
    trusted: bool
    scale_vs_prior: float | None = None  # observed/prior step-time ratio carried to other GPUs
    step_jitter_sigma: float | None = None  # lognormal sigma of step-to-step noise, learned
    step_drift_sigma: float | None = None  # lognormal sigma of the slowly wandering speed
    step_drift_tau_s: float | None = None  # its correlation time
    vs_prior: dict[str, float | None] | None = None
    """How far the live engine is from its engine profile's prior (``Calibration.vs_prior``):
    fitted / prior per coefficient, of the ITL at batch 8 and of a 1024-token prefill (1.0:
    the profile was right; 2.0: twice as slow); None without a calibration or a prior."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficReport:
    """The traffic a projection is about. Windows never claim more history than there is:
    ``history_s`` is how far back the data goes, and each rate covers at most that."""

    rate_rps: float  # the rate the projection is about: the 5-minute rate online
    rate_window_s: float | None  # seconds of arrivals it stands on; None: given, not measured
    history_s: float | None  # first to last arrival seen; None: synthetic traffic
    requests: int  # records it stands on (0: synthetic)
    description: str  # e.g. "5 req/s, prompt lognormal:1024:0.8, output 256"
    rate_1m_rps: float
    rate_5m_rps: float
    rate_1h_rps: float
    trend_rps_per_hour: float  # 0 when not significant
    trend_significant: bool
    forecast_peak_rps: float
    forecast_horizon_s: float
    seasonal: bool  # a daily profile drives the forecast
    prompt_tokens_p50: float | None
    prompt_tokens_p99: float | None
    output_tokens_p50: float | None
    output_tokens_p99: float | None
    cached_ratio: float
    priority_mix: dict[str, float]


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryReport:
    """The memory plan of one replica, per GPU (bytes), and what it leaves for the KV cache."""

    params: int  # total parameters
    active_params: int  # used per token (MoE: shared + active experts)
    kv_bytes_per_token: float  # one token's KV cache over all layers (whole model)
    gpus: int  # per replica (tensor parallel)
    memory_bytes_per_gpu: int
    budget_bytes_per_gpu: int  # gpu_memory_utilization x memory
    weight_bytes_per_gpu: int
    activation_bytes_per_gpu: int
    cuda_graph_bytes_per_gpu: int
    non_torch_bytes_per_gpu: int
    kv_bytes_per_gpu: int
    kv_capacity_tokens: int  # the whole replica
    num_blocks: int
    max_model_len: int
    max_num_seqs: int
    seqs_at_typical_context: int
    fits: bool
    oom_risk: str
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelCheck:
    """The projection at the measured rate against what was measured in the same window:
    ``error = projected / observed - 1``; None where either is unknown or the data is too thin
    to judge by (a p95 needs 20+ samples above it: 400 requests, 2000 gaps). A known error
    widens the capacity band to its size."""

    rate_rps: float  # per replica
    window_s: float
    ttft_error: float | None
    itl_error: float | None
    ttft_requests: int
    itl_gaps: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LatencyStats:
    """Mean and percentiles of one latency over a simulated run (seconds)."""

    mean: float
    p50: float
    p90: float
    p95: float
    p99: float


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadReport:
    """One replica under one benchmark load, simulated on the step model
    (``estimator.loads``): what ``vllm bench serve`` or ``trtllm-bench`` would print. ITL is
    pooled over every token gap; TPOT per request, ``(e2e - ttft) / (output - 1)``.

    ``bands``: metric (``throughput``, ``ttft``, ``itl``, ``tpot``, ``e2e``) -> ``(low, high)``
    around the mean, from ``LoadResult.band``: the 10th-90th percentile of published /
    predicted on the validation rows of ``bench/data/published.yaml`` (TPOT takes ITL's),
    an ~80% interval for the uncalibrated prior; the same factors hold for each percentile."""

    engine: str
    load: str  # "concurrency 32", "burst 500", "Poisson 2.5 req/s"
    kind: str  # "poisson", "concurrency" or "burst"
    value: float  # req/s, clients or requests
    requests: int  # simulated
    counted: int  # after the warm-up (the first 10% of a Poisson run, a closed loop's first wave)
    ttft: LatencyStats
    itl: LatencyStats
    tpot: LatencyStats
    e2e: LatencyStats
    output_tokens_per_s: float
    requests_per_s: float
    input_tokens_per_s: float
    mean_running: float
    peak_running: int
    preemptions: int
    bands: dict[str, tuple[float, float]]
    band_source: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineChoiceReport:
    """One serving engine's projection under the same deployment and load
    (``estimator.runtimes.compare_engines``), with how far its profile was validated."""

    rank: int  # 1 = best: most output tokens/s (burst, closed loop), else lowest mean TTFT
    engine: str
    title: str
    fits: bool
    output_tokens_per_s: float | None
    ttft_mean_s: float | None
    ttft_p99_s: float | None
    itl_mean_s: float | None
    e2e_mean_s: float | None
    kv_capacity_tokens: int
    validation: str  # the profile's validation caveat
    current: bool = False  # the engine the estimate is for


@dataclass(frozen=True, slots=True, kw_only=True)
class CurvePoint:
    """Simulated p95 latencies of one replica at one rate (for plots)."""

    rate_rps: float
    ttft_p95_s: float | None
    itl_p95_s: float | None
    meets_slo: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentReport:
    """One model and the backends serving it."""

    model: str
    backends: tuple[str, ...]
    status: str  # "ok", "insufficient_data", "does_not_fit" or "error" (see notes)
    notes: tuple[str, ...]
    requests_observed: int
    gpu: str | None
    gpus_per_replica: int
    quant: str
    kv_dtype: str
    replicas: int  # backends serving it now (offline: the replicas asked for or recommended)
    traffic: TrafficReport | None
    capacity_rps: float | None  # all replicas, at the SLO
    capacity_rps_per_replica: float | None
    capacity_band: Uncertainty | None  # on capacity_rps
    limiting: str | None  # what caps capacity: "ttft", "itl", "kv" or "none"
    utilization: float | None  # current rate / capacity
    headroom_rps: float | None
    projected_ttft_p95_s: float | None  # at the current rate (ITL: over all token gaps)
    projected_itl_p95_s: float | None
    meets_slo_at_rate: bool | None  # the projection at the current rate meets the SLO
    observed_ttft_p95_s: float | None  # measured over the last ``observed_window_s``
    observed_itl_p95_s: float | None  # over all token gaps of those requests
    observed_window_s: float | None
    observed_requests: int  # OK requests in that window
    observed_gaps: int  # token gaps in that window
    seconds_to_breach: float | None  # None: never (flat or falling) or beyond the horizon
    recommended_replicas: int | None  # None: unknown, or too uncertain to act on (see advice)
    actionable: bool  # the capacity band is narrow enough to size replicas with
    cost: CostFigures | None  # at the current rate
    cost_at_capacity: CostFigures | None
    fit: FitReport
    model_check: ModelCheck | None = None
    memory: MemoryReport | None = None
    recommendations: tuple[Recommendation, ...] = ()
    alternatives: tuple[Alternative, ...] = ()
    latency_curve: tuple[CurvePoint, ...] = ()
    engine: str | None = None  # the serving engine's profile (estimator.engines)
    load: LoadReport | None = None  # a simulated benchmark run (offline estimates)
    engines: tuple[EngineChoiceReport, ...] = ()  # every engine under that load, ranked

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def gauges(self) -> dict[str, float | None]:
        """Numeric figures to export as gauges, keyed by metric name (no prefix)."""
        t, c = self.traffic, self.cost
        return {
            "estimator_rate_requests_per_second": t.rate_5m_rps if t else None,
            "estimator_trend_requests_per_second_per_hour": t.trend_rps_per_hour if t else None,
            "estimator_forecast_peak_requests_per_second": t.forecast_peak_rps if t else None,
            "estimator_capacity_requests_per_second": self.capacity_rps,
            "estimator_utilization_ratio": self.utilization,
            "estimator_headroom_requests_per_second": self.headroom_rps,
            "estimator_projected_ttft_p95_seconds": self.projected_ttft_p95_s,
            "estimator_projected_itl_p95_seconds": self.projected_itl_p95_s,
            "estimator_time_to_breach_seconds": self.seconds_to_breach,
            "estimator_recommended_replicas": _f(self.recommended_replicas),
            "estimator_replicas": float(self.replicas),
            "estimator_cost_usd_per_hour": c.usd_per_hour if c else None,
            "estimator_cost_usd_per_1m_input_tokens": c.usd_per_1m_input_tokens if c else None,
            "estimator_cost_usd_per_1m_output_tokens": c.usd_per_1m_output_tokens if c else None,
            "estimator_cost_usd_per_request": c.usd_per_request if c else None,
            "estimator_fit_relative_error_p90": self.fit.rel_error_p90,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendReport:
    """One backend: what the proxy saw of it and what its engine reported."""

    backend: str
    models: tuple[str, ...]
    up: bool | None
    requests_observed: int
    rate_rps: float  # last 5 minutes
    observed_ttft_p95_s: float | None
    observed_itl_p95_s: float | None
    running: float | None
    waiting: float | None
    kv_usage: float | None
    kv_capacity_tokens: int | None
    prefix_cache_hit_ratio: float | None
    preemptions_per_s: float | None
    gpu_utilization: float | None  # mean over GPUs, 0..1
    gpu_memory_used_ratio: float | None
    snapshot_age_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def gauges(self) -> dict[str, float | None]:
        return {
            "estimator_backend_rate_requests_per_second": self.rate_rps,
            "estimator_backend_kv_capacity_tokens": _f(self.kv_capacity_tokens),
            "estimator_backend_prefix_cache_hit_ratio": self.prefix_cache_hit_ratio,
            "estimator_backend_preemptions_per_second": self.preemptions_per_s,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class SloReport:
    ttft_p95_s: float
    itl_p95_s: float
    quantile: float = 0.95
    definition: str = (
        "TTFT: arrival at the proxy to the first content-bearing chunk; ITL: every gap between "
        "streamed tokens, pooled over requests (not a percentile of per-request summaries)"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """Everything one ``Estimator.refresh`` produced."""

    generated_at: float  # wall-clock epoch seconds the projection is for
    slo: SloReport
    deployments: tuple[DeploymentReport, ...]
    backends: tuple[BackendReport, ...]
    refresh_seconds: float  # how long the refresh took
    records_dropped: int = 0  # records lost because refresh fell behind
    experiments: tuple[Any, ...] = ()  # estimator.verdict.Verdict per experiment and model

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def deployment(self, model: str) -> DeploymentReport | None:
        return next((d for d in self.deployments if d.model == model), None)

    def gauge_families(self) -> list[GaugeFamily]:
        """See :func:`gauge_families`."""
        return gauge_families(self)


GAUGE_DOCS: dict[str, str] = {
    "estimator_rate_requests_per_second": "Arrival rate over the last 5 minutes.",
    "estimator_trend_requests_per_second_per_hour": "Robust trend of the arrival rate (0 when "
    "not significant).",
    "estimator_forecast_peak_requests_per_second": "Forecast peak arrival rate over the horizon.",
    "estimator_capacity_requests_per_second": "Highest rate meeting the SLO, all replicas.",
    "estimator_utilization_ratio": "Current rate / capacity at the SLO.",
    "estimator_headroom_requests_per_second": "Capacity at the SLO minus the current rate.",
    "estimator_projected_ttft_p95_seconds": "Projected p95 TTFT at the current rate.",
    "estimator_projected_itl_p95_seconds": "Projected p95 inter-token latency (over all token "
    "gaps) at the current rate.",
    "estimator_time_to_breach_seconds": "Time until the forecast rate reaches capacity (absent: "
    "never within the horizon).",
    "estimator_recommended_replicas": "Replicas for the forecast peak within the SLO, N+1 "
    "(absent when capacity is too uncertain to act on).",
    "estimator_replicas": "Backends serving the model now.",
    "estimator_cost_usd_per_hour": "Cost of the deployment per hour.",
    "estimator_cost_usd_per_1m_input_tokens": "Cost per 1M prompt tokens at the current rate.",
    "estimator_cost_usd_per_1m_output_tokens": "Cost per 1M output tokens at the current rate.",
    "estimator_cost_usd_per_request": "Cost per request at the current rate.",
    "estimator_fit_relative_error_p90": "p90 relative error of the step-time model's fit.",
    "estimator_backend_rate_requests_per_second": "Arrival rate at the backend, last 5 minutes.",
    "estimator_backend_kv_capacity_tokens": "KV-cache capacity the engine reports.",
    "estimator_backend_prefix_cache_hit_ratio": "Prefix-cache hit ratio between the last scrapes.",
    "estimator_backend_preemptions_per_second": "Preemptions per second between the last scrapes.",
}

GaugeFamily = tuple[str, str, tuple[str, ...], list[tuple[tuple[str, ...], float]]]


def gauge_families(report: Report) -> list[GaugeFamily]:
    """``(name, doc, labelnames, [(labelvalues, value)])`` per gauge: deployments labelled by
    ``model``, backends by ``backend``; unknown values (None) give no sample, never -1."""
    rows: dict[str, GaugeFamily] = {}
    for labelname, items in (
        ("model", [(d.model, d.gauges()) for d in report.deployments]),
        ("backend", [(b.backend, b.gauges()) for b in report.backends]),
    ):
        for label, gauges in items:
            for name, value in gauges.items():
                row = rows.setdefault(name, (name, GAUGE_DOCS[name], (labelname,), []))
                if value is not None and math.isfinite(value):
                    row[3].append(((label,), float(value)))
    return list(rows.values())


def _f(v: int | None) -> float | None:
    return None if v is None else float(v)
