"""Engine simulator: exact on small cases, equal to a naive per-sequence reference, conserving
requests and tokens, honouring limits, and fast."""

from __future__ import annotations

import dataclasses
import math
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estimator.engine import StepModel
from estimator.simulate import EngineLimits, Workload, simulate, simulate_trace

STEP = StepModel(overhead_s=0.006, prefill_s_per_token=6e-5, decode_s_per_seq=1e-4,
                 kv_s_per_token=5e-8)  # fmt: skip
BIG = EngineLimits(max_num_seqs=128, kv_capacity_tokens=400_000)


def lognormal_workload(seed: int = 1, prompt: float = 800, output: float = 200) -> Workload:
    rng = np.random.default_rng(seed)
    return Workload(prompt_tokens=rng.lognormal(math.log(prompt), 0.8, 4000).astype(int) + 1,
                    output_tokens=rng.lognormal(math.log(output), 0.7, 4000).astype(int) + 1)  # fmt: skip


def reference(
    step: StepModel,
    lim: EngineLimits,
    arrivals: list[float],
    prompts: list[int],
    outputs: list[int],
) -> tuple[list[float], list[float], list[int], int]:
    """A naive per-sequence simulator with the documented policy: (first, finish, emitted, preemptions)."""
    n, bs, hit = len(arrivals), lim.block_size, lim.prefix_cache_hit_ratio
    free, t, nxt, preempt = lim.num_blocks, 0.0, 0, 0
    cur, done, emitted, kv, blocks = list(prompts), [0] * n, [0] * n, [0] * n, [0] * n
    state, first, fin = [""] * n, [math.nan] * n, [math.nan] * n
    waiting: deque[int] = deque()
    running: list[int] = []

    def unc(i: int) -> int:
        return max(1, cur[i] - int(prompts[i] * hit))

    while True:
        while nxt < n and arrivals[nxt] <= t:
            waiting.append(nxt)
            nxt += 1
        if not running and not waiting:
            if nxt >= n:
                return first, fin, emitted, preempt
            t = arrivals[nxt]
            continue
        while sum(kv[i] % bs == 0 for i in running if state[i] == "dec") > free:
            v = running.pop()
            free += blocks[v]
            cur[v], done[v], state[v] = prompts[v] + emitted[v], 0, ""
            waiting.appendleft(v)
            preempt += 1
        dec = [i for i in running if state[i] == "dec"]
        budget = lim.max_num_batched_tokens - len(dec)
        chunks = []
        for i in running:
            if state[i] == "pre" and budget > 0:
                chunks.append((i, min(unc(i) - done[i], budget)))
                budget -= chunks[-1][1]
        while waiting and budget > 0 and len(running) < lim.max_num_seqs:
            i = waiting[0]
            nb = -(-cur[i] // bs)
            if nb > lim.num_blocks:
                waiting.popleft()
                fin[i] = t
                continue
            if nb > free:
                break
            waiting.popleft()
            free, blocks[i], state[i] = free - nb, nb, "pre"
            running.append(i)
            chunks.append((i, min(unc(i), budget)))
            budget -= chunks[-1][1]
        t += step.step_time(sum(c for _, c in chunks), len(dec), sum(kv[i] for i in dec))
        for i in dec:
            if kv[i] % bs == 0:
                blocks[i], free = blocks[i] + 1, free - 1
            kv[i], emitted[i] = kv[i] + 1, emitted[i] + 1
            if emitted[i] >= outputs[i]:
                fin[i], free = t, free + blocks[i]
                running.remove(i)
        for i, c in chunks:
            done[i] += c
            if done[i] >= unc(i):
                emitted[i] += 1
                first[i] = t if math.isnan(first[i]) else first[i]
                if emitted[i] >= outputs[i]:
                    fin[i], free = t, free + blocks[i]
                    running.remove(i)
                else:
                    state[i], kv[i] = "dec", cur[i]


def test_one_request_alone_is_exact() -> None:
    res, tr = simulate_trace(STEP, BIG, Workload.fixed(100, 50), 0.01, n_requests=1)
    ttft = STEP.step_time(100, 0, 0)
    decode = sum(STEP.step_time(0, 1, 100 + j) for j in range(49))
    assert tr.first_token_s[0] - tr.arrival_s[0] == pytest.approx(ttft)
    assert tr.finish_s[0] - tr.arrival_s[0] == pytest.approx(ttft + decode)
    assert res.output_tokens == 50 and res.n_finished == 1 and res.preemptions == 0


def test_sparse_requests_each_see_an_idle_engine() -> None:
    _, tr = simulate_trace(STEP, BIG, Workload.fixed(300, 120), 0.001, n_requests=30)
    e2e = STEP.step_time(300, 0, 0) + sum(STEP.step_time(0, 1, 300 + j) for j in range(119))
    np.testing.assert_allclose(tr.finish_s - tr.arrival_s, e2e, rtol=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 40),
    rate=st.floats(0.5, 200.0),
    max_seqs=st.integers(1, 16),
    kv_blocks=st.integers(40, 400),
    block=st.sampled_from([1, 4, 16]),
    budget=st.sampled_from([16, 64, 512, 8192]),
    hit=st.sampled_from([0.0, 0.5]),
)
def test_matches_naive_reference(
    seed: int, n: int, rate: float, max_seqs: int, kv_blocks: int, block: int, budget: int,
    hit: float,
) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    wl = Workload(prompt_tokens=rng.integers(1, 200, 50), output_tokens=rng.integers(1, 120, 50))
    lim = EngineLimits(max_num_seqs=max_seqs, kv_capacity_tokens=kv_blocks * block,
                       block_size=block, max_num_batched_tokens=max(budget, max_seqs),
                       prefix_cache_hit_ratio=hit)  # fmt: skip
    res, tr = simulate_trace(STEP, lim, wl, rate, n_requests=n, seed=seed)
    prompts, outputs, gaps = wl.draw(n, seed)
    first, fin, emitted, pre = reference(STEP, lim, (np.cumsum(gaps) / rate).tolist(),
                                         prompts.tolist(), outputs.tolist())  # fmt: skip
    np.testing.assert_allclose(tr.first_token_s, first, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(tr.finish_s, fin, rtol=1e-9, atol=1e-9)
    assert tr.output_tokens.tolist() == emitted
    assert res.preemptions == pre


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rate=st.floats(0.1, 100.0),
    max_seqs=st.integers(1, 64),
    kv_tokens=st.integers(2_000, 100_000),
    prompt=st.integers(1, 1500),
    output=st.integers(1, 400),
)
def test_conservation(
    seed: int, rate: float, max_seqs: int, kv_tokens: int, prompt: int, output: int
) -> None:
    """Every request finishes and produces exactly its output tokens, even with preemption."""
    lim = EngineLimits(max_num_seqs=max_seqs, kv_capacity_tokens=kv_tokens)
    rng = np.random.default_rng(seed)
    wl = Workload(prompt_tokens=rng.integers(1, prompt + 1, 64),
                  output_tokens=rng.integers(1, output + 1, 64))  # fmt: skip
    res, tr = simulate_trace(STEP, lim, wl, rate, n_requests=150, seed=seed)
    assert res.n_finished == 150 and res.n_truncated == 0
    assert res.output_tokens == int(tr.output_tokens.sum())
    assert tr.output_tokens.sum() == wl.draw(150, seed)[1].sum()
    assert np.all(tr.first_token_s >= tr.arrival_s) and np.all(tr.finish_s >= tr.first_token_s)
    assert res.peak_running <= max_seqs
    assert 0.0 <= res.peak_kv_usage <= 1.0


def test_too_long_requests_are_truncated_not_hung() -> None:
    lim = EngineLimits(max_num_seqs=4, kv_capacity_tokens=256)
    res = simulate(STEP, lim, Workload.fixed(1000, 10), 1.0, n_requests=5)
    assert res.n_truncated == 5 and res.output_tokens == 0
    grows = simulate(STEP, lim, Workload.fixed(200, 200), 1.0, n_requests=5)
    assert grows.n_finished == 5 and grows.n_truncated == 5 and grows.preemptions > 0


def test_small_kv_cache_preempts_and_limits_batch() -> None:
    wl = lognormal_workload()
    roomy = simulate(STEP, BIG, wl, 8.0)
    tight = simulate(STEP, EngineLimits(max_num_seqs=128, kv_capacity_tokens=30_000), wl, 8.0)
    assert roomy.preemptions == 0 and tight.preemptions > 0
    assert tight.kv_bound and not roomy.kv_bound
    assert tight.ttft_p95_s > roomy.ttft_p95_s


@pytest.mark.parametrize(("rate", "stable"), [(1.0, True), (4.0, True), (20.0, False),
                                              (60.0, False)])  # fmt: skip
def test_stability_flag(rate: float, stable: bool) -> None:
    assert simulate(STEP, BIG, lognormal_workload(), rate).stable is stable


def test_latency_grows_with_load_and_prefix_cache_helps() -> None:
    wl = lognormal_workload()
    lo, hi = simulate(STEP, BIG, wl, 1.0), simulate(STEP, BIG, wl, 8.0)
    assert hi.ttft_p95_s > lo.ttft_p95_s and hi.itl_p95_s > lo.itl_p95_s
    assert hi.mean_running > lo.mean_running
    cached = EngineLimits(max_num_seqs=128, kv_capacity_tokens=400_000, prefix_cache_hit_ratio=0.6)
    assert simulate(STEP, cached, wl, 1.0).ttft_p50_s < lo.ttft_p50_s
    assert lo.throughput_rps == pytest.approx(1.0, rel=0.1)
    assert lo.output_tokens_per_s == pytest.approx(lo.throughput_rps * wl.mean_output, rel=0.1)


def test_quantiles_are_ordered() -> None:
    r = simulate(STEP, BIG, lognormal_workload(), 5.0, quantile=0.9)
    assert r.ttft_p50_s <= r.ttft_q_s <= r.ttft_p95_s <= r.ttft_p99_s
    assert r.itl_p50_s <= r.itl_q_s <= r.itl_p95_s
    assert r.e2e_p50_s <= r.e2e_p95_s


def test_same_seed_same_result() -> None:
    wl = lognormal_workload()
    assert simulate(STEP, BIG, wl, 3.0, seed=7) == simulate(STEP, BIG, wl, 3.0, seed=7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_num_seqs": 0, "kv_capacity_tokens": 100}, "max_num_seqs"),
        ({"max_num_seqs": 4, "kv_capacity_tokens": 8}, "one block"),
        ({"max_num_seqs": 64, "kv_capacity_tokens": 1000, "max_num_batched_tokens": 32},
         "max_num_batched_tokens"),
        ({"max_num_seqs": 4, "kv_capacity_tokens": 1000, "prefix_cache_hit_ratio": 1.0},
         "prefix_cache"),
    ],
    ids=["seqs", "kv", "budget", "hit"],
)  # fmt: skip
def test_limits_validation(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EngineLimits(**kwargs)  # type: ignore[arg-type]


def test_workload_validation_and_bursts() -> None:
    with pytest.raises(ValueError, match="equal-length"):
        Workload(prompt_tokens=np.array([1, 2]), output_tokens=np.array([1]))
    with pytest.raises(ValueError, match="arrival_cv"):
        Workload.fixed(10, 10, arrival_cv=0.0)
    with pytest.raises(ValueError, match="rate"):
        simulate(STEP, BIG, Workload.fixed(10, 10), 0.0)
    gaps = Workload.fixed(10, 10, arrival_cv=3.0).draw(20_000, 0)[2]
    assert gaps.mean() == pytest.approx(1.0, rel=0.05)
    assert gaps.std() == pytest.approx(3.0, rel=0.15)
    bursty = simulate(STEP, BIG, Workload(prompt_tokens=lognormal_workload().prompt_tokens,
                      output_tokens=lognormal_workload().output_tokens, arrival_cv=3.0), 4.0)  # fmt: skip
    assert bursty.ttft_p95_s > simulate(STEP, BIG, lognormal_workload(), 4.0).ttft_p95_s


def test_step_jitter_widens_itl_quantiles_and_the_prefills_ttft() -> None:
    """Sparse requests decode alone at an almost constant step: the jittered ITL quantiles are
    those of a mean-one lognormal factor on that step, and each TTFT is one prefill step drawn
    with that factor (its noise does not average out); throughput does not move."""
    sigma = 0.2
    jittery = dataclasses.replace(STEP, jitter_sigma=sigma)
    args = (BIG, Workload.fixed(300, 120), 0.01)
    plain, noisy = simulate(STEP, *args, n_requests=400), simulate(jittery, *args, n_requests=400)
    step, prefill = STEP.step_time(0, 1, 360), STEP.step_time(300, 0, 0)
    assert plain.itl_p95_s == pytest.approx(step, rel=0.01)
    z95 = 1.6448536
    assert noisy.itl_p95_s == pytest.approx(step * math.exp(z95 * sigma - sigma**2 / 2), rel=0.02)
    assert noisy.itl_p50_s == pytest.approx(step * math.exp(-(sigma**2) / 2), rel=0.02)
    assert plain.ttft_p95_s == pytest.approx(prefill, rel=1e-6)
    assert noisy.ttft_p95_s == pytest.approx(
        prefill * math.exp(z95 * sigma - sigma**2 / 2), rel=0.08
    )
    assert noisy.ttft_p50_s == pytest.approx(prefill * math.exp(-(sigma**2) / 2), rel=0.05)
    assert noisy.throughput_rps == pytest.approx(plain.throughput_rps, rel=1e-3)


def test_speed_drift_path_is_a_median_one_ar1_with_the_given_sigma_and_tau() -> None:
    from estimator.simulate import _Drift

    sigma, tau = 0.2, 8.0
    d = _Drift(sigma, tau, seed=3)
    x = np.log([d.factor(k * d.block_s) for k in range(40_000)])
    assert np.median(x) == pytest.approx(0.0, abs=0.01)  # median one
    assert x.std() == pytest.approx(sigma, rel=0.05)
    lag = round(tau / d.block_s)  # one correlation time: correlation 1/e
    assert np.corrcoef(x[:-lag], x[lag:])[0, 1] == pytest.approx(math.exp(-1), abs=0.03)
    assert d.factor(5.0) == _Drift(sigma, tau, seed=3).factor(5.0)  # reproducible by seed
    assert d.block_end(5.0) == pytest.approx((int(5.0 // d.block_s) + 1) * d.block_s)


def test_speed_drift_moves_tail_latency_near_capacity_not_throughput_at_low_load() -> None:
    """A wandering speed leaves a lightly loaded engine's throughput alone but, near capacity,
    a slow spell builds a queue: p95 TTFT and ITL rise; with the same seed, runs repeat."""
    drifting = dataclasses.replace(STEP, drift_sigma=0.25, drift_tau_s=20.0)
    wl = lognormal_workload()
    light = (simulate(STEP, BIG, wl, 1.0, n_requests=600, seed=2),
             simulate(drifting, BIG, wl, 1.0, n_requests=600, seed=2))  # fmt: skip
    assert light[1].throughput_rps == pytest.approx(light[0].throughput_rps, rel=0.02)
    near = (simulate(STEP, BIG, wl, 6.0, n_requests=2000, seed=2),
            simulate(drifting, BIG, wl, 6.0, n_requests=2000, seed=2))  # fmt: skip
    assert near[1].ttft_p95_s > 1.1 * near[0].ttft_p95_s
    assert near[1].itl_p95_s > 1.15 * near[0].itl_p95_s
    again = simulate(drifting, BIG, wl, 6.0, n_requests=2000, seed=2)
    assert again.ttft_p95_s == near[1].ttft_p95_s


def test_speed_drift_agrees_with_the_naive_per_step_product() -> None:
    """Closed-form decode runs are cut at the drift's block edges: a lone request's decode
    takes the sum of its step times, each times the factor of the block it starts in."""
    from estimator.simulate import _Drift

    drifting = dataclasses.replace(STEP, drift_sigma=0.3, drift_tau_s=0.4)
    _, tr = simulate_trace(drifting, BIG, Workload.fixed(100, 400), 1e-6, n_requests=1, seed=5)
    d = _Drift(0.3, 0.4, seed=5)
    t = float(tr.arrival_s[0])
    t += STEP.step_time(100, 0, 0) * d.factor(t)
    assert tr.first_token_s[0] == pytest.approx(t)
    for g in range(399):
        t += STEP.step_time(0, 1, 100 + g) * d.factor(t)
    assert tr.finish_s[0] == pytest.approx(t, rel=1e-9)
