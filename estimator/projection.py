"""The projection: one pure function, ``project(inputs, cache) -> Projection``, behind every
figure rightsizer prints: the online report (``estimator.service``), ``rightsizer estimate``
(``estimator.cli``) and the benchmarks.

Inputs in, a report out: ``DeploymentInputs`` holds everything one pass reads (the traffic,
the measured latencies, the engine's exposed limits, the calibrated fit, the prior, the model
and GPU, the one ``EstimatorConfig``, ``now``); nothing else is read and nothing is written
but the caller's ``ProjectionCache`` (a memo of simulations keyed by their inputs in 2% bins:
it changes how fast a figure comes, never which). Headline, advice and alternatives of a
report all come from the same pass, so they cannot disagree: the current configuration's row
among the alternatives repeats the headline's capacity and replica count.

Steps:

1. step model: the calibrated fit when trusted, else the roofline prior (model config + GPU),
   else none: ``insufficient_data``, no capacity figures;
2. engine limits (``estimator.limits.engine_limits``): the engine's exposed KV blocks and
   ``max_num_seqs``, else the memory plan, else the engine profile's defaults for the GPU
   (``EstimatorConfig.engine``), with an unbounded KV cache when neither the engine nor a plan
   gives one (said in the notes); offline, a plan that does not fit is final
   (``does_not_fit``: alternatives, no capacity);
3. capacity at the SLO per replica (simulated); replicas: those serving now, or offline the
   recommended count (so the configuration shown is one that meets the SLO);
4. at the current rate per replica: projected p95 TTFT and ITL (over all token gaps), checked
   against the measured p95s of the same window (``ModelCheck``); utilization, time until the
   forecast reaches capacity, cost at the current rate and at capacity;
5. uncertainty: the capacity band is the fit's p90 error (an uncalibrated prior: +-50%),
   widened to the model's miss at the measured rate when the window holds enough data; a band
   wider than ``max_actionable_band`` gives a replica range, not a count;
6. advice and the ranked alternatives, from the same inputs;
7. offline, when asked (``DeploymentInputs.bench``): one replica under a benchmark load
   (Poisson at the offered rate per replica, ``concurrency N`` or ``burst N``:
   ``estimator.loads``), mean and percentiles with their bands, and every engine profile
   under the same load, ranked (``estimator.runtimes``).

Longer than the house's 400 lines: the inputs, the pass and its pieces are one unit, the only
place a figure of a report is computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from estimator import advisor
from estimator.calibrate import Calibration
from estimator.capacity import CapacityResult, latency_curve, max_rate_at_slo
from estimator.catalog import GpuSpec
from estimator.cost import CostFigures, cost_figures, deployment_usd_per_hour, token_times
from estimator.engine import StepModel
from estimator.engines import get_profile
from estimator.limits import assumed_limits
from estimator.limits import engine_limits as resolve_limits
from estimator.loads import Load, LoadResult, Stats, simulate_load
from estimator.memory import MemoryPlan, plan_memory
from estimator.modelarch import ModelArch
from estimator.records import BackendSnapshot
from estimator.report import (
    Alternative,
    CurvePoint,
    DeploymentReport,
    EngineChoiceReport,
    FitReport,
    LatencyStats,
    LoadReport,
    MemoryReport,
    ModelCheck,
    Recommendation,
    TrafficReport,
    Uncertainty,
)
from estimator.runtimes import EngineChoice, compare_engines
from estimator.settings import EstimatorConfig
from estimator.simulate import EngineLimits, SimResult, Workload, simulate
from estimator.traffic import Forecaster, TrafficProfile, TrafficStats

_UNBOUNDED_KV = 1 << 26
_BIN = math.log(1.02)
# a measured p95 judges the model only with 20+ samples above it: TTFT over 400 requests, ITL
# over 2000 gaps (fewer, and the sampling noise of the p95 alone reaches 20-50%)
_CHECK_MIN_REQUESTS = 400
_CHECK_MIN_GAPS = 2000
_WORKLOAD_SAMPLE = 2048
T = TypeVar("T")


# ---- inputs -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficInputs:
    """The traffic one pass projects: online from ``TrafficStats`` at ``now``, offline from a
    ``TrafficProfile``."""

    report: TrafficReport  # rates, windows, lengths, forecast (as printed)
    forecaster: Forecaster  # for the time until the forecast reaches capacity
    workload: Workload | None  # request shapes to simulate; None: no token counts yet
    total_tokens_p999: float | None  # prompt + output
    rate_long_rps: float  # over the longest window there is data for (at most an hour)
    rate_long_window_s: float | None


def traffic_from_stats(t: TrafficStats, now: float, horizon_s: float) -> TrafficInputs:
    """Online: the deployment's statistics as of ``now`` (rates never over more history than
    there is; the workload a fixed-seed sample of the recorded lengths, so a pass repeats)."""
    tr, f = t.trend(now), t.forecaster(now)
    prompt, output, total = t.lengths()
    history = max(0.0, now - t.first_epoch) if t.first_epoch is not None else 0.0
    rate, window = t.rate(300.0, now), min(300.0, max(1.0, history))
    workload = workload_of(t)
    report = TrafficReport(
        rate_rps=rate, rate_window_s=window, history_s=history, requests=t.count,
        description=f"{rate:.2f} req/s over the last {window:.0f} s, prompt p50 "
        f"{_num(prompt.p50)}, output p50 {_num(output.p50)} tokens",
        rate_1m_rps=t.rate(60.0, now), rate_5m_rps=rate, rate_1h_rps=t.rate(3600.0, now),
        trend_rps_per_hour=tr.effective_slope, trend_significant=tr.significant,
        forecast_peak_rps=f.peak(horizon_s), forecast_horizon_s=horizon_s,
        seasonal=f.profile is not None, prompt_tokens_p50=prompt.p50,
        prompt_tokens_p99=prompt.p99, output_tokens_p50=output.p50, output_tokens_p99=output.p99,
        cached_ratio=t.cached_ratio(), priority_mix=t.priority_mix(),
    )  # fmt: skip
    return TrafficInputs(
        report=report, forecaster=f,
        workload=workload, total_tokens_p999=total.p999, rate_long_rps=t.rate(3600.0, now),
        rate_long_window_s=min(3600.0, max(1.0, history)),
    )  # fmt: skip


def workload_of(t: TrafficStats) -> Workload | None:
    """A fixed-seed sample of the observed (prompt, output) lengths, kept paired."""
    p, o = t.sample(_WORKLOAD_SAMPLE, np.random.default_rng(0))
    return Workload(prompt_tokens=p, output_tokens=o) if p.size else None


def traffic_from_profile(p: TrafficProfile, now: float, horizon_s: float) -> TrafficInputs:
    """Offline: a profile (CLI text, or a request log: its lengths stay paired)."""
    w = workload_of_profile(p)
    f = Forecaster(now=now, level_rps=p.rate_rps, slope_rps_per_hour=p.trend_rps_per_hour)
    total = w.prompt_tokens + w.output_tokens
    q = np.quantile
    report = TrafficReport(
        rate_rps=p.rate_rps, rate_window_s=p.span_s, history_s=p.span_s, requests=p.requests,
        description=p.describe(), rate_1m_rps=p.rate_rps, rate_5m_rps=p.rate_rps,
        rate_1h_rps=p.rate_rps, trend_rps_per_hour=p.trend_rps_per_hour,
        trend_significant=p.trend_rps_per_hour != 0.0, forecast_peak_rps=f.peak(horizon_s),
        forecast_horizon_s=horizon_s, seasonal=False,
        prompt_tokens_p50=float(q(w.prompt_tokens, 0.5)),
        prompt_tokens_p99=float(q(w.prompt_tokens, 0.99)),
        output_tokens_p50=float(q(w.output_tokens, 0.5)),
        output_tokens_p99=float(q(w.output_tokens, 0.99)), cached_ratio=p.cached_ratio,
        priority_mix={},
    )  # fmt: skip
    return TrafficInputs(report=report, forecaster=f, workload=w,
                         total_tokens_p999=float(q(total, 0.999)), rate_long_rps=p.rate_rps,
                         rate_long_window_s=p.span_s)  # fmt: skip


def workload_of_profile(profile: TrafficProfile, *, n: int = 4096, seed: int = 0) -> Workload:
    """Paired lengths from a recorded log; independent draws from synthetic distributions."""
    p, o = profile.prompt, profile.output
    if p.values is not None and o.values is not None and p.values.size == o.values.size:
        return Workload(prompt_tokens=p.values, output_tokens=o.values)
    return Workload.from_distributions(p, o, n=n, seed=seed)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ObservedLatency:
    """What was measured over the last ``window_s``: TTFT over streamed OK requests, ITL over
    all their token gaps."""

    ttft_p95_s: float | None
    itl_p95_s: float | None
    window_s: float
    requests: int  # behind the TTFT p95
    gaps: int  # behind the ITL p95


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineObserved:
    """Engine settings the backends expose (scraped); None where none does."""

    max_num_seqs: int | None = None
    max_model_len: int | None = None
    kv_capacity_tokens: int | None = None
    block_size: int | None = None


def engine_observed(snaps: Iterable[BackendSnapshot]) -> EngineObserved:
    """The engine settings the serving backends' last scrapes expose (the first that does)."""
    snaps = list(snaps)
    kv = next((s for s in snaps if s.kv_capacity_tokens and s.block_size), None)
    return EngineObserved(
        max_num_seqs=next((s.max_num_seqs for s in snaps if s.max_num_seqs), None),
        max_model_len=next((s.max_model_len for s in snaps if s.max_model_len), None),
        kv_capacity_tokens=kv.kv_capacity_tokens if kv else None,
        block_size=kv.block_size if kv else None,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchRequest:
    """A simulated benchmark run to add to an offline report (module docstring, step 7)."""

    load: Load | None = None  # None: Poisson at the offered rate per replica
    compare_engines: bool = True  # also every engine profile under the same load
    max_requests: int = 12000  # simulated per run at most (a closed loop sends 4 per client)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentInputs:
    """Everything ``project`` reads (see the module docstring)."""

    model: str
    now: float  # wall-clock epoch seconds the projection is for
    config: EstimatorConfig
    catalog: Mapping[str, GpuSpec]
    arch: ModelArch | None
    arch_note: str | None = None  # why there is no architecture
    gpu: GpuSpec | None
    backends: tuple[str, ...] = ()
    replicas: int | None = None  # serving now; None: size it (offline)
    running: bool = True  # records show it serving; offline False
    requests_observed: int = 0
    traffic: TrafficInputs | None
    observed: ObservedLatency | None = None
    engine: EngineObserved = EngineObserved()
    calibration: Calibration | None = None
    prior: StepModel | None = None
    curve_points: int = 0  # simulated latency-vs-rate points for plots (offline)
    bench: BenchRequest | None = None  # a simulated benchmark run (offline)


# ---- outputs ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Basis:
    """The numbers behind a full report, for plots and benchmarks (not serialised)."""

    step: StepModel
    limits: EngineLimits
    workload: Workload
    capacity: CapacityResult
    plan: MemoryPlan | None


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Projection:
    report: DeploymentReport
    basis: Basis | None = None


class ProjectionCache:
    """Simulations of past passes keyed by their inputs in 2% bins, and the alternatives
    search's capacities; owned by the caller (one per deployment online, one per run offline)."""

    def __init__(self, size: int = 64, alternatives: int = 512) -> None:
        self._sims: dict[tuple[object, ...], object] = {}
        self.capacities: advisor.CapacityCache = {}
        self._size, self._alternatives = size, alternatives

    def get(self, key: tuple[object, ...], compute: Callable[[], T]) -> T:
        hit = self._sims.get(key)
        if hit is None:
            if len(self._sims) >= self._size:
                self._sims.clear()
            hit = self._sims[key] = compute()
        return hit  # type: ignore[return-value]

    def trim(self) -> None:
        if len(self.capacities) > self._alternatives:
            self.capacities.clear()


def _bins(*values: float) -> tuple[int, ...]:
    """Each value's 2%-wide logarithmic bin (zero and negatives share one bin)."""
    return tuple(round(math.log(v) / _BIN) if v > 0 else -(10**9) for v in values)


def _step_key(step: StepModel) -> tuple[int, ...]:
    return _bins(*step.coefficients(), step.jitter_sigma, step.drift_sigma, step.drift_tau_s)


# ---- pieces ---------------------------------------------------------------------------------
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
    engine: EngineObserved,
    plan: MemoryPlan | None,
    cfg: EstimatorConfig,
    hit: float,
    gpu: GpuSpec | None = None,
) -> tuple[EngineLimits, list[str]]:
    """What bounds batching: exposed by the engine, else planned, else the ``cfg.engine``
    profile's defaults for ``gpu`` (``estimator.limits.engine_limits``: vLLM's CPU build
    runs 128 sequences and 2048 batched tokens; TensorRT-LLM reserves each request's
    output); the notes say where the KV capacity came from."""
    hit = min(max(hit, 0.0), 0.95)
    seqs = engine.max_num_seqs or cfg.max_num_seqs
    exposed = engine.block_size if engine.kv_capacity_tokens and engine.block_size else None
    blocks = engine.kv_capacity_tokens // exposed if exposed and engine.kv_capacity_tokens else None
    usable = plan if plan is not None and plan.fits else None
    if gpu is not None and (blocks or usable is not None):
        r = resolve_limits(gpu, engine=cfg.engine, plan=usable, block_size=exposed,
                           num_blocks=blocks, max_num_seqs=seqs,
                           max_num_batched_tokens=cfg.max_num_batched_tokens,
                           prefix_cache_hit_ratio=hit)  # fmt: skip
        planned = r.origin["kv_capacity_tokens"] == "plan"
        return r.limits, ["KV capacity from the memory plan"] if planned else []
    d = assumed_limits(cfg.engine, gpu)  # the GPU type or the KV capacity is unknown
    m = seqs or d.max_num_seqs
    batched = max(cfg.max_num_batched_tokens or d.max_num_batched_tokens, m)
    reserve = get_profile(cfg.engine).scheduler == "guaranteed_no_evict"
    if blocks and exposed:
        return EngineLimits(max_num_seqs=m, kv_capacity_tokens=blocks * exposed,
                            block_size=exposed, max_num_batched_tokens=batched,
                            prefix_cache_hit_ratio=hit, reserve_output=reserve), []  # fmt: skip
    return EngineLimits(max_num_seqs=m, kv_capacity_tokens=_UNBOUNDED_KV,
                        max_num_batched_tokens=batched, prefix_cache_hit_ratio=hit,
                        reserve_output=reserve), [
        f"KV capacity unknown: assumed unbounded, max_num_seqs={m}"]  # fmt: skip


def fit_report(
    cal: Calibration | None, source: str, transfer: advisor.Transfer, *, has_prior: bool = False
) -> FitReport:
    """The fit's error and, with a calibration against an engine profile's prior
    (``has_prior``), how far the live engine is from that profile (``vs_prior``)."""
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
        vs_prior=_finite_values(cal.vs_prior()) if cal is not None and has_prior else None,
    )  # fmt: skip


def _finite_values(d: Mapping[str, float]) -> dict[str, float | None]:
    return {k: v if math.isfinite(v) else None for k, v in d.items()}


def transfer_of(cal: Calibration | None, source: str, prior: StepModel | None,
                workload: Workload) -> advisor.Transfer:  # fmt: skip
    """Observed/prior ratios the alternatives carry (none unless the fit is in use)."""
    if source != "calibrated" or cal is None:
        return advisor.Transfer()
    p90 = [e for e in (cal.ttft_p90_re, cal.itl_p90_re) if e is not None]
    err = max(p90) if p90 else None
    if prior is None:
        return advisor.Transfer(calibrated=True, rel_error=err)
    return advisor.transfer_from(cal.step, prior, workload, err)


def memory_report(plan: MemoryPlan, arch: ModelArch) -> MemoryReport:
    return MemoryReport(
        params=arch.total_params, active_params=arch.active_params,
        kv_bytes_per_token=plan.kv_bytes_per_token_per_gpu * plan.tp, gpus=plan.tp,
        memory_bytes_per_gpu=plan.memory_bytes, budget_bytes_per_gpu=plan.budget_bytes_per_gpu,
        weight_bytes_per_gpu=plan.weight_bytes_per_gpu,
        activation_bytes_per_gpu=plan.activation_bytes_per_gpu,
        cuda_graph_bytes_per_gpu=plan.cuda_graph_bytes_per_gpu,
        non_torch_bytes_per_gpu=plan.non_torch_bytes_per_gpu,
        kv_bytes_per_gpu=plan.kv_bytes_per_gpu, kv_capacity_tokens=plan.kv_capacity_tokens,
        num_blocks=plan.num_blocks, max_model_len=plan.max_model_len,
        max_num_seqs=plan.max_num_seqs, seqs_at_typical_context=plan.seqs_at_typical_context,
        fits=plan.fits, oom_risk=plan.oom_risk, reasons=plan.reasons,
    )  # fmt: skip


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# ---- the projection -----------------------------------------------------------------------
def project(inp: DeploymentInputs, cache: ProjectionCache | None = None) -> Projection:
    """The deployment's projection as of ``inp.now``; see the module docstring."""
    return _Pass(inp, cache if cache is not None else ProjectionCache()).run()


def failed(inp: DeploymentInputs, reason: str) -> DeploymentReport:
    """The report of a deployment whose projection raised: says why, invents nothing."""
    p = _Pass(inp, ProjectionCache())
    p.notes.insert(0, f"projection failed: {reason}")
    return p.empty("error", [])


class _Pass:
    """One projection: every figure of a report comes from this object's inputs."""

    def __init__(self, inp: DeploymentInputs, cache: ProjectionCache) -> None:
        self.inp, self.cfg, self.cache = inp, inp.config, cache
        self.notes: list[str] = [inp.arch_note] if inp.arch_note else []
        if inp.gpu is None:
            self.notes.append("GPU type unknown: set gpu or backend_gpus for cost and the prior")
        self.plan: MemoryPlan | None = None
        if inp.arch is not None and inp.gpu is not None:
            try:
                self.plan = plan_memory(
                    inp.arch, inp.gpu, tp=self.cfg.gpus_per_backend, quant=self.cfg.quant,
                    kv_dtype=self.cfg.kv_dtype,
                    gpu_memory_utilization=self.cfg.gpu_memory_utilization,
                    max_num_seqs=inp.engine.max_num_seqs or self.cfg.max_num_seqs,
                    max_num_batched_tokens=self.cfg.max_num_batched_tokens,
                    max_model_len=self.max_model_len(), engine=self.cfg.engine,
                    enforce_eager=self.cfg.enforce_eager)  # fmt: skip
            except ValueError as e:  # e.g. a TP degree the model cannot be split into
                self.notes.append(f"no memory plan: {e}")

    def max_model_len(self) -> int | None:
        return self.inp.engine.max_model_len or self.cfg.max_model_len

    def setup(self) -> advisor.Setup | None:
        if self.inp.gpu is None:
            return None
        return advisor.Setup(gpu=self.inp.gpu.key, gpus_per_replica=self.cfg.gpus_per_backend,
                             quant=self.cfg.quant, kv_dtype=self.cfg.kv_dtype)  # fmt: skip

    def run(self) -> Projection:
        inp, cfg, t = self.inp, self.cfg, self.inp.traffic
        if inp.running and inp.requests_observed < cfg.min_records:
            need = f"{inp.requests_observed} requests observed, {cfg.min_records} needed"
            return Projection(report=self.empty("insufficient_data", [need]))
        cal = inp.calibration
        step, source, step_notes = choose_step(cal, inp.prior, cfg.min_records)
        self.notes += step_notes
        if step is None or t is None or t.workload is None:
            why: list[str] = [] if step is None else ["no requests with token counts yet"]
            fit = fit_report(cal, source, advisor.Transfer(), has_prior=inp.prior is not None)
            return Projection(report=self.empty("insufficient_data", why, fit=fit))
        transfer = transfer_of(cal, source, inp.prior, t.workload)
        fit = fit_report(cal, source, transfer, has_prior=inp.prior is not None)
        if not inp.running and self.plan is not None and not self.plan.fits:
            self.notes += [f"does not fit: {r}" for r in self.plan.reasons]
            alts = self.alternatives(t, transfer, t.report.rate_rps, None)
            recs = [advisor.advise_oom(self.plan), *advisor.advise_alternatives(alts)]
            return Projection(report=self.empty(
                "does_not_fit", [], fit=fit, alternatives=alts,
                recommendations=[r for r in recs if r is not None],
                engines=self.engines(t, self.bench_load(t, None))))  # fmt: skip
        limits, lim_notes = engine_limits(inp.engine, self.plan, cfg, t.report.cached_ratio,
                                          inp.gpu)  # fmt: skip
        self.notes += lim_notes
        w = t.workload
        p90 = float(np.percentile(w.prompt_tokens, 90))
        key = ("capacity", *_step_key(step), *_bins(w.mean_prompt, w.mean_output, p90), limits,
               cfg.slo, cfg.sim_requests)  # fmt: skip
        cap = self.cache.get(
            key, lambda: max_rate_at_slo(step, limits, w, cfg.slo, n_requests=cfg.sim_requests)
        )
        basis = Basis(step=step, limits=limits, workload=w, capacity=cap, plan=self.plan)
        return Projection(report=self.full(t, basis, fit, transfer), basis=basis)

    # ---- the two shapes of a report --------------------------------------------------------
    def _common(self, replicas: int) -> dict[str, object]:
        inp, obs = self.inp, self.inp.observed
        return dict(
            model=inp.model, backends=inp.backends, requests_observed=inp.requests_observed,
            gpu=inp.gpu.key if inp.gpu else None, gpus_per_replica=self.cfg.gpus_per_backend,
            quant=self.cfg.quant, kv_dtype=self.cfg.kv_dtype, replicas=replicas,
            observed_ttft_p95_s=obs.ttft_p95_s if obs else None,
            observed_itl_p95_s=obs.itl_p95_s if obs else None,
            observed_window_s=obs.window_s if obs else None,
            observed_requests=obs.requests if obs else 0, observed_gaps=obs.gaps if obs else 0,
            memory=memory_report(self.plan, inp.arch) if self.plan and inp.arch else None,
            engine=self.cfg.engine,
        )  # fmt: skip

    def empty(
        self, status: str, notes: Sequence[str], *, fit: FitReport | None = None,
        alternatives: tuple[Alternative, ...] = (), recommendations: Sequence[Recommendation] = (),
        engines: tuple[EngineChoiceReport, ...] = (),
    ) -> DeploymentReport:  # fmt: skip
        replicas, traffic = self.inp.replicas or 1, self.inp.traffic
        cost = None
        if self.inp.gpu is not None:  # the price is known even when nothing else is
            usd = deployment_usd_per_hour(self.inp.gpu.price_per_hour, self.cfg.gpus_per_backend,
                                          replicas)  # fmt: skip
            w = traffic.workload if traffic is not None else None
            cost = cost_figures(usd_per_hour=usd,
                                rate_rps=traffic.report.rate_rps if traffic else 0.0,
                                mean_prompt_tokens=w.mean_prompt if w else 0.0,
                                mean_output_tokens=w.mean_output if w else 0.0,
                                at=self.rate_label())  # fmt: skip
        return DeploymentReport(
            **self._common(replicas), status=status, notes=(*self.notes, *notes),  # type: ignore[arg-type]
            traffic=traffic.report if traffic else None, capacity_rps=None,
            capacity_rps_per_replica=None, capacity_band=None, limiting=None, utilization=None,
            headroom_rps=None, projected_ttft_p95_s=None, projected_itl_p95_s=None,
            meets_slo_at_rate=None, seconds_to_breach=None, recommended_replicas=None,
            actionable=False, cost=cost, cost_at_capacity=None,
            fit=fit or FitReport(source="none", samples=0, rel_error_p50=None,
                                 rel_error_p90=None, trusted=False),
            recommendations=tuple(recommendations), alternatives=alternatives, engines=engines,
        )  # fmt: skip

    def full(self, t: TrafficInputs, b: Basis, fit: FitReport,
             transfer: advisor.Transfer) -> DeploymentReport:  # fmt: skip
        cfg, cap = self.cfg, b.capacity
        per = cap.per_replica_rps
        rate, peak = t.report.rate_rps, max(t.report.forecast_peak_rps, t.report.rate_rps)
        needed = advisor.needed_replicas(peak, per, cfg.spare_replicas) if per > 0 else None
        replicas = self.inp.replicas or needed or 1
        capacity = per * replicas
        at_rate = self.at_rate(b, rate / replicas) if rate > 0 else None
        check = self.check(at_rate, rate / replicas)
        misses = [abs(e) for e in _errors(check)] if check is not None else []
        band = max([transfer.band(), *misses])
        actionable = per > 0 and band <= cfg.max_actionable_band
        breach = t.forecaster.time_to_rate(capacity, cfg.breach_horizon_s) if per > 0 else 0.0
        cost, cost_cap = self.costs(b, replicas, rate, capacity)
        alts = self.alternatives(t, transfer, peak, cap)
        recs = self.advice(t, b, transfer, band, replicas, peak, alts)
        load = self.bench_load(t, replicas)
        bench = self.bench(b, load)
        return DeploymentReport(
            **self._common(replicas), status="ok", notes=tuple(self.notes),  # type: ignore[arg-type]
            traffic=t.report, capacity_rps=capacity, capacity_rps_per_replica=per,
            capacity_band=Uncertainty(low=capacity * max(0.0, 1 - band),
                                      high=capacity * (1 + band), rel_error=band,
                                      source=_band_source(transfer, check)),
            limiting=cap.limiting, utilization=rate / capacity if capacity > 0 else None,
            headroom_rps=capacity - rate,
            projected_ttft_p95_s=_finite(at_rate.ttft_q_s) if at_rate else None,
            projected_itl_p95_s=_finite(at_rate.itl_q_s) if at_rate else None,
            meets_slo_at_rate=cfg.slo.met_by(at_rate) if at_rate else None,
            seconds_to_breach=breach, recommended_replicas=needed if actionable else None,
            actionable=actionable, cost=cost, cost_at_capacity=cost_cap, fit=fit,
            model_check=check, recommendations=tuple(recs), alternatives=alts,
            latency_curve=self.curve(b, rate / replicas), load=bench,
            engines=self.engines(t, load),
        )  # fmt: skip

    # ---- figures ------------------------------------------------------------------------------
    def at_rate(self, b: Basis, per_replica_rps: float) -> SimResult:
        w, cfg = b.workload, self.cfg
        key = (
            "at_rate",
            *_step_key(b.step),
            *_bins(w.mean_prompt, w.mean_output, per_replica_rps),
            b.limits,
            cfg.sim_requests,
        )
        return self.cache.get(key, lambda: simulate(
            b.step, b.limits, w, per_replica_rps, n_requests=cfg.sim_requests,
            quantile=cfg.slo.quantile))  # fmt: skip

    def check(self, at_rate: SimResult | None, per_replica_rps: float) -> ModelCheck | None:
        obs = self.inp.observed
        if at_rate is None or obs is None:
            return None
        ttft = (
            _rel(at_rate.ttft_q_s, obs.ttft_p95_s) if obs.requests >= _CHECK_MIN_REQUESTS else None
        )
        itl = _rel(at_rate.itl_q_s, obs.itl_p95_s) if obs.gaps >= _CHECK_MIN_GAPS else None
        return ModelCheck(rate_rps=per_replica_rps, window_s=obs.window_s, ttft_error=ttft,
                          itl_error=itl, ttft_requests=obs.requests, itl_gaps=obs.gaps)  # fmt: skip

    def costs(self, b: Basis, replicas: int, rate: float,
              capacity: float) -> tuple[CostFigures | None, CostFigures | None]:  # fmt: skip
        gpu, w = self.inp.gpu, b.workload
        if gpu is None:
            return None, None
        usd = deployment_usd_per_hour(gpu.price_per_hour, self.cfg.gpus_per_backend, replicas)
        times = token_times(b.step, decode_batch=max(1, round(b.capacity.at_capacity.mean_running)),
                            mean_context=w.mean_prompt + w.mean_output / 2)  # fmt: skip
        cached, cap = b.limits.prefix_cache_hit_ratio, capacity if capacity > 0 else None

        def at(r: float, label: str) -> CostFigures:
            return cost_figures(usd_per_hour=usd, rate_rps=r, mean_prompt_tokens=w.mean_prompt,
                                mean_output_tokens=w.mean_output, times=times,
                                cached_ratio=cached, capacity_rps=cap, at=label)  # fmt: skip

        return at(rate, self.rate_label()), at(capacity, "capacity") if capacity > 0 else None

    def rate_label(self) -> str:
        """The rate a projection is about: measured online, given offline."""
        return "current rate" if self.inp.running else "offered rate"

    def curve(self, b: Basis, rate: float) -> tuple[CurvePoint, ...]:
        n = self.inp.curve_points
        if n <= 0:
            return ()
        top = max(b.capacity.per_replica_rps, rate, 0.05) * 1.3
        rates = [top * (k + 1) / n for k in range(n)]
        sims = latency_curve(b.step, b.limits, b.workload, rates, n_requests=self.cfg.sim_requests,
                             quantile=self.cfg.slo.quantile)  # fmt: skip
        return tuple(CurvePoint(rate_rps=s.rate_rps, ttft_p95_s=_finite(s.ttft_q_s),
                                itl_p95_s=_finite(s.itl_q_s), meets_slo=self.cfg.slo.met_by(s))
                     for s in sims)  # fmt: skip

    # ---- a benchmark run (offline) -----------------------------------------------------------
    def bench_load(self, t: TrafficInputs, replicas: int | None) -> Load | None:
        """The load asked for; else Poisson at the offered rate per replica (none unknown)."""
        req = self.inp.bench
        if req is None or req.load is not None:
            return req.load if req is not None else None
        rate = t.report.rate_rps / max(1, replicas or self.inp.replicas or 1)
        return Load.poisson(rate) if rate > 0 else None

    def bench_requests(self, load: Load) -> int:
        """A Poisson run or a closed loop: ``sim_requests``, at least 4 per client, capped."""
        cap = self.inp.bench.max_requests if self.inp.bench else 12000
        clients = int(load.value) if load.kind == "concurrency" else 0
        return max(1, min(max(self.cfg.sim_requests, 4 * clients), cap))

    def bench(self, b: Basis, load: Load | None) -> LoadReport | None:
        if load is None:
            return None
        r = simulate_load(b.step, b.limits, b.workload, load, n_requests=self.bench_requests(load))
        return load_report(r, self.cfg.engine)

    def engines(self, t: TrafficInputs, load: Load | None) -> tuple[EngineChoiceReport, ...]:
        """Every engine profile under the same deployment and load, ranked (offline)."""
        arch, gpu, req, cfg = self.inp.arch, self.inp.gpu, self.inp.bench, self.cfg
        if load is None or req is None or not req.compare_engines or t.workload is None:
            return ()
        if arch is None or gpu is None:
            return ()
        hit = min(max(t.report.cached_ratio, 0.0), 0.95)
        choices = compare_engines(
            arch, gpu, t.workload, load, tp=cfg.gpus_per_backend, quant=cfg.quant,
            kv_dtype=cfg.kv_dtype, max_model_len=self.max_model_len(),
            n_requests=self.bench_requests(load), max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            gpu_memory_utilization=cfg.gpu_memory_utilization, enforce_eager=cfg.enforce_eager,
            prefix_cache_hit_ratio=hit,
        )  # fmt: skip
        return tuple(engine_choice_report(c, current=c.engine == cfg.engine) for c in choices)

    # ---- advice -------------------------------------------------------------------------------
    def settings(self, peak: float, hit: float, t: TrafficInputs) -> advisor.SearchSettings:
        cfg = self.cfg
        mml = self.max_model_len()
        if mml is None and t.total_tokens_p999 is not None:  # what the traffic needs (advisor)
            mml = advisor.suggested_max_model_len(t.total_tokens_p999, self.inp.arch)
        return advisor.SearchSettings(
            slo=cfg.slo, peak_rps=peak, spare_replicas=cfg.spare_replicas, engine=cfg.engine,
            max_num_seqs=self.inp.engine.max_num_seqs or cfg.max_num_seqs, max_model_len=mml,
            max_num_batched_tokens=cfg.max_num_batched_tokens, enforce_eager=cfg.enforce_eager,
            gpu_memory_utilization=cfg.gpu_memory_utilization, prefix_cache_hit_ratio=hit,
            gpus=cfg.advisor_gpus, max_simulated=cfg.advisor_max_simulated,
            n_requests=cfg.sim_requests,
        )  # fmt: skip

    def alternatives(self, t: TrafficInputs, transfer: advisor.Transfer, peak: float,
                     cap: CapacityResult | None) -> tuple[Alternative, ...]:  # fmt: skip
        setup, arch = self.setup(), self.inp.arch
        if arch is None or setup is None or t.workload is None:
            return ()
        self.cache.trim()
        settings = self.settings(peak, min(t.report.cached_ratio, 0.95), t)
        return advisor.search(arch, self.inp.catalog, t.workload, settings, transfer,
                              current=setup, current_capacity=cap,
                              cache=self.cache.capacities)  # fmt: skip

    def advice(self, t: TrafficInputs, b: Basis, transfer: advisor.Transfer, band: float,
               replicas: int, peak: float,
               alts: Sequence[Alternative]) -> list[Recommendation]:  # fmt: skip
        cap, cfg = b.capacity, self.cfg
        obs = advisor.Observed(
            rate_rps=t.report.rate_rps, rate_long_rps=t.rate_long_rps, peak_rps=peak,
            total_tokens_p999=t.total_tokens_p999, replicas=replicas,
            max_num_seqs=b.limits.max_num_seqs, max_model_len=self.max_model_len(),
            kv_dtype=cfg.kv_dtype, rate_long_window_s=t.rate_long_window_s,
        )  # fmt: skip
        out: list[Recommendation | None] = []
        if cap.per_replica_rps > 0:
            out.append(advisor.advise_replicas(cap.per_replica_rps, obs, cfg.spare_replicas, band,
                                               max_band=cfg.max_actionable_band))  # fmt: skip
            out.append(advisor.advise_max_num_seqs(cap, self.plan, obs))
        else:
            sim = cap.at_capacity
            out.append(Recommendation(
                kind="slo_unreachable", severity="critical",
                message="this deployment misses the SLO even at a trickle of requests",
                numbers={"ttft_p95_s_low_rate": _finite(sim.ttft_q_s),
                         "itl_p95_s_low_rate": _finite(sim.itl_q_s), "limiting": cap.limiting},
            ))  # fmt: skip
        out.append(advisor.advise_max_model_len(obs, self.inp.arch))
        out.append(advisor.advise_kv_dtype(cap, self.fp8_kv(b, t, transfer, peak), obs))
        out.append(advisor.advise_oom(self.plan))
        out.append(advisor.advise_underused(cap.per_replica_rps * replicas, obs, band,
                                            spare=cfg.spare_replicas))  # fmt: skip
        return [r for r in out if r is not None] + advisor.advise_alternatives(alts)

    def fp8_kv(self, b: Basis, t: TrafficInputs, transfer: advisor.Transfer,
               peak: float) -> Alternative | None:  # fmt: skip
        setup, arch, gpu = self.setup(), self.inp.arch, self.inp.gpu
        kv_bound = b.capacity.limiting == "kv" or b.capacity.at_capacity.kv_bound
        if not kv_bound or arch is None or gpu is None or setup is None:
            return None
        settings = self.settings(peak, b.limits.prefix_cache_hit_ratio, t)
        cand = advisor.make_candidate(arch, gpu, advisor.with_kv_dtype(setup, "fp8"), settings,
                                      transfer)  # fmt: skip
        if not cand.plan.fits:
            return None
        w = b.workload
        key = ("fp8_kv", *_step_key(cand.step), *_bins(w.mean_prompt, w.mean_output), cand.limits,
               settings)  # fmt: skip
        cap = self.cache.get(
            key,
            lambda: max_rate_at_slo(
                cand.step, cand.limits, w, settings.slo, n_requests=settings.n_requests
            ),
        )
        return advisor.evaluate(cand, w, settings, transfer, capacity=cap)


def _stats(s: Stats) -> LatencyStats:
    return LatencyStats(mean=s.mean, p50=s.p50, p90=s.p90, p95=s.p95, p99=s.p99)


_BAND_SOURCE = (
    "10th-90th percentile of published / predicted on the validation rows of "
    "bench/data/published.yaml: an ~80% interval for the uncalibrated prior"
)


def load_report(r: LoadResult, engine: str) -> LoadReport:
    """A simulated run as the report carries it, each metric's band around its mean."""
    bands = {m: r.band(m) for m in ("throughput", "ttft", "itl", "e2e")}
    bands["tpot"] = r.band("itl", r.tpot.mean)  # a request's mean gap: ITL's band
    return LoadReport(
        engine=engine, load=r.load.describe(), kind=r.load.kind, value=r.load.value,
        requests=r.n_requests, counted=r.n_counted, ttft=_stats(r.ttft), itl=_stats(r.itl),
        tpot=_stats(r.tpot), e2e=_stats(r.e2e), output_tokens_per_s=r.output_tokens_per_s,
        requests_per_s=r.requests_per_s, input_tokens_per_s=r.input_tokens_per_s,
        mean_running=r.mean_running, peak_running=r.peak_running, preemptions=r.preemptions,
        bands=bands, band_source=_BAND_SOURCE,
    )  # fmt: skip


def engine_choice_report(c: EngineChoice, *, current: bool = False) -> EngineChoiceReport:
    r = c.result
    return EngineChoiceReport(
        rank=c.rank, engine=c.engine, title=c.title, fits=r is not None,
        output_tokens_per_s=r.output_tokens_per_s if r else None,
        ttft_mean_s=r.ttft.mean if r else None, ttft_p99_s=r.ttft.p99 if r else None,
        itl_mean_s=r.itl.mean if r else None, e2e_mean_s=r.e2e.mean if r else None,
        kv_capacity_tokens=c.plan.kv_capacity_tokens, validation=c.validation, current=current,
    )  # fmt: skip


def _rel(projected: float, observed: float | None) -> float | None:
    if observed is None or not observed > 0 or not math.isfinite(projected):
        return None
    return projected / observed - 1.0


def _errors(check: ModelCheck) -> list[float]:
    return [e for e in (check.ttft_error, check.itl_error) if e is not None]


def _band_source(transfer: advisor.Transfer, check: ModelCheck | None) -> str:
    base = ("calibration p90 relative error" if transfer.calibrated
            else "uncalibrated roofline prior (assumed)")  # fmt: skip
    if check is not None and any(abs(e) > transfer.band() for e in _errors(check)):
        return f"the model's miss of the p95s measured over the last {check.window_s:.0f} s"
    return base
