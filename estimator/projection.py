"""Per-deployment and per-backend state the Estimator keeps, and the projection from it.

Pure functions with ``now`` passed in; ``estimator.service`` owns the threads and the clock.
A deployment is one model and the backends that served it. The projection:

1. traffic: rates (1 min, 5 min, 1 h), trend, forecast peak over ``forecast_horizon_s``;
2. step model: the calibrated fit when trusted, else the roofline prior (model config + GPU),
   else none: the report says ``insufficient_data`` and gives no capacity figures;
3. engine limits: the backend's exposed ``num_gpu_blocks x block_size`` and ``max_num_seqs``,
   else the memory plan, else ``max_num_seqs`` with an unbounded KV cache (said in the notes);
4. capacity at the SLO per replica (simulated), latencies projected at the current rate per
   replica, time until the forecast reaches capacity, replicas for the peak (N+1), cost;
5. advice and, at most every ``advisor_interval_s``, the ranked alternatives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from estimator import advisor
from estimator.calibrate import Calibration, OnlineCalibrator
from estimator.capacity import CapacityResult, max_rate_at_slo
from estimator.catalog import GpuSpec
from estimator.cost import CostFigures, cost_figures, deployment_usd_per_hour, token_times
from estimator.engine import StepModel
from estimator.memory import MemoryPlan, plan_memory
from estimator.modelarch import ModelArch
from estimator.records import BackendSnapshot, Outcome, RequestRecord
from estimator.report import (
    Alternative,
    BackendReport,
    DeploymentReport,
    FitReport,
    Recommendation,
    TrafficReport,
)
from estimator.simulate import EngineLimits, SimResult, Workload, simulate
from estimator.traffic import ArrivalCounter, TrafficStats

if TYPE_CHECKING:
    from estimator.service import EstimatorConfig

_UNBOUNDED_KV = 1 << 26
_WORKLOAD_SAMPLE = 2048
_SIM_CACHE = 64
_BIN = math.log(1.02)


def _bins(*values: float) -> tuple[int, ...]:
    """Each value's 2%-wide logarithmic bin (zero and negatives share one bin)."""
    return tuple(round(math.log(v) / _BIN) if v > 0 else -(10**9) for v in values)


class LatencyRing:
    """Observed TTFT and per-request ITL p95 of OK requests, by arrival epoch (bounded)."""

    __slots__ = ("epoch", "itl", "n", "ttft")

    def __init__(self, size: int = 1 << 14) -> None:
        self.epoch = np.full(size, -np.inf)
        self.ttft = np.full(size, np.nan)
        self.itl = np.full(size, np.nan)
        self.n = 0

    def observe(self, r: RequestRecord) -> None:
        if r.outcome is not Outcome.OK:
            return
        i = self.n % self.epoch.size
        self.epoch[i] = r.arrival_epoch
        ttft = r.ttft_s
        self.ttft[i] = np.nan if ttft is None else ttft
        self.itl[i] = np.nan if r.itl.p95 is None else r.itl.p95
        self.n += 1

    def p95(self, now: float, window_s: float) -> tuple[float | None, float | None]:
        recent = self.epoch >= now - window_s
        return _nanp95(self.ttft[recent]), _nanp95(self.itl[recent])


def _nanp95(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return float(np.quantile(x, 0.95)) if x.size else None


class DeploymentState:
    """Everything kept about one model (mutated by the refresh thread only)."""

    def __init__(
        self, *, model: str, records: int, trend_window_s: float,
        calibrator: OnlineCalibrator, prior: StepModel | None,
    ) -> None:  # fmt: skip
        self.model = model
        self.traffic = TrafficStats(records, trend_window_s=trend_window_s)
        self.latency = LatencyRing()
        self.calibrator = calibrator
        self.prior = prior
        self.backends: set[str] = set()
        self.cache: advisor.CapacityCache = {}
        # simulations of the running configuration, keyed by their inputs in 2% bins, so a
        # refresh that sees the same traffic and fit does not simulate again
        self.sims: dict[tuple[object, ...], CapacityResult | SimResult] = {}
        self.alternatives: tuple[Alternative, ...] = ()
        self.alternatives_at: float | None = None

    def remember(self, key: tuple[object, ...], result: CapacityResult | SimResult) -> None:
        if len(self.sims) >= _SIM_CACHE:
            self.sims.clear()
        self.sims[key] = result

    def observe(self, r: RequestRecord) -> None:
        self.traffic.observe(r)
        self.latency.observe(r)
        self.calibrator.observe(r)
        if r.backend is not None:
            self.backends.add(r.backend)


class BackendState:
    """Requests seen on one backend and its last two snapshots."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.arrivals = ArrivalCounter()
        self.latency = LatencyRing(4096)
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


def backend_report(b: BackendState, *, now: float, window_s: float) -> BackendReport:
    s, p = b.last, b.prev
    ttft, itl = b.latency.p95(now, window_s)
    hit = None
    preempt = None
    if s is not None:
        hit = _hit_ratio(s, p)
        if p is not None and s.preemptions is not None and p.preemptions is not None:
            dt = s.time_s - p.time_s
            preempt = max(0.0, s.preemptions - p.preemptions) / dt if dt > 0 else None
    gpus = s.gpus if s is not None else ()
    util = [g.utilization for g in gpus if g.utilization is not None]
    mem = [g.memory_used_bytes / g.memory_total_bytes for g in gpus
           if g.memory_used_bytes is not None and g.memory_total_bytes]  # fmt: skip
    return BackendReport(
        backend=b.name, models=tuple(sorted(b.models)), up=s.up if s is not None else None,
        requests_observed=b.arrivals.count, rate_rps=b.arrivals.rate(300.0, now),
        observed_ttft_p95_s=ttft, observed_itl_p95_s=itl,
        running=s.running if s else None, waiting=s.waiting if s else None,
        kv_usage=s.kv_usage if s else None,
        kv_capacity_tokens=s.kv_capacity_tokens if s else None,
        prefix_cache_hit_ratio=hit, preemptions_per_s=preempt,
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


def traffic_report(t: TrafficStats, now: float, horizon_s: float) -> TrafficReport:
    tr = t.trend(now)
    f = t.forecaster(now)
    prompt, output, _ = t.lengths()
    return TrafficReport(
        rate_1m_rps=t.rate(60.0, now), rate_5m_rps=t.rate(300.0, now),
        rate_1h_rps=t.rate(3600.0, now), trend_rps_per_hour=tr.effective_slope,
        trend_significant=tr.significant, forecast_peak_rps=f.peak(horizon_s),
        forecast_horizon_s=horizon_s, seasonal=f.profile is not None,
        prompt_tokens_p50=prompt.p50, prompt_tokens_p99=prompt.p99,
        output_tokens_p50=output.p50, output_tokens_p99=output.p99,
        cached_ratio=t.cached_ratio(), priority_mix=t.priority_mix(),
    )  # fmt: skip


def choose_step(
    cal: Calibration | None, prior: StepModel | None, min_records: int
) -> tuple[StepModel | None, str, list[str]]:
    """(step model, source, notes): trusted fit, else prior, else none."""
    if cal is not None and cal.trusted:
        return cal.step, "calibrated", []
    notes = []
    if cal is not None:
        notes.append(f"calibration not trusted yet ({cal.n_records} usable records, "
                     f"TTFT error p50 {_pct(cal.ttft_mare)}, "
                     f"ITL error p50 {_pct(cal.itl_mare)})")  # fmt: skip
    if prior is not None:
        return prior, "prior", [*notes, "using the roofline prior (uncalibrated)"]
    return None, "none", [*notes, "no step model: give a model config and a GPU key, or wait "
                          f"for {min_records}+ streamed requests with token counts"]  # fmt: skip


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def engine_limits(
    snaps: Sequence[BackendSnapshot], plan: MemoryPlan | None, cfg: EstimatorConfig, hit: float
) -> tuple[EngineLimits, list[str]]:
    hit = min(max(hit, 0.0), 0.95)
    seqs = next((s.max_num_seqs for s in snaps if s.max_num_seqs), None)
    for s in snaps:
        kv = s.kv_capacity_tokens
        if kv and s.block_size:
            m = seqs or cfg.max_num_seqs
            return EngineLimits(max_num_seqs=m, kv_capacity_tokens=kv, block_size=s.block_size,
                                max_num_batched_tokens=max(8192, m),
                                prefix_cache_hit_ratio=hit), []  # fmt: skip
    if plan is not None and plan.fits:
        m = seqs or plan.max_num_seqs
        limits = EngineLimits(max_num_seqs=m,
                              kv_capacity_tokens=max(plan.kv_capacity_tokens, plan.block_size),
                              block_size=plan.block_size,
                              max_num_batched_tokens=max(plan.max_num_batched_tokens, m),
                              prefix_cache_hit_ratio=hit)  # fmt: skip
        return limits, ["KV capacity from the memory plan"]
    m = seqs or cfg.max_num_seqs
    return EngineLimits(max_num_seqs=m, kv_capacity_tokens=_UNBOUNDED_KV,
                        max_num_batched_tokens=max(8192, m), prefix_cache_hit_ratio=hit), [
        f"KV capacity unknown: assumed unbounded, max_num_seqs={m}"]  # fmt: skip


def workload_of(t: TrafficStats) -> Workload | None:
    p, o = t.sample(_WORKLOAD_SAMPLE, np.random.default_rng(0))
    return Workload(prompt_tokens=p, output_tokens=o) if p.size else None


def fit_report(cal: Calibration | None, source: str, transfer: advisor.Transfer) -> FitReport:
    p50 = [e for e in (cal.ttft_mare, cal.itl_mare) if e is not None] if cal else []
    p90 = [e for e in (cal.ttft_p90_re, cal.itl_p90_re) if e is not None] if cal else []
    return FitReport(
        source=source, samples=cal.n_records if cal else 0,
        rel_error_p50=max(p50) if p50 else None, rel_error_p90=max(p90) if p90 else None,
        trusted=bool(cal and cal.trusted),
        scale_vs_prior=transfer.decode if transfer.calibrated and transfer.has_prior else None,
        step_jitter_sigma=cal.step.jitter_sigma if cal else None,
        step_drift_sigma=cal.step.drift_sigma if cal else None,
        step_drift_tau_s=cal.step.drift_tau_s if cal else None,
    )  # fmt: skip


def _transfer(cal: Calibration | None, source: str, prior: StepModel | None,
              workload: Workload) -> advisor.Transfer:  # fmt: skip
    if source != "calibrated" or cal is None:
        return advisor.Transfer()
    p90 = [e for e in (cal.ttft_p90_re, cal.itl_p90_re) if e is not None]
    err = max(p90) if p90 else None
    if prior is None:
        return advisor.Transfer(calibrated=True, rel_error=err)
    return advisor.transfer_from(cal.step, prior, workload, err)


def _costs(
    gpu: GpuSpec | None, cfg: EstimatorConfig, replicas: int, rate: float, capacity: float,
    workload: Workload, step: StepModel, cap: CapacityResult, cached: float,
) -> tuple[CostFigures | None, CostFigures | None]:  # fmt: skip
    if gpu is None:
        return None, None
    usd = deployment_usd_per_hour(gpu.price_per_hour, cfg.gpus_per_backend, replicas)
    times = token_times(step, decode_batch=max(1, round(cap.at_capacity.mean_running)),
                        mean_context=workload.mean_prompt + workload.mean_output / 2)  # fmt: skip
    kw = dict(usd_per_hour=usd, mean_prompt_tokens=workload.mean_prompt,
              mean_output_tokens=workload.mean_output, times=times, cached_ratio=cached,
              capacity_rps=capacity if capacity > 0 else None)  # fmt: skip
    return cost_figures(rate_rps=rate, **kw), (  # type: ignore[arg-type]
        cost_figures(rate_rps=capacity, **kw) if capacity > 0 else None  # type: ignore[arg-type]
    )


def failed(
    dep: DeploymentState, *, config: EstimatorConfig, gpu: GpuSpec | None,
    backends: Sequence[str], now: float, reason: str,
) -> DeploymentReport:  # fmt: skip
    """The report of a deployment whose projection raised: says why, invents nothing."""
    names = tuple(backends) or tuple(sorted(dep.backends))
    return _Base(dep, config, gpu, names, now).empty("error", [f"projection failed: {reason}"])


def project(
    dep: DeploymentState, *, config: EstimatorConfig, arch: ModelArch | str, gpu: GpuSpec | None,
    catalog: Mapping[str, GpuSpec], snapshots: Sequence[BackendSnapshot], now: float,
    backends: Sequence[str] = (),
) -> DeploymentReport:  # fmt: skip
    """The deployment's projection as of ``now``; ``backends``: those serving it now (each a
    replica; default: every backend it was seen on). See the module docstring."""
    cfg, t = config, dep.traffic
    names = tuple(backends) or tuple(sorted(dep.backends))
    replicas = max(1, len(names))
    notes = [arch] if isinstance(arch, str) else []
    if gpu is None:
        notes.append("GPU type unknown: set gpu or backend_gpus for cost and the prior")
    base = _Base(dep, cfg, gpu, names, now)
    if t.count < cfg.min_records:
        why = f"{t.count} requests observed, {cfg.min_records} needed"
        return base.empty("insufficient_data", [*notes, why])
    traffic = traffic_report(t, now, cfg.forecast_horizon_s)
    seqs = next((s.max_num_seqs for s in snapshots if s.max_num_seqs), None)
    # the engine's max_num_seqs as the limits below take it (vLLM does not expose it: the config)
    m = seqs or cfg.max_num_seqs
    cal = dep.calibrator.fit(max_num_seqs=m) if len(dep.calibrator) else None
    step, source, step_notes = choose_step(cal, dep.prior, cfg.min_records)
    workload = workload_of(t)
    if step is None or workload is None:
        why = step_notes if step is None else ["no requests with token counts yet"]
        return base.empty("insufficient_data", [*notes, *why], traffic=traffic,
                          fit=fit_report(cal, source, advisor.Transfer()))  # fmt: skip
    transfer = _transfer(cal, source, dep.prior, workload)
    model = arch if isinstance(arch, ModelArch) else None
    plan = None
    if model is not None and gpu is not None:
        plan = plan_memory(model, gpu, tp=cfg.gpus_per_backend, quant=cfg.quant,
                           kv_dtype=cfg.kv_dtype,
                           gpu_memory_utilization=cfg.gpu_memory_utilization,
                           max_num_seqs=seqs or cfg.max_num_seqs,
                           max_model_len=cfg.max_model_len)  # fmt: skip
    limits, lim_notes = engine_limits(snapshots, plan, cfg, t.cached_ratio())
    p90 = float(np.percentile(workload.prompt_tokens, 90))
    key = ("capacity", *_bins(*step.coefficients(), step.jitter_sigma, step.drift_sigma,
                              step.drift_tau_s, workload.mean_prompt,
                              workload.mean_output, p90), limits, cfg.slo)  # fmt: skip
    cap = dep.sims.get(key)
    if not isinstance(cap, CapacityResult):
        cap = max_rate_at_slo(step, limits, workload, cfg.slo, n_requests=cfg.sim_requests)
        dep.remember(key, cap)
    ctx = _Ctx(dep=dep, cfg=cfg, model=model, gpu=gpu, catalog=catalog, workload=workload,
               limits=limits, plan=plan, cap=cap, transfer=transfer, traffic=traffic,
               replicas=replicas, now=now, snapshots=snapshots)  # fmt: skip
    return base.full(ctx, step, fit_report(cal, source, transfer),
                     [*notes, *step_notes, *lim_notes])  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class _Ctx:
    """What a full projection works from."""

    dep: DeploymentState
    cfg: EstimatorConfig
    model: ModelArch | None
    gpu: GpuSpec | None
    catalog: Mapping[str, GpuSpec]
    workload: Workload
    limits: EngineLimits
    plan: MemoryPlan | None
    cap: CapacityResult
    transfer: advisor.Transfer
    traffic: TrafficReport
    replicas: int
    now: float
    snapshots: Sequence[BackendSnapshot]

    def setup(self) -> advisor.Setup | None:
        if self.gpu is None:
            return None
        return advisor.Setup(gpu=self.gpu.key, gpus_per_replica=self.cfg.gpus_per_backend,
                             quant=self.cfg.quant, kv_dtype=self.cfg.kv_dtype)  # fmt: skip

    def settings(self, peak: float) -> advisor.SearchSettings:
        cfg = self.cfg
        return advisor.SearchSettings(
            slo=cfg.slo, peak_rps=peak, spare_replicas=cfg.spare_replicas,
            max_num_seqs=self.limits.max_num_seqs, max_model_len=self.max_model_len_for_search(),
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            prefix_cache_hit_ratio=self.limits.prefix_cache_hit_ratio, gpus=cfg.advisor_gpus,
            max_simulated=cfg.advisor_max_simulated, n_requests=cfg.sim_requests,
        )  # fmt: skip

    def max_model_len(self) -> int | None:
        exposed = next((s.max_model_len for s in self.snapshots if s.max_model_len), None)
        return exposed or self.cfg.max_model_len

    def max_model_len_for_search(self) -> int | None:
        """The running setting, else what the traffic needs (see ``estimator.advisor``)."""
        p999 = self.dep.traffic.lengths()[2].p999
        if self.max_model_len() or p999 is None:
            return self.max_model_len()
        return advisor.suggested_max_model_len(p999, self.model)


class _Base:
    """The fields every deployment report has, and its two shapes (empty and full)."""

    def __init__(self, dep: DeploymentState, cfg: EstimatorConfig, gpu: GpuSpec | None,
                 backends: tuple[str, ...], now: float) -> None:  # fmt: skip
        self.dep, self.cfg, self.gpu, self.backends = dep, cfg, gpu, backends
        self.replicas = max(1, len(backends))
        self.observed = dep.latency.p95(now, cfg.latency_window_s)

    def _common(self) -> dict[str, object]:
        return dict(model=self.dep.model, backends=self.backends,
                    requests_observed=self.dep.traffic.count,
                    gpu=self.gpu.key if self.gpu else None,
                    gpus_per_replica=self.cfg.gpus_per_backend, replicas=self.replicas,
                    observed_ttft_p95_s=self.observed[0],
                    observed_itl_p95_s=self.observed[1])  # fmt: skip

    def empty(self, status: str, notes: Sequence[str], *, traffic: TrafficReport | None = None,
              fit: FitReport | None = None) -> DeploymentReport:  # fmt: skip
        cost = None
        if self.gpu is not None:
            usd = deployment_usd_per_hour(self.gpu.price_per_hour, self.cfg.gpus_per_backend,
                                          self.replicas)  # fmt: skip
            prompt, output, _ = self.dep.traffic.lengths()
            cost = cost_figures(usd_per_hour=usd, rate_rps=traffic.rate_5m_rps if traffic else 0.0,
                                mean_prompt_tokens=prompt.mean or 0.0,
                                mean_output_tokens=output.mean or 0.0)  # fmt: skip
        return DeploymentReport(
            **self._common(), status=status, notes=tuple(notes), traffic=traffic,  # type: ignore[arg-type]
            capacity_rps=None, utilization=None, headroom_rps=None, projected_ttft_p95_s=None,
            projected_itl_p95_s=None, seconds_to_breach=None, recommended_replicas=None,
            cost=cost, cost_at_capacity=None,
            fit=fit or FitReport(source="none", samples=0, rel_error_p50=None,
                                 rel_error_p90=None, trusted=False),
        )  # fmt: skip

    def full(
        self, c: _Ctx, step: StepModel, fit: FitReport, notes: Sequence[str]
    ) -> DeploymentReport:
        cfg, per = self.cfg, c.cap.per_replica_rps
        capacity = per * c.replicas
        rate = c.traffic.rate_5m_rps
        at_rate: SimResult | None = None
        if rate > 0:
            w = c.workload
            key = ("at_rate", *_bins(*step.coefficients(), step.jitter_sigma, step.drift_sigma,
                                     step.drift_tau_s, w.mean_prompt,
                                     w.mean_output, rate / c.replicas), c.limits)  # fmt: skip
            hit = c.dep.sims.get(key)
            at_rate = hit if isinstance(hit, SimResult) else None
            if at_rate is None:
                at_rate = simulate(step, c.limits, w, rate / c.replicas,
                                   n_requests=cfg.sim_requests,
                                   quantile=cfg.slo.quantile)  # fmt: skip
                c.dep.remember(key, at_rate)
        forecaster = c.dep.traffic.forecaster(c.now)
        breach = forecaster.time_to_rate(capacity, cfg.breach_horizon_s) if capacity > 0 else 0.0
        peak = max(c.traffic.forecast_peak_rps, rate)
        recommended = None
        if per > 0:
            recommended = max(1, math.ceil(peak / per - 1e-9)) + cfg.spare_replicas
        cost, cost_cap = _costs(c.gpu, cfg, c.replicas, rate, capacity, c.workload, step, c.cap,
                                c.limits.prefix_cache_hit_ratio)  # fmt: skip
        alts = _alternatives(c, peak)
        return DeploymentReport(
            **self._common(), status="ok", notes=tuple(notes), traffic=c.traffic,  # type: ignore[arg-type]
            capacity_rps=capacity, utilization=rate / capacity if capacity > 0 else None,
            headroom_rps=capacity - rate,
            projected_ttft_p95_s=_finite(at_rate.ttft_q_s) if at_rate else None,
            projected_itl_p95_s=_finite(at_rate.itl_q_s) if at_rate else None,
            seconds_to_breach=breach, recommended_replicas=recommended, cost=cost,
            cost_at_capacity=cost_cap, fit=fit,
            recommendations=tuple(_advice(c, capacity, peak, alts)), alternatives=alts,
        )  # fmt: skip


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _alternatives(c: _Ctx, peak: float) -> tuple[Alternative, ...]:
    dep, setup = c.dep, c.setup()
    if c.model is None or setup is None:
        return ()
    due = dep.alternatives_at is None or c.now - dep.alternatives_at >= c.cfg.advisor_interval_s
    if due:
        if len(dep.cache) > 512:
            dep.cache.clear()
        dep.alternatives = advisor.search(c.model, c.catalog, c.workload, c.settings(peak),
                                          c.transfer, current=setup, cache=dep.cache)  # fmt: skip
        dep.alternatives_at = c.now
    return dep.alternatives


def _advice(c: _Ctx, capacity: float, peak: float,
            alts: Sequence[Alternative]) -> list[Recommendation]:  # fmt: skip
    cap, band = c.cap, c.transfer.band()
    obs = advisor.Observed(
        rate_rps=c.traffic.rate_5m_rps, rate_1h_rps=c.traffic.rate_1h_rps, peak_rps=peak,
        total_tokens_p999=c.dep.traffic.lengths()[2].p999, replicas=c.replicas,
        max_num_seqs=c.limits.max_num_seqs, max_model_len=c.max_model_len(),
        kv_dtype=c.cfg.kv_dtype,
    )  # fmt: skip
    out: list[Recommendation | None] = []
    if cap.per_replica_rps > 0:
        out.append(advisor.advise_replicas(cap.per_replica_rps, obs, c.cfg.spare_replicas, band))
        out.append(advisor.advise_max_num_seqs(cap, c.plan, obs))
    else:
        sim = cap.at_capacity
        out.append(Recommendation(
            kind="slo_unreachable", severity="critical",
            message="this deployment misses the SLO even at a trickle of requests",
            numbers={"ttft_p95_s_low_rate": _finite(sim.ttft_q_s),
                     "itl_p95_s_low_rate": _finite(sim.itl_q_s), "limiting": cap.limiting},
        ))  # fmt: skip
    out.append(advisor.advise_max_model_len(obs, c.model))
    out.append(advisor.advise_kv_dtype(cap, _fp8_kv(c, peak), obs))
    out.append(advisor.advise_oom(c.plan))
    out.append(advisor.advise_underused(capacity, obs, band))
    return [r for r in out if r is not None] + advisor.advise_alternatives(alts)


def _fp8_kv(c: _Ctx, peak: float) -> Alternative | None:
    setup = c.setup()
    kv_bound = c.cap.limiting == "kv" or c.cap.at_capacity.kv_bound
    if not kv_bound or c.model is None or c.gpu is None or setup is None:
        return None
    settings = c.settings(peak)
    cand = advisor.make_candidate(c.model, c.gpu, advisor.with_kv_dtype(setup, "fp8"), settings,
                                  c.transfer)  # fmt: skip
    return advisor.evaluate(cand, c.workload, settings, c.transfer) if cand.plan.fits else None
