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
    usd_per_1m_tokens: float | None  # at the forecast peak rate
    usd_per_1m_input_tokens: float | None
    usd_per_1m_output_tokens: float | None
    current: bool = False  # the configuration running now
    uncertainty: Uncertainty | None = None  # on capacity_rps_per_replica
    assumptions: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()

    def label(self) -> str:
        return f"{self.replicas}x {self.gpus_per_replica}x{self.gpu} {self.quant}"


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


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficReport:
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
class DeploymentReport:
    """One model and the backends serving it."""

    model: str
    backends: tuple[str, ...]
    status: str  # "ok", "insufficient_data" or "error" (the projection failed; see notes)
    notes: tuple[str, ...]
    requests_observed: int
    gpu: str | None
    gpus_per_replica: int
    replicas: int  # backends serving it now
    traffic: TrafficReport | None
    capacity_rps: float | None  # all replicas, at the SLO
    utilization: float | None  # current rate / capacity
    headroom_rps: float | None
    projected_ttft_p95_s: float | None  # at the current rate
    projected_itl_p95_s: float | None
    observed_ttft_p95_s: float | None
    observed_itl_p95_s: float | None
    seconds_to_breach: float | None  # None: never (flat or falling) or beyond the horizon
    recommended_replicas: int | None
    cost: CostFigures | None  # at the current rate
    cost_at_capacity: CostFigures | None
    fit: FitReport
    recommendations: tuple[Recommendation, ...] = ()
    alternatives: tuple[Alternative, ...] = ()

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
    "estimator_projected_itl_p95_seconds": "Projected p95 inter-token latency at the current rate.",
    "estimator_time_to_breach_seconds": "Time until the forecast rate reaches capacity (absent: "
    "never within the horizon).",
    "estimator_recommended_replicas": "Replicas for the forecast peak within the SLO, N+1.",
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
