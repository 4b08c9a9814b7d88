"""Capacity at the SLO: bracketing + bisection on the simulator, and its physics."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estimator.capacity import (
    Slo,
    SloUnreachable,
    latency_curve,
    max_rate_at_slo,
    replicas_needed,
    saturation_rate,
)
from estimator.catalog import GpuSpec, get_gpu, load_gpu_catalog
from estimator.engine import StepModel, roofline_prior
from estimator.modelarch import ModelArch, load_model_arch
from estimator.simulate import EngineLimits, Workload, simulate

STEP = StepModel(overhead_s=0.006, prefill_s_per_token=6e-5, decode_s_per_seq=1e-4,
                 kv_s_per_token=5e-8)  # fmt: skip
BIG = EngineLimits(max_num_seqs=128, kv_capacity_tokens=400_000)
N = 800  # requests per probe in the property tests (speed)


def workload(seed: int = 1, prompt: float = 800, output: float = 200) -> Workload:
    rng = np.random.default_rng(seed)
    return Workload(prompt_tokens=rng.lognormal(math.log(prompt), 0.8, 4000).astype(int) + 1,
                    output_tokens=rng.lognormal(math.log(output), 0.7, 4000).astype(int) + 1)  # fmt: skip


WL = workload()


@pytest.fixture(scope="module")
def default_capacity() -> float:
    return max_rate_at_slo(STEP, BIG, WL, Slo()).rate_rps


@pytest.mark.parametrize(
    ("slo", "limiting"),
    [
        (Slo(), "itl"),
        (Slo(ttft_p95_s=2.0, itl_p95_s=0.2), "ttft"),
        (Slo(ttft_p95_s=0.4, itl_p95_s=1.0), "ttft"),
        (Slo(ttft_p95_s=5.0, itl_p95_s=0.03), "itl"),
    ],
    ids=["default", "loose", "ttft-tight", "itl-tight"],
)
def test_capacity_meets_slo_and_just_above_does_not(slo: Slo, limiting: str) -> None:
    cap = max_rate_at_slo(STEP, BIG, WL, slo)
    assert cap.rate_rps > 0 and cap.limiting == limiting
    assert slo.met_by(cap.at_capacity)
    assert cap.at_capacity.rate_rps == pytest.approx(cap.rate_rps)
    above = simulate(STEP, BIG, WL, cap.rate_rps * 1.05, quantile=slo.quantile)
    assert not slo.met_by(above)
    assert cap.rate_rps <= saturation_rate(STEP, BIG, WL)
    assert 3 <= cap.iterations <= 20


def test_kv_bound_capacity_says_so() -> None:
    small = EngineLimits(max_num_seqs=256, kv_capacity_tokens=20_000)
    cap = max_rate_at_slo(STEP, small, WL, Slo(ttft_p95_s=3.0, itl_p95_s=0.2))
    assert cap.limiting == "kv"
    assert (
        cap.rate_rps < max_rate_at_slo(STEP, BIG, WL, Slo(ttft_p95_s=3.0, itl_p95_s=0.2)).rate_rps
    )


def test_unreachable_slo_gives_zero_and_replicas_raise() -> None:
    slo = Slo(ttft_p95_s=0.01)  # one 800-token prefill alone takes ~50 ms
    cap = max_rate_at_slo(STEP, BIG, WL, slo)
    assert cap.rate_rps == 0.0 and cap.limiting == "ttft" and cap.iterations == 1
    with pytest.raises(SloUnreachable, match="no rate meets the SLO"):
        replicas_needed(STEP, BIG, WL, slo, peak_rate=10.0)


def test_replicas_scale_capacity_linearly(default_capacity: float) -> None:
    three = max_rate_at_slo(STEP, BIG, WL, Slo(), replicas=3)
    assert three.rate_rps == pytest.approx(3 * default_capacity)
    assert three.per_replica_rps == pytest.approx(default_capacity)
    with pytest.raises(ValueError, match="replicas"):
        max_rate_at_slo(STEP, BIG, WL, Slo(), replicas=0)


@pytest.mark.parametrize(
    ("peak", "headroom", "want"),
    [(0.0, 1, 2), (1.0, 1, 2), (12.0, 1, 4), (12.0, 0, 3), (30.0, 2, 8)],
    ids=["idle", "small", "n+1", "no-headroom", "n+2"],
)
def test_replicas_needed(default_capacity: float, peak: float, headroom: int, want: int) -> None:
    assert 5.0 < default_capacity < 6.2  # req/s per replica for this workload
    got = replicas_needed(STEP, BIG, WL, Slo(), peak, headroom_replicas=headroom)
    assert got == want == max(1, math.ceil(peak / default_capacity)) + headroom


def test_latency_curve_rises_with_rate() -> None:
    rates = [0.5, 2.0, 4.0, 6.0, 8.0]
    curve = latency_curve(STEP, BIG, WL, rates)
    assert [r.rate_rps for r in curve] == rates
    ttft = [r.ttft_p95_s for r in curve]
    itl = [r.itl_p95_s for r in curve]
    assert ttft == sorted(ttft) and itl == sorted(itl)


def test_slo_validation() -> None:
    for bad in ({"ttft_p95_s": 0.0}, {"itl_p95_s": -1.0}, {"quantile": 1.0}):
        with pytest.raises(ValueError, match="Slo"):
            Slo(**bad)


# ---- physics (property tests) -----------------------------------------------------------
# Capacity comes from a bisection on a noisy simulation; monotonicity holds up to the
# bisection tolerance (2%) plus sampling noise, hence the 5% slack.
SLACK = 1.05


@settings(max_examples=12, deadline=None)
@given(
    kv_tokens=st.integers(8_000, 200_000),
    shrink=st.floats(0.3, 0.95),
    prompt=st.sampled_from([200.0, 800.0, 2000.0]),
    seed=st.integers(0, 3),
)
def test_smaller_kv_cache_never_raises_capacity(
    kv_tokens: int, shrink: float, prompt: float, seed: int
) -> None:
    """More KV bytes per token means fewer tokens fit: capacity cannot go up."""
    wl = workload(seed, prompt=prompt)
    slo = Slo(ttft_p95_s=3.0, itl_p95_s=0.1)
    big = EngineLimits(max_num_seqs=256, kv_capacity_tokens=kv_tokens)
    small = dataclasses.replace(big, kv_capacity_tokens=max(4096, int(kv_tokens * shrink)))
    cap_big = max_rate_at_slo(STEP, big, wl, slo, n_requests=N, seed=seed).rate_rps
    cap_small = max_rate_at_slo(STEP, small, wl, slo, n_requests=N, seed=seed).rate_rps
    assert cap_small <= cap_big * SLACK


@pytest.fixture(scope="module")
def llama8b_a10g() -> tuple[ModelArch, GpuSpec]:
    configs = Path(__file__).parent / "configs"
    return load_model_arch(configs / "llama-3.1-8b.json"), get_gpu(load_gpu_catalog(), "a10g")


@settings(max_examples=10, deadline=None)
@given(factor=st.floats(1.1, 4.0), seed=st.integers(0, 3))
def test_more_bandwidth_never_lowers_capacity(
    llama8b_a10g: tuple[ModelArch, GpuSpec], factor: float, seed: int
) -> None:
    arch, gpu = llama8b_a10g
    faster = dataclasses.replace(gpu, mem_bandwidth_bps=gpu.mem_bandwidth_bps * factor)
    limits = EngineLimits(max_num_seqs=64, kv_capacity_tokens=60_000)
    slo = Slo(ttft_p95_s=2.0, itl_p95_s=0.1)
    wl = workload(seed, prompt=500, output=150)
    base = max_rate_at_slo(roofline_prior(arch, gpu), limits, wl, slo, n_requests=N, seed=seed)
    fast = max_rate_at_slo(roofline_prior(arch, faster), limits, wl, slo, n_requests=N, seed=seed)
    assert fast.rate_rps * SLACK >= base.rate_rps
