"""Load conditions (estimator.loads): burst, closed-loop concurrency and Poisson rate, and
their statistics. Physics and bookkeeping only: no fitted numbers, no timings."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estimator.engine import StepModel
from estimator.loads import Load, simulate_load
from estimator.simulate import EngineLimits, Workload

STEP = StepModel(overhead_s=0.006, prefill_s_per_token=6e-5, decode_s_per_seq=1e-4,
                 kv_s_per_token=1e-7)  # fmt: skip
LIMITS = EngineLimits(max_num_seqs=64, kv_capacity_tokens=200_000, block_size=16,
                      max_num_batched_tokens=4096)  # fmt: skip
WL = Workload.fixed(400, 100)


def test_burst_counts_every_request_and_divides_tokens_by_the_whole_run() -> None:
    r = simulate_load(STEP, LIMITS, WL, Load.burst(300))
    assert r.n_requests == r.n_counted == 300
    assert r.output_tokens_per_s == pytest.approx(300 * 100 / r.duration_s)
    assert r.peak_running == LIMITS.max_num_seqs
    assert r.ttft.p50 <= r.ttft.p90 <= r.ttft.p95 <= r.ttft.p99


@pytest.mark.parametrize("clients", [1, 4, 16])
def test_closed_loop_keeps_n_in_flight_littles_law(clients: int) -> None:
    r = simulate_load(STEP, LIMITS, WL, Load.concurrency(clients), n_requests=400)
    assert r.peak_running <= clients
    # Little's law: in flight = throughput x time in system
    assert r.requests_per_s * r.e2e.mean == pytest.approx(clients, rel=0.15)


def test_one_client_sees_the_idle_engine() -> None:
    r = simulate_load(STEP, LIMITS, WL, Load.concurrency(1), n_requests=50)
    assert r.ttft.mean == pytest.approx(STEP.ttft_idle(400), rel=1e-6)
    assert r.itl.mean == pytest.approx(STEP.itl_at(1, 450), rel=0.05)


def test_request_overhead_adds_to_ttft_and_e2e_not_to_itl() -> None:
    slow_api = dataclasses.replace(STEP, request_overhead_s=0.05)
    a = simulate_load(STEP, LIMITS, WL, Load.concurrency(1), n_requests=40)
    b = simulate_load(slow_api, LIMITS, WL, Load.concurrency(1), n_requests=40)
    assert b.ttft.mean - a.ttft.mean == pytest.approx(0.05, rel=1e-6)
    assert b.e2e.mean - a.e2e.mean == pytest.approx(0.05, rel=1e-6)
    assert b.itl.mean == pytest.approx(a.itl.mean, rel=1e-9)


def test_guaranteed_no_evict_never_preempts_and_bounds_the_batch() -> None:
    tight = dataclasses.replace(LIMITS, kv_capacity_tokens=16 * 200)  # 200 blocks
    fcfs = simulate_load(STEP, tight, Workload.fixed(160, 800), Load.burst(60))
    gne = simulate_load(STEP, dataclasses.replace(tight, reserve_output=True),
                        Workload.fixed(160, 800), Load.burst(60))  # fmt: skip
    assert fcfs.preemptions > 0
    assert gne.preemptions == 0
    assert gne.peak_running <= 200 // (960 // 16)


def test_poisson_below_saturation_delivers_the_offered_rate() -> None:
    r = simulate_load(STEP, LIMITS, WL, Load.poisson(2.0), n_requests=600)
    assert r.requests_per_s == pytest.approx(2.0, rel=0.15)


@settings(max_examples=25, deadline=None)
@given(clients=st.integers(1, 40), prompt=st.integers(16, 2000), output=st.integers(2, 300))
def test_more_clients_never_lower_throughput_much(clients: int, prompt: int, output: int) -> None:
    wl = Workload.fixed(prompt, output)
    one = simulate_load(STEP, LIMITS, wl, Load.concurrency(clients), n_requests=4 * clients + 20)
    two = simulate_load(STEP, LIMITS, wl, Load.concurrency(2 * clients),
                        n_requests=8 * clients + 20)  # fmt: skip
    assert two.output_tokens_per_s >= 0.8 * one.output_tokens_per_s


def test_load_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Load.poisson(0.0)
    with pytest.raises(ValueError):
        Load("burst", 2.5)
    r = simulate_load(STEP, LIMITS, WL, Load.burst(10))
    lo, hi = r.band("throughput")
    assert lo <= r.output_tokens_per_s <= hi


def test_a_burst_queues_at_the_api_server() -> None:
    """The API server's serialised work caps the request rate at 1 / api_service_s and
    puts the queue in every request's TTFT; one request alone sees only the latency."""
    api = dataclasses.replace(STEP, request_overhead_s=0.03, api_service_s=0.01)
    fast = dataclasses.replace(STEP, overhead_s=1e-4, decode_s_per_seq=1e-6, kv_s_per_token=0.0,
                               prefill_s_per_token=1e-7)  # fmt: skip
    fast_api = dataclasses.replace(fast, request_overhead_s=0.03, api_service_s=0.01)
    r = simulate_load(fast_api, LIMITS, Workload.fixed(100, 20), Load.burst(200))
    assert r.requests_per_s <= 1 / 0.01 * 1.01
    assert r.ttft.mean > 0.5 * 200 * 0.01  # the n-th request waits for n - 1 ahead of it
    one = simulate_load(api, LIMITS, WL, Load.concurrency(1), n_requests=20)
    base = simulate_load(STEP, LIMITS, WL, Load.concurrency(1), n_requests=20)
    assert one.ttft.mean - base.ttft.mean == pytest.approx(0.03, rel=1e-6)
