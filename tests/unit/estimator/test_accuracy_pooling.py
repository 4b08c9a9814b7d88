"""The accuracy benchmark's own arithmetic (tests/support/accuracy.py, run by bench/estimator_accuracy.py): the engine's speed
change between phases, and the pooling of several seeds' ramps. No server: simulated records
and hand-made steps."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from estimator.engine import StepModel
from estimator.records import ItlSummary, RequestRecord
from estimator.simulate import EngineLimits, Workload, simulate_trace
from tests.support import accuracy as ea

STEP = StepModel(overhead_s=0.008, prefill_s_per_token=4e-4, decode_s_per_seq=2e-4,
                 kv_s_per_token=2e-6)  # fmt: skip
LIMITS = EngineLimits(max_num_seqs=8, kv_capacity_tokens=65536)


def records(step: StepModel, rate: float, seed: int) -> list[RequestRecord]:
    """What the proxy would record in front of a simulated engine with ``step``."""
    rng = np.random.default_rng(seed)
    wl = Workload(
        prompt_tokens=rng.integers(100, 600, 500), output_tokens=rng.integers(32, 128, 500)
    )
    _, tr = simulate_trace(step, LIMITS, wl, rate, n_requests=200, seed=seed)
    out = []
    for i in np.flatnonzero(np.isfinite(tr.first_token_s)):
        c, f, e = int(tr.output_tokens[i]), float(tr.first_token_s[i]), float(tr.finish_s[i])
        out.append(RequestRecord(
            request_id=str(i), model="m", streamed=True, arrival_s=float(tr.arrival_s[i]),
            dispatch_s=float(tr.arrival_s[i]), first_token_s=f, end_s=e,
            prompt_tokens=int(tr.prompt_tokens[i]), completion_tokens=c,
            itl=ItlSummary(count=c - 1, mean=(e - f) / (c - 1)),
            inflight_requests=int(tr.inflight_at_arrival[i]),
        ))  # fmt: skip
    return out


def slower(step: StepModel, factor: float) -> StepModel:
    return StepModel.from_coefficients([c * factor for c in step.coefficients()])


def test_engine_speed_change_measures_a_slower_engine_and_not_the_load() -> None:
    low = records(STEP, 0.8, seed=1)
    # the same engine at three times the rate: the load changes, the speed does not
    assert abs(ea.engine_speed_change(records(STEP, 2.4, seed=2), low, 8)) < 0.05
    # an engine 20% slower in every coefficient, at the same high rate
    change = ea.engine_speed_change(records(slower(STEP, 1.2), 2.4, seed=3), low, 8)
    assert change == pytest.approx(0.2, abs=0.05)
    # too few records to fit: unknown, not zero
    assert math.isnan(ea.engine_speed_change(low[:5], low, 8))


def step(factor: float, ttft: list[float], gaps: list[float], **kw: float) -> ea.StepResult:
    t95, i95 = ea._q(ttft, 0.95), ea._q(gaps, 0.95)
    return ea.StepResult(
        factor=factor, rate_rps=factor * 2.0, achieved_rps=math.nan, n=len(ttft),
        n_ok=len(ttft), ttft_p50_s=ea._q(ttft, 0.5), ttft_p95_s=t95, itl_p50_s=ea._q(gaps, 0.5),
        itl_p95_s=i95, itl_p95_per_chunk_s=math.nan, tokens_per_chunk=1.0, duration_s=10.0,
        slo_ratio=max(t95 / 1.0, i95 / 0.06), ttft_samples=tuple(ttft), itl_samples=tuple(gaps),
        **kw,
    )  # fmt: skip


def outcome(seed: int, capacity: float, steps: list[ea.StepResult]) -> ea.Outcome_:
    at = {"0.5": {"rate_rps": capacity / 2, "ttft_p95_s": 0.3, "itl_p95_s": 0.02},
          "0.8": {"rate_rps": capacity * 0.8, "ttft_p95_s": 0.5, "itl_p95_s": 0.03}}  # fmt: skip
    pred = ea.Prediction(
        capacity_rps=capacity, limiting="ttft", fit_source="calibrated", fit_error_p50=0.05,
        fit_error_p90=0.2, step={}, records=100, mean_prompt=230.0, mean_output=80.0,
        kv_capacity_tokens=65536, at_rates=at, report_capacity_rps=capacity,
        default_capacity_rps=capacity,
    )  # fmt: skip
    low = step(0.0, [0.1] * 20, [0.01] * 100)
    measured, note = ea.crossing(steps)
    o = ea.Outcome_(
        settings=ea.Settings(seed=seed), prediction=pred, low=low, steps=steps,
        measured_capacity_rps=measured, crossing_note=note, loadavg_start=(0.0, 0.0, 0.0),
        loadavg_end=(0.0, 0.0, 0.0), snapshot={}, phases_s={},
    )  # fmt: skip
    o.compare()
    return o


def test_pool_judges_the_targets_on_the_pooled_requests() -> None:
    rng = np.random.default_rng(0)

    def draws(scale: float, n: int = 100) -> list[float]:
        return (scale * rng.lognormal(0.0, 0.3, n)).tolist()

    # two runs; seed 2's 0.8 C step met a burst (TTFT twice as long), and only seed 1's
    # ramp was extended (its 1.3 C step is not pooled)
    a = outcome(1, 2.0, [
        step(0.5, draws(0.2), draws(0.015, 400), engine_speed_change=0.1),
        step(0.8, draws(0.35), draws(0.02, 400), engine_speed_change=0.1),
        step(1.1, draws(1.0), draws(0.03, 400)),
        step(1.3, draws(2.0), draws(0.05, 400)),
    ])  # fmt: skip
    b = outcome(2, 2.2, [
        step(0.5, draws(0.2), draws(0.015, 400), engine_speed_change=-0.1),
        step(0.8, draws(0.7), draws(0.02, 400), engine_speed_change=-0.1),
        step(1.1, draws(1.0), draws(0.03, 400)),
    ])  # fmt: skip
    p = ea.pool([a, b])
    assert p.seeds == [1, 2]
    assert [st.factor for st in p.steps] == [0.5, 0.8, 1.1]
    at8 = p.steps[1]
    ttft = [*a.steps[1].ttft_samples, *b.steps[1].ttft_samples]
    assert at8.n == 200 and at8.ttft_p95_s == ea._q(ttft, 0.95)
    gaps = [*a.steps[1].itl_samples, *b.steps[1].itl_samples]
    assert at8.itl_p95_s == ea._q(gaps, 0.95)
    assert at8.engine_speed_change == pytest.approx(0.0)
    assert math.isnan(p.steps[2].engine_speed_change)
    checks = {c["name"]: c for c in p.checks}
    cap = checks["capacity_rps"]
    fx, _ = ea.crossing(p.steps)
    assert fx is not None and p.crossing_factor == fx
    assert cap["rel_error"] == pytest.approx(1 / fx - 1)
    assert cap["predicted"] == pytest.approx(2.1) and cap["measured"] == pytest.approx(2.1 * fx)
    assert cap["ok"] == (abs(1 / fx - 1) <= ea.CAPACITY_TOL)
    assert len(cap["per_run"]) == 2
    t8 = checks["ttft_p95_s@0.8C"]
    assert t8["measured"] == at8.ttft_p95_s and t8["predicted"] == pytest.approx(0.5)
    assert t8["rel_error"] == pytest.approx((0.5 - at8.ttft_p95_s) / at8.ttft_p95_s)
    assert t8["per_run"] == [
        c["rel_error"] for o in (a, b) for c in o.checks if c["name"] == "ttft_p95_s@0.8C"
    ]
    text = ea.render_pooled(p)
    assert "pooled over seeds 1, 2" in text and "ttft_p95_s@0.8C" in text
    # what --json writes: no raw samples, no NaN
    doc = ea._clean({**dataclasses.asdict(p), "steps": [ea._step_json(x) for x in p.steps]})
    assert "ttft_samples" not in doc["steps"][0]
    assert doc["steps"][2]["engine_speed_change"] is None


def test_pool_falls_back_on_the_runs_own_crossings() -> None:
    # every common step meets the SLO; each run crossed in a step of its own extension
    ok, slow = [0.1] * 40, [3.0] * 40
    a = outcome(1, 2.0, [step(0.5, ok, [0.01] * 50), step(1.1, ok, [0.01] * 50),
                         step(1.2, slow, [0.01] * 50)])  # fmt: skip
    b = outcome(2, 2.0, [step(0.5, ok, [0.01] * 50), step(1.1, ok, [0.01] * 50),
                         step(1.4, slow, [0.01] * 50)])  # fmt: skip
    assert a.measured_capacity_rps and b.measured_capacity_rps
    p = ea.pool([a, b])
    f = (a.measured_capacity_rps + b.measured_capacity_rps) / 2 / 2.0
    assert p.crossing_factor == pytest.approx(f) and "2 of 2 runs" in p.crossing_note
    assert p.checks[0]["rel_error"] == pytest.approx(1 / f - 1)
