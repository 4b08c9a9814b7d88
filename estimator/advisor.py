"""Right-sizing: ranked deployment alternatives and engine-setting advice, with reasons.

Search space: GPU type (the catalog; ``generic`` CPU entries only when asked for) x GPUs per
replica (tensor parallel 1, 2, 4, 8 within ``max_per_node``) x weight format (bf16; fp8 where
the GPU computes fp8; int8 W8A8 where it has int8 tensor cores; int4 AWQ/GPTQ) x replicas.
For each configuration:

1. memory plan (``estimator.memory.plan_memory``): skipped when the weights do not fit;
2. step model: the roofline prior of that configuration under the serving engine's profile
   (``SearchSettings.engine``; limits from ``estimator.limits.engine_limits``) times the
   **transfer ratios** observed/prior measured on the running GPU (``Transfer``): when live
   calibration says the engine is 1.3x slower at decode than its prior predicts, every
   alternative's decode is assumed 1.3x slower than its own prior too (software overheads
   and achieved efficiency carry over between GPUs better than absolute times do). Decode
   (overhead, per sequence, KV) is scaled by the ratio of a batch-8 decode step at the mean
   context in those three coefficients; prefill per token by the ratio that makes the scaled
   prior reproduce the calibrated ``ttft_idle(mean prompt)`` on the running GPU; each clipped
   to [0.1, 10]. The prior's other terms (prefill attention, MoE expert streaming, the API
   server's per-request cost and queue) are kept as they are;
3. screening without simulation: an idle engine already missing the SLO (``ttft_idle`` or
   ``itl_at(1)`` over target) cannot meet it (listed as not meeting the SLO, with the reason);
   the rest are ordered by an analytic cost estimate
   (``saturation_rate`` at 60%) and at most ``max_simulated`` of them are simulated, the
   current configuration always among them; only the smallest two TPs that fit are kept
   per (GPU, format);
4. capacity at the SLO per replica (``estimator.capacity.max_rate_at_slo``), replicas for the
   forecast peak plus ``spare_replicas`` (N+1), cost at the peak rate.

Callers pass the engine settings the alternatives assume; the service and the CLI use the
running ``max_model_len`` when one is set, else ``suggested_max_model_len`` (p99.9 of prompt +
output, rounded up), not the model's maximum, which would rule out most smaller GPUs.

Ranking: configurations meeting the SLO first, then $/hour, then the weight format with the
least quality risk (bf16, fp8, int8, int4), then $/1M tokens. Uncertainty on
capacity: +- the calibration's p90 relative error when calibrated, else +-
``PRIOR_REL_ERROR`` (an uncalibrated roofline prior).

The second half (``advise_*``) turns a capacity result and observed traffic into
``Recommendation``s; the service and the CLI share it. Together about 500 lines, past the
house's 400: search and advice read the same candidates and bands.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from estimator.capacity import CapacityResult, Slo, max_rate_at_slo, saturation_rate
from estimator.catalog import GpuSpec
from estimator.cost import HOURS_PER_MONTH, cost_figures, deployment_usd_per_hour, token_times
from estimator.engine import StepModel, roofline_prior
from estimator.engines import DEFAULT_ENGINE
from estimator.limits import engine_limits
from estimator.memory import MemoryPlan, plan_memory
from estimator.modelarch import ModelArch
from estimator.report import Alternative, Recommendation, Uncertainty
from estimator.simulate import EngineLimits, Workload

QUANTS: tuple[str, ...] = ("bf16", "fp8", "int8", "int4")
TPS: tuple[int, ...] = (1, 2, 4, 8)
PRIOR_REL_ERROR = 0.5
_RATIO_CLIP = (0.1, 10.0)
_DECODE_PROBE_BATCH = 8
_SCREEN_FRACTION = 0.6


@dataclass(frozen=True, slots=True, kw_only=True)
class Setup:
    """One deployment shape (per replica)."""

    gpu: str
    gpus_per_replica: int = 1
    quant: str = "bf16"
    kv_dtype: str = "auto"

    def key(self) -> tuple[str, int, str, str]:
        return (self.gpu, self.gpus_per_replica, self.quant, self.kv_dtype)


@dataclass(frozen=True, slots=True, kw_only=True)
class Transfer:
    """Observed/prior step-time ratios carried from the calibrated GPU to any other."""

    prefill: float = 1.0
    decode: float = 1.0
    calibrated: bool = False
    rel_error: float | None = None  # p90 relative error of the calibrated fit
    has_prior: bool = False  # the ratios were measured against a roofline prior

    def apply(self, prior: StepModel) -> StepModel:
        """``prior`` with its four fitted coefficients scaled; every other term kept."""
        return replace(
            prior,
            overhead_s=prior.overhead_s * self.decode,
            prefill_s_per_token=prior.prefill_s_per_token * self.prefill,
            decode_s_per_seq=prior.decode_s_per_seq * self.decode,
            kv_s_per_token=prior.kv_s_per_token * self.decode,
        )

    def band(self) -> float:
        return self.rel_error if self.rel_error is not None else PRIOR_REL_ERROR


def transfer_from(
    calibrated: StepModel, prior: StepModel, workload: Workload, rel_error: float | None
) -> Transfer:
    """Ratios calibrated/prior at the workload's typical prompt and context (module doc)."""
    lo, hi = _RATIO_CLIP
    prompt = max(1, round(workload.mean_prompt))
    ctx = workload.mean_prompt + workload.mean_output / 2
    dec = _scaled_decode(calibrated, ctx) / max(_scaled_decode(prior, ctx), 1e-12)
    dec = min(max(dec, lo), hi)
    # the prefill ratio makes the moved prior reproduce the calibrated ttft_idle(prompt) on
    # this GPU, given that its per-step overhead already moved with the decode ratio and that
    # its other terms (attention, MoE, the API server's cost) stay as they are
    overhead = prior.ttft_alone(prompt) - prior.prefill_s_per_token * prompt
    kept = prior.ttft_idle(prompt) - prior.ttft_alone(prompt)
    pre = (calibrated.ttft_idle(prompt) - kept - dec * overhead) / max(
        prior.prefill_s_per_token * prompt, 1e-12
    )
    return Transfer(prefill=min(max(pre, lo), hi), decode=min(max(dec, lo), hi),
                    calibrated=True, rel_error=rel_error, has_prior=True)  # fmt: skip


def _scaled_decode(step: StepModel, ctx: float) -> float:
    """A batch-8 decode step in the three coefficients the decode ratio scales (no MoE term:
    the transfer keeps it as the prior has it)."""
    b = _DECODE_PROBE_BATCH
    return step.overhead_s + step.decode_s_per_seq * b + step.kv_s_per_token * int(b * ctx)


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchSettings:
    """What the search optimises for and how hard it tries; the engine settings every
    alternative assumes (None: the engine's default for that GPU)."""

    slo: Slo
    peak_rps: float  # forecast peak the replicas must serve
    spare_replicas: int = 1  # N+1
    engine: str = DEFAULT_ENGINE  # an estimator.engines profile name
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    max_model_len: int | None = None  # None: the model's maximum
    gpu_memory_utilization: float | None = None  # the engine's memory fraction
    prefix_cache_hit_ratio: float = 0.0
    gpus: tuple[str, ...] = ()  # empty: every catalog GPU but generic (CPU) entries
    quants: tuple[str, ...] = QUANTS
    max_simulated: int = 12
    n_requests: int = 1000  # per capacity probe
    max_listed: int = 24  # alternatives returned at most (those meeting the SLO come first)


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    setup: Setup
    gpu: GpuSpec
    plan: MemoryPlan
    step: StepModel
    limits: EngineLimits


def supports(gpu: GpuSpec, quant: str) -> bool:
    if quant == "fp8":
        return gpu.fp8_flops is not None
    if quant == "int8":
        return gpu.int8_ops is not None
    return True


def make_candidate(
    arch: ModelArch, gpu: GpuSpec, setup: Setup, settings: SearchSettings, transfer: Transfer
) -> Candidate:
    tp, engine, eager = setup.gpus_per_replica, settings.engine, settings.enforce_eager
    plan = plan_memory(arch, gpu, tp=tp, quant=setup.quant, kv_dtype=setup.kv_dtype,
                       gpu_memory_utilization=settings.gpu_memory_utilization,
                       max_num_seqs=settings.max_num_seqs,
                       max_num_batched_tokens=settings.max_num_batched_tokens,
                       max_model_len=settings.max_model_len, engine=engine,
                       enforce_eager=eager)  # fmt: skip
    prior = roofline_prior(arch, gpu, tp=tp, quant=setup.quant, kv_dtype=setup.kv_dtype,
                           engine=engine, enforce_eager=eager)  # fmt: skip
    return Candidate(setup=setup, gpu=gpu, plan=plan, step=transfer.apply(prior),
                     limits=limits_of(gpu, plan, settings))  # fmt: skip


def limits_of(gpu: GpuSpec, plan: MemoryPlan, settings: SearchSettings) -> EngineLimits:
    """The engine's limits on ``gpu`` with ``plan``'s KV capacity and settings
    (``estimator.limits.engine_limits``: TensorRT-LLM reserves each request's output)."""
    hit = min(settings.prefix_cache_hit_ratio, 0.95)
    return engine_limits(gpu, engine=settings.engine, plan=plan,
                         prefix_cache_hit_ratio=hit).limits  # fmt: skip


def candidates(
    arch: ModelArch, catalog: Mapping[str, GpuSpec], settings: SearchSettings, transfer: Transfer
) -> list[Candidate]:
    """Every configuration whose weights fit, smallest two fitting TPs per (GPU, format)."""
    keys = settings.gpus or tuple(k for k, g in catalog.items() if g.vendor != "generic")
    out: list[Candidate] = []
    for key in keys:
        gpu = catalog[key]
        for quant in settings.quants:
            if not supports(gpu, quant):
                continue
            kept = 0
            for tp in (t for t in TPS if t <= gpu.max_per_node):
                c = make_candidate(arch, gpu, Setup(gpu=key, gpus_per_replica=tp, quant=quant),
                                   settings, transfer)  # fmt: skip
                if c.plan.fits:
                    out.append(c)
                    kept += 1
                if kept == 2:
                    break
    return out


def idle_misses_slo(c: Candidate, workload: Workload, slo: Slo) -> str | None:
    ttft = c.step.ttft_idle(max(1, round(workload.mean_prompt)),
                            chunk_tokens=c.limits.max_num_batched_tokens)  # fmt: skip
    itl = c.step.itl_at(1, workload.mean_prompt + workload.mean_output / 2)
    if ttft > slo.ttft_p95_s:
        return f"an idle engine already takes {ttft:.3f}s to the first token"
    if itl > slo.itl_p95_s:
        return f"an idle engine already takes {itl * 1e3:.1f}ms per token"
    return None


def screening_cost(c: Candidate, workload: Workload, settings: SearchSettings) -> float:
    rate = _SCREEN_FRACTION * saturation_rate(c.step, c.limits, workload)
    replicas = math.ceil(settings.peak_rps / rate) if rate > 0 else 10**6
    return c.gpu.price_per_hour * c.setup.gpus_per_replica * (max(1, replicas) + 1)


def evaluate(
    c: Candidate,
    workload: Workload,
    settings: SearchSettings,
    transfer: Transfer,
    *,
    capacity: CapacityResult | None = None,
    current: bool = False,
) -> Alternative:
    """Capacity at the SLO, replicas for the peak (N+1) and cost of one configuration (per-token
    prices at the forecast peak, ``priced_at_rps``)."""
    if capacity is None:
        capacity = max_rate_at_slo(c.step, c.limits, workload, settings.slo,
                                   n_requests=settings.n_requests)  # fmt: skip
    per = capacity.per_replica_rps
    meets = per > 0
    needed = _replicas(settings.peak_rps, per) if meets else 1
    replicas = needed_replicas(settings.peak_rps, per, settings.spare_replicas) if meets else 1
    usd = deployment_usd_per_hour(c.gpu.price_per_hour, c.setup.gpus_per_replica, replicas)
    sim = capacity.at_capacity
    times = token_times(c.step, decode_batch=max(1, round(sim.mean_running)),
                        mean_context=workload.mean_prompt + workload.mean_output / 2)  # fmt: skip
    figures = cost_figures(usd_per_hour=usd, rate_rps=settings.peak_rps,
                           mean_prompt_tokens=workload.mean_prompt,
                           mean_output_tokens=workload.mean_output, times=times,
                           cached_ratio=settings.prefix_cache_hit_ratio,
                           capacity_rps=per * needed if meets else None,
                           at="forecast peak")  # fmt: skip
    band = transfer.band()
    return Alternative(
        gpu=c.setup.gpu, gpu_name=c.gpu.name, gpus_per_replica=c.setup.gpus_per_replica,
        quant=c.setup.quant, kv_dtype=c.setup.kv_dtype, replicas=replicas,
        capacity_rps_per_replica=per, capacity_rps=per * needed if meets else 0.0,
        meets_slo=meets, limiting=capacity.limiting,
        kv_capacity_tokens=c.plan.kv_capacity_tokens,
        max_concurrent_seqs=c.plan.seqs_at_typical_context, oom_risk=c.plan.oom_risk,
        usd_per_hour=usd, usd_per_month=figures.usd_per_month,
        usd_per_1m_tokens=figures.usd_per_1m_tokens,
        usd_per_1m_input_tokens=figures.usd_per_1m_input_tokens,
        usd_per_1m_output_tokens=figures.usd_per_1m_output_tokens,
        priced_at_rps=figures.served_rps if meets else None, current=current,
        uncertainty=Uncertainty(low=per * (1 - band), high=per * (1 + band), rel_error=band,
                                source="calibration p90 relative error" if transfer.calibrated
                                else "uncalibrated roofline prior (assumed)"),
        assumptions=_assumptions(c, settings, transfer),
        reasons=_reasons(c, capacity, settings, needed),
    )  # fmt: skip


def _assumptions(c: Candidate, settings: SearchSettings, transfer: Transfer) -> tuple[str, ...]:
    out = [
        f"{settings.engine}{' (eager)' if settings.enforce_eager else ''}: "
        f"max_num_seqs={c.limits.max_num_seqs}, "
        f"max_num_batched_tokens={c.limits.max_num_batched_tokens}, "
        f"max_model_len={c.plan.max_model_len}, memory fraction "
        f"{c.plan.gpu_memory_utilization:g}",
        f"ideal load balancing over replicas; {settings.spare_replicas} spare replica(s)",
        f"price ${c.gpu.price_per_hour}/GPU-hour ({c.gpu.price_source}, {c.gpu.price_date})",
    ]
    if transfer.calibrated:
        out.append(f"roofline prior scaled by observed/prior: prefill x{transfer.prefill:.2f}, "
                   f"decode x{transfer.decode:.2f}")  # fmt: skip
    else:
        out.append("roofline prior, not calibrated on this deployment")
    if c.setup.quant != "bf16":
        out.append(f"a {c.setup.quant} checkpoint of the model exists and keeps its quality")
    return tuple(out)


def _reasons(
    c: Candidate, cap: CapacityResult, settings: SearchSettings, needed: int
) -> tuple[str, ...]:
    if cap.per_replica_rps <= 0:
        return (f"misses the SLO at any rate (limiting: {cap.limiting})",)
    sim = cap.at_capacity
    out = [
        f"{cap.per_replica_rps:.2f} req/s per replica at the SLO (limited by {cap.limiting}); "
        f"TTFT p95 {sim.ttft_p95_s:.3f}s, ITL p95 {sim.itl_p95_s * 1e3:.1f}ms there",
        f"{needed} replica(s) for the peak {settings.peak_rps:.2f} req/s",
        f"KV cache {c.plan.kv_capacity_tokens} tokens; OOM risk {c.plan.oom_risk}",
    ]
    return (*out, *c.plan.reasons)


def rank(alternatives: Sequence[Alternative]) -> tuple[Alternative, ...]:
    def key(a: Alternative) -> tuple[bool, float, int, float]:
        # at equal price, prefer the format with less quality risk (bf16 first)
        q = QUANTS.index(a.quant) if a.quant in QUANTS else len(QUANTS)
        return (not a.meets_slo, round(a.usd_per_hour, 6), q, a.usd_per_1m_tokens or math.inf)

    return tuple(sorted(alternatives, key=key))


CapacityCache = MutableMapping[tuple[object, ...], CapacityResult]


def search(
    arch: ModelArch,
    catalog: Mapping[str, GpuSpec],
    workload: Workload,
    settings: SearchSettings,
    transfer: Transfer,
    *,
    current: Setup | None = None,
    current_capacity: CapacityResult | None = None,
    cache: CapacityCache | None = None,
) -> tuple[Alternative, ...]:
    """Ranked alternatives (see the module docstring). ``cache`` is keyed per configuration
    and by everything the capacity depends on; pass the same dict across calls.
    ``current_capacity``: the capacity the caller already projected for ``current`` (with the
    engine limits it runs with), so the current configuration's row repeats that figure
    instead of a second estimate of it."""
    found = candidates(arch, catalog, settings, transfer)
    if current is not None and current.gpu in catalog:
        here = make_candidate(arch, catalog[current.gpu], current, settings, transfer)
        found = [c for c in found if c.setup.key() != current.key()] + [here]
    results: list[Alternative] = []
    feasible: list[Candidate] = []
    for c in found:
        why = idle_misses_slo(c, workload, settings.slo) if c.setup != current else None
        if why is not None:
            results.append(unmet(c, why, settings, transfer))
        elif c.plan.fits or c.setup == current:
            feasible.append(c)
    feasible.sort(key=lambda c: (c.setup != current, screening_cost(c, workload, settings)))
    sig = _signature(workload, settings, transfer)
    for c in feasible[: max(1, settings.max_simulated)]:
        if not c.plan.fits:  # the current configuration, even when it cannot start
            results.append(unmet(c, "does not fit in GPU memory", settings, transfer, current=True))
            continue
        key = (*c.setup.key(), *sig)
        cap = cache.get(key) if cache is not None else None
        if c.setup == current and current_capacity is not None:
            cap = current_capacity
        if cap is None:
            cap = max_rate_at_slo(c.step, c.limits, workload, settings.slo,
                                  n_requests=settings.n_requests)  # fmt: skip
            if cache is not None:
                cache[key] = cap
        results.append(evaluate(c, workload, settings, transfer, capacity=cap,
                                current=c.setup == current))  # fmt: skip
    ranked = rank(results)
    return ranked[: settings.max_listed]


def unmet(
    c: Candidate, why: str, settings: SearchSettings, transfer: Transfer, *, current: bool = False
) -> Alternative:
    """A configuration ruled out without simulation (it cannot meet the SLO at any rate)."""
    usd = deployment_usd_per_hour(c.gpu.price_per_hour, c.setup.gpus_per_replica, 1)
    return Alternative(
        fits=c.plan.fits,
        gpu=c.setup.gpu, gpu_name=c.gpu.name, gpus_per_replica=c.setup.gpus_per_replica,
        quant=c.setup.quant, kv_dtype=c.setup.kv_dtype, replicas=1, capacity_rps_per_replica=0.0,
        capacity_rps=0.0, meets_slo=False, limiting=None,
        kv_capacity_tokens=c.plan.kv_capacity_tokens,
        max_concurrent_seqs=c.plan.seqs_at_typical_context, oom_risk=c.plan.oom_risk,
        usd_per_hour=usd, usd_per_month=usd * HOURS_PER_MONTH, usd_per_1m_tokens=None,
        usd_per_1m_input_tokens=None, usd_per_1m_output_tokens=None, current=current,
        assumptions=_assumptions(c, settings, transfer), reasons=(why, *c.plan.reasons),
    )  # fmt: skip


_SIGNATURE_BIN = math.log(1.05)


def _bin5(x: float) -> int:
    return round(math.log(x) / _SIGNATURE_BIN) if x > 0 else -(10**9)


def _signature(workload: Workload, s: SearchSettings, t: Transfer) -> tuple[object, ...]:
    """What a configuration's capacity depends on, in 5% bins: a search whose inputs moved by
    less reuses the capacities (their band is wider than that), so the search that runs with
    every report re-simulates only when the traffic or the fit really moved."""
    return (
        _bin5(workload.mean_prompt), _bin5(workload.mean_output),
        _bin5(float(np.percentile(workload.prompt_tokens, 90))), s.slo, s.max_num_seqs,
        s.max_model_len, round(s.prefix_cache_hit_ratio, 2), _bin5(t.prefill), _bin5(t.decode),
        s.n_requests, s.gpu_memory_utilization, s.engine, s.max_num_batched_tokens,
        s.enforce_eager,
    )  # fmt: skip


def with_kv_dtype(setup: Setup, kv_dtype: str) -> Setup:
    return replace(setup, kv_dtype=kv_dtype)


# ---- advice on the running deployment ---------------------------------------------------
_SEQS_MARGIN = 1.25
_UNDERUSED = 0.2


@dataclass(frozen=True, slots=True, kw_only=True)
class Observed:
    """What the advice reads about the live deployment (base units; None = unknown)."""

    rate_rps: float  # the current rate (5-minute window online)
    rate_long_rps: float  # over the longest window there is data for (at most an hour)
    peak_rps: float  # forecast peak
    total_tokens_p999: float | None  # prompt + output
    replicas: int
    max_num_seqs: int | None  # engine setting now
    max_model_len: int | None
    kv_dtype: str = "auto"
    rate_long_window_s: float | None = 3600.0  # what rate_long_rps covers; None: given rate


def _window(seconds: float | None) -> str:
    """``over the last 20 s`` (never a longer window than the data behind it)."""
    if seconds is None:
        return "at the given rate"
    if seconds < 120:
        return f"over the last {seconds:.0f} s"
    if seconds < 7200:
        return f"over the last {seconds / 60:.0f} min"
    return f"over the last {seconds / 3600:.1f} h"


def round_len(tokens: float) -> int:
    """Round up to 2^k or 1.5 x 2^k (at least 256): 3000 -> 3072, 5000 -> 6144."""
    x = max(256.0, tokens)
    k = 2 ** math.ceil(math.log2(x))
    return int(0.75 * k) if x <= 0.75 * k else int(k)


def _replicas(rate: float, per_replica: float) -> int:
    return max(1, math.ceil(rate / max(per_replica, 1e-9) - 1e-9))


def needed_replicas(peak_rps: float, per_replica: float, spare: int) -> int:
    """Replicas that serve ``peak_rps`` within the SLO plus ``spare`` (N+1): the one rule the
    headline, the replica advice and every alternative size with."""
    return _replicas(peak_rps, per_replica) + max(0, spare)


def replicas_range(per_replica: float, peak: float, spare: int, band: float) -> tuple[int, int]:
    """Replicas (N+1) at the capacity band's high and low ends."""
    high = _replicas(peak, per_replica * max(1.0 - band, 1e-6)) + spare
    return _replicas(peak, per_replica * (1.0 + band)) + spare, high


def advise_replicas(
    per_replica: float, obs: Observed, spare: int, band: float, *, max_band: float = 0.5
) -> Recommendation:
    """One verdict on the replica count: add, fewer suffice, or right-sized; or, when the
    capacity band is wider than ``max_band``, no count at all but the range and why."""
    needed = needed_replicas(obs.peak_rps, per_replica, spare)
    low, high = replicas_range(per_replica, obs.peak_rps, spare, band)
    numbers: dict[str, str | float | int | None] = {
        "peak_rps": obs.peak_rps, "capacity_rps_per_replica": per_replica,
        "replicas_now": obs.replicas, "spare_replicas": spare, "band": band}  # fmt: skip
    uncertainty = Uncertainty(low=low, high=high, rel_error=band,
                              source="replicas at the capacity band's ends")  # fmt: skip
    assumptions = ("ideal load balancing", "forecast peak over the configured horizon")
    if band > max_band:
        return Recommendation(
            kind="replicas", severity="warning", value=None,
            message=f"capacity {per_replica:.2f} req/s per replica is uncertain by +-{band:.0%} "
            f"(over the {max_band:.0%} needed to act on): anywhere from {low} to {high} "
            f"replicas would serve the forecast peak {obs.peak_rps:.2f} req/s; no count is "
            "recommended until the fit settles (more traffic, or a model config for the prior)",
            numbers=numbers, assumptions=assumptions, uncertainty=uncertainty)  # fmt: skip
    if needed > obs.replicas:
        sev, verdict = "warning", f"add {needed - obs.replicas}"
    elif needed < obs.replicas:
        sev, verdict = "info", f"{obs.replicas - needed} fewer would do"
    else:
        sev, verdict = "info", "right-sized"
    return Recommendation(
        kind="replicas", severity=sev, value=needed,
        message=f"{needed} replica(s) serve the forecast peak {obs.peak_rps:.2f} req/s within the "
        f"SLO with {spare} spare (now {obs.replicas}: {verdict})",
        numbers=numbers, assumptions=assumptions, uncertainty=uncertainty,
    )  # fmt: skip


def advise_max_num_seqs(
    cap: CapacityResult, plan: MemoryPlan | None, obs: Observed
) -> Recommendation:
    sim = cap.at_capacity
    reached = max(1, sim.peak_running)
    value = max(8, math.ceil(reached * _SEQS_MARGIN / 8) * 8)
    kv_limit = plan.seqs_at_typical_context if plan is not None else None
    if kv_limit is not None and kv_limit > 0:
        value = min(value, max(8, kv_limit))
    return Recommendation(
        kind="max_num_seqs", severity="info", value=value,
        message=f"max_num_seqs={value}: at capacity the engine ran at most {reached} sequences "
        f"(mean {sim.mean_running:.1f}); more only adds preemption and ITL risk",
        numbers={"peak_running_at_capacity": reached, "mean_running_at_capacity": sim.mean_running,
                 "kv_limit_seqs": kv_limit, "now": obs.max_num_seqs, "margin": _SEQS_MARGIN},
        assumptions=("the simulated capacity point", "typical context for the KV limit"),
    )  # fmt: skip


def suggested_max_model_len(total_tokens_p999: float, arch: ModelArch | None) -> int:
    """p99.9 of prompt + output rounded up (``round_len``), at most the model's maximum."""
    value = round_len(total_tokens_p999)
    return min(value, arch.max_position_embeddings) if arch is not None else value


def advise_max_model_len(obs: Observed, arch: ModelArch | None) -> Recommendation | None:
    if obs.total_tokens_p999 is None:
        return None
    value = suggested_max_model_len(obs.total_tokens_p999, arch)
    return Recommendation(
        kind="max_model_len", severity="info", value=value,
        message=f"max_model_len={value}: 99.9% of requests need at most "
        f"{obs.total_tokens_p999:.0f} tokens (prompt + output); a smaller limit frees KV cache "
        "and lowers the OOM risk at start-up",
        numbers={"prompt_plus_output_p999": obs.total_tokens_p999, "now": obs.max_model_len,
                 "model_max": arch.max_position_embeddings if arch else None},
        assumptions=("longer requests are rare and may be rejected",),
    )  # fmt: skip


def advise_kv_dtype(
    cap: CapacityResult, fp8: Alternative | None, obs: Observed
) -> Recommendation | None:
    kv_bound = cap.limiting == "kv" or cap.at_capacity.kv_bound
    if not kv_bound or obs.kv_dtype.startswith("fp8"):
        return None
    gain = None
    if fp8 is not None and cap.per_replica_rps > 0:
        gain = fp8.capacity_rps_per_replica / cap.per_replica_rps
    return Recommendation(
        kind="kv_cache_dtype", severity="info", value="fp8",
        message="the KV cache limits capacity: kv_cache_dtype=fp8 doubles the tokens it holds"
        + (f" (capacity x{gain:.2f})" if gain else ""),
        numbers={"capacity_rps_per_replica": cap.per_replica_rps,
                 "capacity_rps_per_replica_fp8_kv": fp8.capacity_rps_per_replica if fp8 else None,
                 "peak_kv_usage": cap.at_capacity.peak_kv_usage,
                 "preemptions": cap.at_capacity.preemptions},
        assumptions=("fp8 KV keeps quality for this model (check it)",),
    )  # fmt: skip


def advise_oom(plan: MemoryPlan | None) -> Recommendation | None:
    if plan is None or plan.oom_risk in ("none", "low"):
        return None
    return Recommendation(
        kind="oom_risk", severity="critical" if plan.oom_risk == "certain" else "warning",
        value=plan.oom_risk, message=f"OOM risk {plan.oom_risk}: " + "; ".join(plan.reasons),
        numbers={"weight_bytes_per_gpu": plan.weight_bytes_per_gpu,
                 "kv_bytes_per_gpu": plan.kv_bytes_per_gpu, "headroom_bytes": plan.headroom_bytes},
        assumptions=("memory overheads estimated as the engine profile sizes them",),
    )  # fmt: skip


def advise_underused(
    capacity_rps: float, obs: Observed, band: float, *, spare: int = 1
) -> Recommendation | None:
    """Under-utilized: the long-window rate is under 20% of capacity, and the replica advice
    does not ask for more replicas (N+1 can need a spare an idle deployment does not use: then
    this says nothing, rather than "add one" beside "too many")."""
    rate = obs.rate_long_rps
    if capacity_rps <= 0 or rate >= _UNDERUSED * capacity_rps:
        return None
    if _replicas(obs.peak_rps, capacity_rps / max(1, obs.replicas)) + spare > obs.replicas:
        return None
    window = _window(obs.rate_long_window_s)
    return Recommendation(
        kind="underutilized", severity="warning", value=rate / capacity_rps,
        message=f"under-utilized: {rate:.2f} req/s {window} is "
        f"{rate / capacity_rps:.0%} of the {capacity_rps:.2f} req/s capacity",
        numbers={"rate_rps": rate, "rate_window_s": obs.rate_long_window_s,
                 "capacity_rps": capacity_rps, "threshold": _UNDERUSED,
                 "replicas": obs.replicas},
        uncertainty=Uncertainty(low=capacity_rps * (1 - band), high=capacity_rps * (1 + band),
                                rel_error=band, source="capacity band"),
    )  # fmt: skip


def advise_alternatives(alts: Sequence[Alternative]) -> list[Recommendation]:
    """'No listed option meets the SLO', or the cheapest option when it beats the current."""
    if not alts:
        return []
    if not any(a.meets_slo for a in alts):
        return [Recommendation(
            kind="no_option_meets_slo", severity="critical",
            message=f"no listed option meets the SLO ({len(alts)} simulated)",
            numbers={"simulated": len(alts)},
            assumptions=("GPUs in the catalog; formats bf16, fp8, int8, int4",),
        )]  # fmt: skip
    best, now = alts[0], next((a for a in alts if a.current), None)
    if now is None or best.current or best.usd_per_hour >= 0.9 * now.usd_per_hour:
        return []
    return [Recommendation(
        kind="gpu", severity="info", value=best.label(),
        message=f"{best.label()} meets the SLO at ${best.usd_per_hour:.2f}/h vs "
        f"${now.usd_per_hour:.2f}/h for the current configuration sized the same way "
        f"({now.label()}; both for the forecast peak, N+1)",
        numbers={"usd_per_hour": best.usd_per_hour, "usd_per_hour_now": now.usd_per_hour,
                 "capacity_rps": best.capacity_rps},
        assumptions=best.assumptions, uncertainty=best.uncertainty,
    )]  # fmt: skip
