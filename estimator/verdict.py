"""The verdict of an experiment, built from two groups' samples, capacities and prices (see
``estimator.compare`` for what is measured and how it is costed): the comparison, its CIs and
one plain sentence with the reasons behind it.

This module runs past 400 lines: the verdict's types, the cost ratios with their CIs and the
sentence built from them are read and changed together."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from estimator.abtest import (
    PROPORTION_METHOD,
    QUANTILE_METHOD,
    QuantileComparison,
    RateComparison,
    compare_quantiles,
    compare_rates,
)
from estimator.compare import (
    CAPACITY_METHOD,
    Capacity,
    GroupSpec,
    Pricing,
    Sample,
    Scalar,
    break_even,
    monthly,
    paired,
    per_1m_tokens,
    pricing,
    ratio,
)

_Z95 = 1.959964


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupVerdict:
    group: str
    role: str  # baseline or candidate
    engine: str
    gpu: str | None
    gpus_per_backend: int
    quant: str
    settings: dict[str, Scalar]
    managed: bool
    requests: int
    live: int
    shadow: int
    errors: int
    error_rate: float | None
    slo_attainment: float | None  # requests within both targets (each its own p95 gap)
    prompt_tokens: int
    completion_tokens: int
    mean_prompt_tokens: float | None
    mean_completion_tokens: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    itl_p50_s: float | None  # per-request mean inter-token latency
    itl_p95_s: float | None
    capacity_rps: float | None  # per replica, at the SLO
    capacity_low_rps: float | None
    capacity_high_rps: float | None
    capacity_source: str
    limiting: str | None
    fit_error_p90: float | None
    usd_per_hour: float | None  # per replica (GPU groups)
    usd_per_request: float | None  # managed: list price on this group's mean tokens
    replicas: int | None  # to serve the current rate at the SLO
    replicas_peak: int | None
    usd_per_month: float | None  # at the current rate
    usd_per_month_peak: float | None
    usd_per_1m_tokens: float | None  # at capacity (GPU) or list (managed)
    notes: tuple[str, ...] = ()
    meets_slo: bool | None = None  # p95 TTFT and p95 per-request mean gap within the targets


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    experiment: str
    model: str
    status: str  # ok or insufficient_data
    verdict: str  # one plain sentence
    reasons: tuple[str, ...]
    generated_at: float
    first_epoch: float | None
    last_epoch: float | None
    rate_rps: float
    forecast_peak_rps: float
    paired_requests: int
    groups: tuple[GroupVerdict, ...]
    ttft: tuple[QuantileComparison, ...] = ()
    itl: tuple[QuantileComparison, ...] = ()
    errors: RateComparison | None = None
    slo_misses: RateComparison | None = None
    capacity_ratio: float | None = None  # candidate / baseline, per replica
    capacity_ratio_low: float | None = None
    capacity_ratio_high: float | None = None
    cost_ratio: float | None = None  # candidate / baseline $/month at the current rate
    cost_ratio_low: float | None = None
    cost_ratio_high: float | None = None
    cost_ratio_peak: float | None = None
    unit_cost_ratio: float | None = None  # per token at capacity
    unit_cost_ratio_low: float | None = None
    unit_cost_ratio_high: float | None = None
    cheaper: str | None = None  # candidate, baseline, same or None (not significant/unknown)
    break_even_rps: float | None = None
    methods: dict[str, str] = field(default_factory=dict)


def _q(x: np.ndarray, q: float) -> float | None:
    return float(np.quantile(x, q)) if x.size else None


# --- the verdict -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Side:
    """One group as the verdict sees it."""

    spec: GroupSpec
    sample: Sample
    capacity: Capacity
    gpu_usd_per_hour: float | None = None  # the catalog's price of one of its GPUs


def _group(side: Side, role: str, rate: float, peak: float) -> tuple[GroupVerdict, Pricing]:
    s, spec, cap = side.sample, side.spec, side.capacity
    p_tok, c_tok, p_mean, c_mean = s.tokens()
    price = pricing(spec, side.gpu_usd_per_hour, p_mean, c_mean)
    replicas, usd = monthly(price, cap.rps, rate)
    replicas_peak, usd_peak = monthly(price, cap.rps, peak)
    tokens = (p_mean or 0.0) + (c_mean or 0.0)
    live = sum(not r.shadow for r in s.records)
    gv = GroupVerdict(
        group=spec.name,
        role=role,
        engine=spec.engine,
        gpu=spec.gpu,
        gpus_per_backend=spec.gpus_per_backend,
        quant=spec.quant,
        settings=dict(spec.settings),
        managed=spec.managed,
        requests=len(s.records),
        live=live,
        shadow=len(s.records) - live,
        errors=s.errors,
        error_rate=s.errors / s.judged if s.judged else None,
        slo_attainment=1.0 - s.slo_miss / s.slo_n if s.slo_n else None,
        prompt_tokens=p_tok,
        completion_tokens=c_tok,
        mean_prompt_tokens=p_mean,
        mean_completion_tokens=c_mean,
        ttft_p50_s=_q(s.ttft, 0.5),
        ttft_p95_s=_q(s.ttft, 0.95),
        itl_p50_s=_q(s.itl, 0.5),
        itl_p95_s=_q(s.itl, 0.95),
        capacity_rps=cap.rps,
        capacity_low_rps=cap.low,
        capacity_high_rps=cap.high,
        capacity_source=cap.source,
        limiting=cap.limiting,
        fit_error_p90=cap.fit_error_p90,
        usd_per_hour=price.usd_per_hour,
        usd_per_request=price.usd_per_request,
        replicas=replicas,
        replicas_peak=replicas_peak,
        usd_per_month=usd,
        usd_per_month_peak=usd_peak,
        usd_per_1m_tokens=per_1m_tokens(price, cap.rps, tokens or None),
        notes=cap.notes,
        meets_slo=s.meets_slo,
    )
    return gv, price


def _per_request_at_capacity(price: Pricing, capacity: float | None) -> float | None:
    if price.usd_per_request is not None:
        return price.usd_per_request
    if price.usd_per_hour is None or not capacity:
        return None
    return price.usd_per_hour / (capacity * 3600.0)


def jackknife_log_ratio(
    num: Sequence[float], den: Sequence[float], point: float
) -> tuple[float, float] | None:
    """95% CI of a ratio from paired leave-one-block-out replicates, on the log scale."""
    k = min(len(num), len(den))
    if k < 3 or point <= 0:
        return None
    logs = [math.log(a / b) for a, b in zip(num[:k], den[:k], strict=True) if a > 0 and b > 0]
    if len(logs) < 3:
        return None
    m = sum(logs) / len(logs)
    se = math.sqrt((len(logs) - 1) / len(logs) * sum((x - m) ** 2 for x in logs))
    centre = math.log(point)
    return math.exp(centre - _Z95 * se), math.exp(centre + _Z95 * se)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Costs:
    capacity: tuple[float | None, float | None, float | None]
    monthly: tuple[float | None, float | None, float | None]
    monthly_peak: float | None
    unit: tuple[float | None, float | None, float | None]
    break_even: float | None


def _cost_ratios(b: Side, c: Side, pb: Pricing, pc: Pricing, rate: float, peak: float) -> _Costs:
    cb, cc = b.capacity, c.capacity
    cap = ratio(cc.rps, cb.rps)
    cap_ci = jackknife_log_ratio(cc.replicates, cb.replicates, cap) if cap else None
    _, mb = monthly(pb, cb.rps, rate)
    _, mc = monthly(pc, cc.rps, rate)
    month = ratio(mc, mb)
    month_ci: tuple[float | None, float | None] = (None, None)
    if month is not None and None not in (cb.low, cb.high, cc.low, cc.high):
        lo = ratio(monthly(pc, cc.high, rate)[1], monthly(pb, cb.low, rate)[1])
        hi = ratio(monthly(pc, cc.low, rate)[1], monthly(pb, cb.high, rate)[1])
        month_ci = (lo, hi)
    unit = ratio(_per_request_at_capacity(pc, cc.rps), _per_request_at_capacity(pb, cb.rps))
    unit_ci: tuple[float | None, float | None] = (None, None)
    if unit is not None and cap_ci is not None and not (pb.usd_per_request or pc.usd_per_request):
        unit_ci = (unit * cap / cap_ci[1], unit * cap / cap_ci[0])  # type: ignore[operator]
    elif unit is not None:  # one side is a managed list price: only the GPU side is uncertain
        gpu = cb if pc.usd_per_request is not None else cc
        if gpu.rps and gpu.low and gpu.high:  # the ratio moves as 1/capacity (candidate's)
            if gpu is cc:  # or as the baseline's capacity
                unit_ci = (unit * gpu.rps / gpu.high, unit * gpu.rps / gpu.low)
            else:
                unit_ci = (unit * gpu.low / gpu.rps, unit * gpu.high / gpu.rps)
    be = None
    for gpu_side, gp, mp in ((b, pb, pc), (c, pc, pb)):
        if gp.usd_per_hour is not None and mp.usd_per_request is not None and gpu_side.capacity.rps:
            be = break_even(gp.usd_per_hour, gpu_side.capacity.rps, mp.usd_per_request)
    _, mb_peak = monthly(pb, cb.rps, peak)
    _, mc_peak = monthly(pc, cc.rps, peak)
    return _Costs(
        capacity=(cap, *(cap_ci or (None, None))),
        monthly=(month, *month_ci),
        monthly_peak=ratio(mc_peak, mb_peak),
        unit=(unit, *unit_ci),
        break_even=be,
    )


def _latency(b: Side, c: Side) -> tuple[list[QuantileComparison], list[QuantileComparison], int]:
    tb, tc, ib, ic = paired(b.sample.records, c.sample.records)
    if len(tc) >= 30:  # the candidate's records are shadow copies: compare request by request
        ttft = compare_quantiles(tb, tc, paired=True)
        itl = compare_quantiles(ib, ic, paired=True) if len(ic) >= 30 else []
        return ttft, itl, len(tc)
    ttft = compare_quantiles(b.sample.ttft, c.sample.ttft)
    itl = compare_quantiles(b.sample.itl, c.sample.itl)
    return ttft, itl, 0


def build_verdict(
    *,
    experiment: str,
    model: str,
    baseline: Side,
    candidate: Side,
    rate_rps: float,
    peak_rps: float,
    now: float,
    min_requests: int,
) -> Verdict:
    """The comparison of two groups (module docstring)."""
    b, c = baseline, candidate
    gb, pb = _group(b, "baseline", rate_rps, peak_rps)
    gc, pc = _group(c, "candidate", rate_rps, peak_rps)
    epochs = [r.arrival_epoch for s in (b, c) for r in s.sample.records]
    common: dict[str, Any] = dict(
        experiment=experiment,
        model=model,
        generated_at=float(now),
        first_epoch=float(min(epochs)) if epochs else None,
        last_epoch=float(max(epochs)) if epochs else None,
        rate_rps=float(rate_rps),
        forecast_peak_rps=float(peak_rps),
        groups=(gb, gc),
        methods={
            "latency": QUANTILE_METHOD + " (95%)",
            "rates": PROPORTION_METHOD + " (95%)",
            "capacity": CAPACITY_METHOD,
            "cost": "whole replicas at the SLO (no spare); "
            "CI: each group's cost at the ends of its capacity CI",
        },
    )
    short = [
        f"{s.spec.name}: {s.sample.judged} of {min_requests} requests"
        for s in (b, c)
        if s.sample.judged < min_requests
    ]
    if short:
        return Verdict(
            **common,
            status="insufficient_data",
            paired_requests=0,
            verdict="not enough data yet (" + "; ".join(short) + ")",
            reasons=tuple(short),
        )
    ttft, itl, n_paired = _latency(b, c)
    sb, sc = b.sample, c.sample
    errors = compare_rates(sb.errors, sb.judged, sc.errors, sc.judged)
    misses = compare_rates(sb.slo_miss, sb.slo_n, sc.slo_miss, sc.slo_n)
    costs = _cost_ratios(b, c, pb, pc, rate_rps, peak_rps)
    cheaper = _cheaper(costs)
    sentence, reasons = _sentence(gb, gc, costs, cheaper, ttft, errors, n_paired)
    return Verdict(
        **common,
        status="ok",
        verdict=sentence,
        reasons=tuple(reasons),
        paired_requests=n_paired,
        ttft=tuple(ttft),
        itl=tuple(itl),
        errors=errors,
        slo_misses=misses,
        capacity_ratio=costs.capacity[0],
        capacity_ratio_low=costs.capacity[1],
        capacity_ratio_high=costs.capacity[2],
        cost_ratio=costs.monthly[0],
        cost_ratio_low=costs.monthly[1],
        cost_ratio_high=costs.monthly[2],
        cost_ratio_peak=costs.monthly_peak,
        unit_cost_ratio=costs.unit[0],
        unit_cost_ratio_low=costs.unit[1],
        unit_cost_ratio_high=costs.unit[2],
        cheaper=cheaper,
        break_even_rps=costs.break_even,
    )


def _cheaper(costs: _Costs) -> str | None:
    """Which group costs less: by $/month at the current rate, or per request at capacity when
    both need the same whole replicas; None when the CI does not tell."""
    month, lo, hi = costs.monthly
    if month is not None and abs(month - 1.0) > 1e-9:
        if lo is None or hi is None:
            return "candidate" if month < 1 else "baseline"
        return "candidate" if hi < 1 else "baseline" if lo > 1 else None
    unit, ulo, uhi = costs.unit
    if unit is None:
        return "same" if month is not None else None
    if ulo is None or uhi is None:
        return "candidate" if unit < 1 else "baseline" if unit > 1 else "same"
    return "candidate" if uhi < 1 else "baseline" if ulo > 1 else "same"


def _pct(ratio: float) -> str:
    return f"{abs(1.0 - ratio):.0%}"


def _band(lo: float | None, hi: float | None, *, less: bool) -> str:
    """The CI of a saving (``less``) or of an extra cost, from the CI of the cost ratio."""
    if lo is None or hi is None:
        return ""
    a, b = sorted((1.0 - hi, 1.0 - lo) if less else (lo - 1.0, hi - 1.0))
    if abs(b - a) < 0.005:
        return " (95% CI: the same at both ends of the capacity CIs)"
    if a >= 0:
        return f"; 95% CI {a:.0%}-{b:.0%}"
    return f"; 95% CI {a:+.0%} to {b:+.0%}"


def _sentence(
    gb: GroupVerdict,
    gc: GroupVerdict,
    costs: _Costs,
    cheaper: str | None,
    ttft: Sequence[QuantileComparison],
    errors: RateComparison,
    n_paired: int,
) -> tuple[str, list[str]]:
    month, lo, hi = costs.monthly
    unit, ulo, uhi = costs.unit
    if gc.capacity_rps == 0:
        head = "the candidate cannot meet the SLO on this traffic, even at a trickle"
    elif month is None:
        head = "no cost comparison: " + (
            "a capacity is unknown (no step model yet)"
            if gb.capacity_rps is None or gc.capacity_rps is None
            else "a price is unknown (no GPU price or tokens)"
        )
    elif abs(month - 1.0) > 1e-9 and cheaper in ("candidate", "baseline"):
        more = "less" if month < 1 else "more"
        head = f"candidate serves this traffic at the SLO for {_pct(month)} {more} per month"
        head += _band(lo, hi, less=month < 1)
    elif abs(month - 1.0) > 1e-9:
        band = _band(lo, hi, less=False)
        head = f"no significant cost difference per month (candidate {month - 1:+.0%}{band})"
    else:
        head = f"same cost per month at this rate ({gc.replicas} replica(s) each)"
        if unit is not None and abs(unit - 1.0) > 1e-9:
            word = "less" if unit < 1 else "more"
            sig = "" if cheaper in ("candidate", "baseline") else ", not significant"
            head += (
                f"; at full load the candidate costs {_pct(unit)} {word} per request"
                f"{_band(ulo, uhi, less=unit < 1)}{sig}"
            )
    tail = [_latency_clause(q) for q in ttft if q.quantile == 0.95]
    if errors.difference is not None:
        sig = "" if errors.significant else ", not significant"
        tail.append(f"error rate {errors.candidate:.1%} vs {errors.baseline:.1%}{sig}")
    for g in (gb, gc):
        if g.meets_slo is False:
            t95, gap = _num_s(g.ttft_p95_s), _num_s(g.itl_p95_s)
            tail.append(f"{g.group} misses the SLO on this traffic (p95 TTFT {t95}, p95 "
                        f"per-request gap {gap})")  # fmt: skip
    basis = f"on {gb.requests} baseline and {gc.requests} candidate requests" + (
        f" ({n_paired} paired shadow copies)" if n_paired else ""
    )
    return "; ".join([head, *tail]) + f" ({basis})", _reasons(gb, gc, costs)


def _latency_clause(q: QuantileComparison) -> str:
    if q.difference is None or q.difference_low is None or q.difference_high is None:
        return "TTFT p95: not enough samples"
    ms = 1000.0
    band = f"95% CI {q.difference_low * ms:+.0f} to {q.difference_high * ms:+.0f} ms"
    if not q.significant:
        return f"TTFT p95 difference not significant ({q.difference * ms:+.0f} ms, {band})"
    return f"TTFT p95 {q.difference * ms:+.0f} ms ({band})"


def _reasons(gb: GroupVerdict, gc: GroupVerdict, costs: _Costs) -> list[str]:
    out = []
    for g in (gb, gc):
        if g.managed:
            price = f"managed, ${g.usd_per_request or 0:.6f} per request on its own tokens"
            out.append(f"{g.group}: {price}; SLO attained by {_share(g.slo_attainment)}")
            continue
        text = "unknown" if g.capacity_rps is None else f"{g.capacity_rps:.2f} req/s per replica"
        if g.capacity_low_rps is not None and g.capacity_high_rps is not None:
            text += f" (95% CI {g.capacity_low_rps:.2f}-{g.capacity_high_rps:.2f})"
        out.append(
            f"{g.group}: capacity at the SLO {text}, limited by {g.limiting or 'n/a'}, "
            f"{g.capacity_source} step model; ${g.usd_per_hour or 0:.2f}/h per replica, "
            f"{g.replicas or 'n/a'} replica(s) for the current rate"
        )
    cap, lo, hi = costs.capacity
    if cap is not None:
        ci = f" (95% CI {lo:.2f}-{hi:.2f})" if lo is not None and hi is not None else ""
        out.append(f"capacity ratio candidate/baseline {cap:.2f}{ci}")
    if costs.break_even is not None:
        out.append(
            f"break-even: below {costs.break_even:.3g} req/s the managed API is cheaper "
            "than one dedicated replica"
        )
    return out


def _num_s(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.0f} ms"


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"
