"""Online calibration: filtering, bounded memory, recovery of known step models (from the
observation model and from the simulator), forgetting, robustness, the prior, speed."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estimator.calibrate import CalibratorConfig, OnlineCalibrator
from estimator.capacity import saturation_rate
from estimator.engine import StepModel
from estimator.records import ItlSummary, Outcome, RequestRecord
from estimator.simulate import EngineLimits, SimTrace, Workload, simulate_trace

TRUE = StepModel(overhead_s=0.006, prefill_s_per_token=6e-5, decode_s_per_seq=1e-4,
                 kv_s_per_token=5e-8)  # fmt: skip
LIMITS = EngineLimits(max_num_seqs=64, kv_capacity_tokens=400_000)
NO_FORGET = CalibratorConfig(half_life_s=1e12)


def good(**kw: object) -> RequestRecord:
    base: dict[str, object] = dict(
        request_id="r", model="m", streamed=True, arrival_s=10.0, dispatch_s=10.0,
        first_token_s=10.1, end_s=11.0, prompt_tokens=500, completion_tokens=50,
        itl=ItlSummary(count=49, mean=0.018), inflight_requests=3,
    )  # fmt: skip
    base.update(kw)
    return RequestRecord(**base)  # type: ignore[arg-type]


def workload(seed: int = 1) -> Workload:
    rng = np.random.default_rng(seed)
    return Workload(prompt_tokens=rng.lognormal(math.log(800), 0.9, 4000).astype(int) + 1,
                    output_tokens=rng.lognormal(math.log(150), 0.8, 4000).astype(int) + 2)  # fmt: skip


def from_trace(tr: SimTrace, offset: float = 0.0) -> list[RequestRecord]:
    """What a proxy in front of the simulated engine would have recorded."""
    out = []
    for i in np.flatnonzero(np.isfinite(tr.first_token_s)):
        c, f, e = int(tr.output_tokens[i]), offset + tr.first_token_s[i], offset + tr.finish_s[i]
        itl = ItlSummary(count=c - 1, mean=(e - f) / (c - 1)) if c > 1 else ItlSummary()
        out.append(good(request_id=str(i), arrival_s=offset + tr.arrival_s[i],
                        dispatch_s=offset + tr.arrival_s[i], first_token_s=f, end_s=e,
                        prompt_tokens=int(tr.prompt_tokens[i]), completion_tokens=c, itl=itl,
                        inflight_requests=int(tr.inflight_at_arrival[i])))  # fmt: skip
    return out


def simulated(step: StepModel, rates: list[float], offset: float = 0.0) -> list[RequestRecord]:
    """Records from the simulator at several loads, one after the other in time."""
    records: list[RequestRecord] = []
    for k, rate in enumerate(rates):
        _, tr = simulate_trace(step, LIMITS, workload(k), rate, n_requests=1500, seed=k)
        records += from_trace(tr, offset)
        offset += float(np.nanmax(tr.finish_s)) + 10.0
    return records


def exact(step: StepModel, n: int, seed: int, noise: float = 0.03) -> list[RequestRecord]:
    """Records that follow the calibrator's own observation model (module docstring), one
    every 1000 s so that no prefill falls inside another request's decode. Lognormal noise:
    ``noise`` on TTFT, a third of it on the mean ITL (an average over many gaps)."""
    rng = np.random.default_rng(seed)
    p, c = rng.integers(50, 8000, n), rng.integers(2, 400, n)
    cached, r = rng.integers(0, 40, n) * (rng.random(n) < 0.3), rng.integers(0, 48, n)
    ctx_bar = float(np.mean(p + c / 2))
    a = np.where(r > 0, 1.5, 1.0)
    ttft = a * (step.overhead_s + step.decode_s_per_seq * r + step.kv_s_per_token * r * ctx_bar)
    ttft += step.prefill_s_per_token * (p - cached)
    itl = step.overhead_s + step.decode_s_per_seq * (r + 1)
    itl += step.kv_s_per_token * (p + c / 2 + r * ctx_bar)
    ttft *= rng.lognormal(0, noise, n)
    itl *= rng.lognormal(0, noise / 3, n)
    return [
        good(request_id=str(i), arrival_s=1000.0 * i, dispatch_s=1000.0 * i,
             first_token_s=1000.0 * i + ttft[i], end_s=1000.0 * i + ttft[i] + itl[i] * (c[i] - 1),
             prompt_tokens=int(p[i]), cached_tokens=int(cached[i]), completion_tokens=int(c[i]),
             inflight_requests=int(r[i]))
        for i in range(n)
    ]  # fmt: skip


def with_jitter(records: list[RequestRecord], sigma: float, seed: int) -> list[RequestRecord]:
    """The same records with per-token gaps scattered by a mean-one lognormal factor."""
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        assert r.end_s is not None and r.first_token_s is not None and r.completion_tokens
        n = r.completion_tokens - 1
        mean = (r.end_s - r.first_token_s) / max(1, n)
        gaps = mean * rng.lognormal(-(sigma**2) / 2, sigma, n) if sigma else np.full(n, mean)
        out.append(dataclasses.replace(r, itl=ItlSummary.from_gaps(gaps.tolist())))
    return out


def fitted(records: list[RequestRecord], **kw: object) -> OnlineCalibrator:
    cal = OnlineCalibrator(**kw)  # type: ignore[arg-type]
    for rec in records:
        cal.observe(rec)
    return cal


def rel(a: float, b: float) -> float:
    return abs(a - b) / b


@pytest.mark.parametrize(
    ("changes", "kept"),
    [
        ({}, True),
        ({"outcome": Outcome.UPSTREAM_ERROR}, False),
        ({"outcome": Outcome.CLIENT_CANCELLED}, False),
        ({"streamed": False}, False),
        ({"dispatch_s": None}, False),
        ({"first_token_s": None}, False),
        ({"prompt_tokens": None}, False),
        ({"completion_tokens": None}, False),
        ({"inflight_requests": None}, False),
        ({"end_s": None}, True),  # the ITL summary stands in for the end
        ({"completion_tokens": 1, "itl": ItlSummary()}, True),  # TTFT row only
    ],
    ids=["ok", "error", "cancelled", "not-streamed", "no-dispatch", "no-first-token",
         "no-prompt", "no-completion", "no-load", "no-end", "one-token"],
)  # fmt: skip
def test_observe_keeps_only_usable_records(changes: dict[str, object], kept: bool) -> None:
    cal = fitted([good(**changes)])
    assert len(cal) == (1 if kept else 0)


def test_ring_is_bounded() -> None:
    cal = fitted([good(arrival_s=float(i)) for i in range(25)],
                 config=CalibratorConfig(capacity=10))  # fmt: skip
    assert len(cal) == 10


def test_no_data_returns_the_prior_untrusted() -> None:
    c = OnlineCalibrator(prior=TRUE).fit(now=0.0)
    assert c.step == TRUE and not c.trusted and c.n_records == 0
    assert c.ttft_mare is None and c.itl_mare is None and c.prior_share == 1.0


def test_prior_fills_what_the_data_cannot_say_and_fades() -> None:
    """Records from an idle engine (no concurrency) say nothing about the cost per running
    sequence: the prior keeps it. With varied load the data take over."""
    wrong = dataclasses.replace(TRUE, decode_s_per_seq=5e-4)
    records = exact(TRUE, 3000, seed=3)
    idle = [r for r in records if r.inflight_requests == 0][:3]
    few = fitted(idle, prior=wrong, config=NO_FORGET).fit()
    many = fitted(records, prior=wrong, config=NO_FORGET).fit()
    assert few.prior_share > 0.8 and not few.trusted
    assert rel(few.step.decode_s_per_seq, wrong.decode_s_per_seq) < 0.3
    assert many.prior_share < 0.01 and many.trusted
    assert rel(many.step.decode_s_per_seq, TRUE.decode_s_per_seq) < 0.10


@settings(max_examples=25, deadline=None)
@given(
    c0=st.floats(2e-3, 2e-2),
    cp=st.floats(1e-5, 3e-4),
    seq_share=st.floats(1.0, 4.0),
    kv_share=st.floats(0.5, 3.0),
    seed=st.integers(0, 1000),
)
def test_recovers_known_coefficients(
    c0: float, cp: float, seq_share: float, kv_share: float, seed: int
) -> None:
    """Each coefficient within 10% where the data carry it: at the mean load (24 running) the
    per-sequence costs are 1-4x ``c0``, and the KV read per sequence (``c_kv * ctx_bar``,
    ctx_bar ~ 4100) is 0.5-3x ``c_d`` (see Identifiability in the module docstring)."""
    cd = seq_share * c0 / 24 / (1 + kv_share)
    ckv = kv_share * cd / 4100
    true = StepModel(overhead_s=c0, prefill_s_per_token=cp, decode_s_per_seq=cd, kv_s_per_token=ckv)
    cal = fitted(exact(true, 6000, seed), config=NO_FORGET).fit()
    for got, want in zip(cal.step.coefficients(), true.coefficients(), strict=True):
        assert rel(got, want) < 0.10
    assert cal.trusted and cal.ttft_mare is not None and cal.ttft_mare < 0.05


def test_recovers_the_simulated_engine() -> None:
    """Records from the simulator (queueing, chunked prefill, batching, loads from 6% to 75%
    of saturation): every coefficient within 10%, and the predictions too."""
    cal = fitted(simulated(TRUE, [0.5, 1, 2, 3, 4, 5, 6])).fit(max_num_seqs=LIMITS.max_num_seqs)
    got = cal.step
    for g, want in zip(got.coefficients(), TRUE.coefficients(), strict=True):
        assert rel(g, want) < 0.10
    for batch in (1, 8, 24, 48):
        assert rel(got.itl_at(batch, 900), TRUE.itl_at(batch, 900)) < 0.05
    for prompt in (200, 1000, 4000):
        assert rel(got.ttft_alone(prompt), TRUE.ttft_alone(prompt)) < 0.05
    assert cal.trusted and cal.itl_mare is not None and cal.itl_mare < 0.02


log_uniform = st.floats(0.0, 1.0)


def _between(lo: float, hi: float, u: float) -> float:
    return float(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))


@settings(max_examples=8, deadline=None)
@given(c0=log_uniform, cp=log_uniform, cd=log_uniform, ckv=log_uniform)
def test_predicts_any_simulated_engine(c0: float, cp: float, cd: float, ckv: float) -> None:
    """Random engines (log-uniform coefficients over two decades each), records from the
    simulator at 10-70% of saturation: the fitted model predicts ITL and TTFT within 10%.
    (A coefficient whose term is negligible everywhere, e.g. a tiny ``c_d``, is free to be off.)"""
    true = StepModel(overhead_s=_between(2e-3, 3e-2, c0), prefill_s_per_token=_between(1e-5, 3e-4, cp),
                     decode_s_per_seq=_between(1e-5, 5e-4, cd),
                     kv_s_per_token=_between(1e-8, 5e-7, ckv))  # fmt: skip
    sat = saturation_rate(true, LIMITS, workload(0))
    cal = fitted(simulated(true, [f * sat for f in (0.1, 0.25, 0.4, 0.55, 0.7)])).fit(
        max_num_seqs=LIMITS.max_num_seqs
    )
    assert cal.trusted
    assert rel(cal.step.overhead_s, true.overhead_s) < 0.10
    for batch in (1, 8, 24, 48):
        assert rel(cal.step.itl_at(batch, 900), true.itl_at(batch, 900)) < 0.10
    for prompt in (200, 1000, 4000):  # the whole model: the fit may price some as attention
        assert rel(cal.step.ttft_idle(prompt), true.ttft_idle(prompt)) < 0.10


def test_follows_a_step_change_with_forgetting() -> None:
    """The engine becomes twice as slow (e.g. a smaller GPU). Four half-lives after the change
    the fit describes the new engine; without forgetting it is stuck between the two."""
    slower = StepModel(overhead_s=0.012, prefill_s_per_token=1.2e-4, decode_s_per_seq=2e-4,
                       kv_s_per_token=1e-7)  # fmt: skip
    before = simulated(TRUE, [1, 2, 3, 4])
    after = simulated(slower, [0.5, 1, 1.5, 2], offset=max(r.end_s or 0.0 for r in before) + 10)
    span = (after[-1].end_s or 0.0) - after[0].arrival_s
    records = before + after
    forgetting = fitted(records, config=CalibratorConfig(half_life_s=span / 4)).fit()
    no_forget = fitted(records, config=NO_FORGET).fit()
    for got, want in zip(forgetting.step.coefficients(), slower.coefficients(), strict=True):
        assert rel(got, want) < 0.10
    for batch in (1, 8, 24):
        assert rel(forgetting.step.itl_at(batch, 900), slower.itl_at(batch, 900)) < 0.10
    assert no_forget.step.itl_at(8, 900) < 0.9 * slower.itl_at(8, 900)


def test_robust_to_outliers() -> None:
    records = exact(TRUE, 3000, seed=5)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(records), 150, replace=False):  # 5% stalls: 30x TTFT
        r = records[i]
        ttft = (r.first_token_s or 0.0) - (r.dispatch_s or 0.0)
        records[i] = dataclasses.replace(r, first_token_s=(r.dispatch_s or 0.0) + 30 * ttft,
                                         end_s=(r.end_s or 0.0) + 29 * ttft)  # fmt: skip
    cal = fitted(records, config=NO_FORGET).fit()
    for got, want in zip(cal.step.coefficients(), TRUE.coefficients(), strict=True):
        assert rel(got, want) < 0.10
    assert cal.ttft_p90_re is not None and cal.ttft_p90_re < 0.2


def test_fit_is_reused_while_the_window_barely_changes() -> None:
    """Under 1% new records, under a minute later, same max_num_seqs: the same fit (a steady
    refresh then costs the projection only; bench/estimator_cost.py). Any of the three
    changing, or ``reuse=False``, refits."""
    records = exact(TRUE, 3000, seed=9)
    now = max(r.end_s or 0.0 for r in records)
    cal = fitted(records[:2000], config=NO_FORGET)
    first = cal.fit(now, max_num_seqs=8)
    for r in records[2000:2019]:  # 19 new: under 1% of 2019
        cal.observe(r)
    assert cal.fit(now, max_num_seqs=8) is first
    assert cal.fit(now + 30.0, max_num_seqs=8) is first
    later = cal.fit(now + 90.0, max_num_seqs=8)  # over a minute later
    assert later is not first and later.n_records == 2019
    other = cal.fit(now + 90.0, max_num_seqs=16)
    assert other is not later
    assert cal.fit(now + 90.0, max_num_seqs=16) is other
    assert cal.fit(now + 90.0, max_num_seqs=16, reuse=False) is not other
    for r in records[2019:2050]:  # 31 more: over 1% of 2050
        cal.observe(r)
    refit = cal.fit(now + 90.0, max_num_seqs=16)
    assert refit.n_records == 2050
    assert cal.fit(now, max_num_seqs=16) is not refit  # the clock went back: refit
    never = fitted(records[:2000], config=dataclasses.replace(NO_FORGET, refit_new_fraction=0.0))
    assert never.fit(now) is not never.fit(now)


def test_ring_wraps_at_its_capacity_and_still_fits() -> None:
    records = simulated(TRUE, [1, 3, 5, 6]) * 20  # about 110k records, wrapping the ring
    cal = fitted(records, prior=TRUE)
    assert len(cal) == 100_000
    fit = cal.fit()
    assert fit.n_records == 100_000 and fit.trusted


maybe_time = st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False))
maybe_count = st.one_of(st.none(), st.integers(0, 200_000))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.builds(
            good,
            dispatch_s=maybe_time,
            first_token_s=maybe_time,
            end_s=maybe_time,
            prompt_tokens=maybe_count,
            completion_tokens=maybe_count,
            cached_tokens=maybe_count,
            inflight_requests=st.one_of(st.none(), st.integers(0, 10_000)),
            itl=st.builds(
                ItlSummary,
                count=st.integers(0, 10),
                mean=st.one_of(st.none(), st.floats(0, 10, allow_nan=False)),
            ),
        ),
        max_size=40,
    ),
    st.one_of(st.none(), st.integers(1, 512)),
)
def test_garbage_in_never_raises(records: list[RequestRecord], max_num_seqs: int | None) -> None:
    """Clock skew, zero tokens, cached > prompt: observe and fit stay total functions."""
    cal = fitted(records, prior=TRUE, config=CalibratorConfig(capacity=16))
    c = cal.fit(max_num_seqs=max_num_seqs)
    assert all(math.isfinite(v) and v >= 0 for v in c.step.coefficients())
    assert c.n_records <= 16


@pytest.mark.parametrize("sigma", [0.0, 0.1, 0.3])
def test_learns_the_step_jitter_from_the_records_itl_spread(sigma: float) -> None:
    records = with_jitter(exact(TRUE, 600, seed=4), sigma, seed=5)
    step = fitted(records, prior=TRUE, config=NO_FORGET).fit().step
    assert step.jitter_sigma == pytest.approx(sigma, abs=0.02 + 0.1 * sigma)
    assert rel(step.overhead_s, TRUE.overhead_s) < 0.1  # the coefficients are unaffected


def test_no_itl_spread_means_no_jitter() -> None:
    assert fitted(exact(TRUE, 200, seed=6), prior=TRUE).fit().step.jitter_sigma == 0.0


@pytest.mark.parametrize("sigma", [0.0, 0.1, 0.2])
def test_learns_the_speed_drift_from_residuals_shared_in_time(sigma: float) -> None:
    """Records of a simulated engine whose speed wanders (log sd ``sigma``, 5 s correlation):
    the drift comes back within -50%/+30% (a record's mean ITL averages the wandering over its
    decode, so the estimate runs low), the step coefficients stay close, and a steady engine
    shows (almost) none."""
    true = dataclasses.replace(TRUE, drift_sigma=sigma, drift_tau_s=5.0)
    step = fitted(simulated(true, [3.0]), prior=TRUE, config=NO_FORGET).fit(max_num_seqs=64).step
    if sigma == 0.0:
        assert step.drift_sigma < 0.04
    else:
        assert 0.5 * sigma <= step.drift_sigma <= 1.3 * sigma
        assert 0.5 <= step.drift_tau_s <= 30.0
    assert rel(step.overhead_s, TRUE.overhead_s) < 0.25


# --- issue 14: the prefill attention term and offsets the prior fixes ----------------------


def test_attention_term_is_learned_from_a_mix_of_prompt_lengths() -> None:
    """An engine whose prefill is quadratic: with prompts of 256 and 2048 tokens the fit
    tells the attention pairs from the linear tokens, and long prompts' TTFTs come out right;
    without the term (the calibrator before issue 14) long prompts are under-predicted."""
    true = dataclasses.replace(TRUE, prefill_attn_s_per_pair=4e-8)
    wl = Workload(prompt_tokens=np.array([256, 2048] * 200), output_tokens=np.array([60] * 400))
    records: list[RequestRecord] = []
    offset = 0.0
    for k, rate in enumerate([0.5, 1.5, 3.0]):
        _, tr = simulate_trace(true, LIMITS, wl, rate, n_requests=800, seed=k)
        records += from_trace(tr, offset)
        offset += float(np.nanmax(tr.finish_s)) + 10.0
    with_attn = fitted(records, config=NO_FORGET).fit()
    without = fitted(records, config=dataclasses.replace(NO_FORGET, fit_attention=False)).fit()
    assert rel(with_attn.step.prefill_attn_s_per_pair, 4e-8) < 0.3
    assert without.step.prefill_attn_s_per_pair == 0.0
    want = true.ttft_idle(2048)
    assert rel(with_attn.step.ttft_idle(2048), want) < 0.05
    assert without.step.ttft_idle(2048) < with_attn.step.ttft_idle(2048)


def test_a_wrong_per_request_cost_in_the_profile_is_learned_not_forced() -> None:
    """The profile says 30 ms of API cost per request, the engine has 2 ms (its TTFTs are
    shorter than the profile's cost): with the profile's cost fixed, the fit had to shrink
    ``c0`` and was never trusted; the calibrator learns the cost instead, and the step
    coefficients come back."""
    true = dataclasses.replace(TRUE, request_overhead_s=0.002)
    records = simulated(true, [0.5, 2.0, 4.0])
    prior = dataclasses.replace(TRUE, request_overhead_s=0.03)
    cal = fitted(records, prior=prior, config=NO_FORGET).fit(max_num_seqs=LIMITS.max_num_seqs)
    assert cal.trusted
    assert cal.step.request_overhead_s < 0.01
    assert rel(cal.step.overhead_s, TRUE.overhead_s) < 0.15
    assert rel(cal.step.itl_at(8, 512), TRUE.itl_at(8, 512)) < 0.1
    # the same engine under a profile that is right keeps the profile's cost exactly
    right = fitted(records, prior=true, config=NO_FORGET).fit(max_num_seqs=LIMITS.max_num_seqs)
    assert right.trusted and right.step.request_overhead_s == 0.002


def test_prior_offsets_are_carried_and_not_fitted_twice() -> None:
    """A prior's per-request cost is a known part of every TTFT: a fit on records of an
    engine with that cost returns the same cost and the other coefficients unchanged."""
    api = 0.02
    true = dataclasses.replace(TRUE, request_overhead_s=api)
    records = simulated(true, [0.5, 2.0])
    prior = dataclasses.replace(TRUE, request_overhead_s=api)
    cal = fitted(records, prior=prior, config=NO_FORGET).fit()
    assert cal.step.request_overhead_s == api
    assert rel(cal.step.prefill_s_per_token, TRUE.prefill_s_per_token) < 0.15
    assert rel(cal.step.overhead_s, TRUE.overhead_s) < 0.15
    ratios = cal.vs_prior()
    assert all(0.8 < ratios[k] < 1.25 for k in ("itl_batch8", "prefill_1024"))
