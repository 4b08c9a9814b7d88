"""``simulate.replay``: the simulator on a given request trace (used to compare the model with
a measured run request by request, bench/estimator_accuracy.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from estimator.engine import StepModel
from estimator.simulate import EngineLimits, Workload, replay, simulate_trace

STEP = StepModel(overhead_s=0.008, prefill_s_per_token=4e-4, decode_s_per_seq=6e-4,
                 kv_s_per_token=1.5e-6)  # fmt: skip
LIMITS = EngineLimits(max_num_seqs=8, kv_capacity_tokens=65536, block_size=128)


def test_replay_of_a_drawn_trace_equals_the_simulation() -> None:
    rng = np.random.default_rng(3)
    w = Workload(prompt_tokens=rng.integers(100, 600, 64), output_tokens=rng.integers(32, 128, 64))
    res, tr = simulate_trace(STEP, LIMITS, w, 2.5, n_requests=400, seed=7)
    rep = replay(STEP, LIMITS, tr.arrival_s, tr.prompt_tokens, tr.output_tokens)
    np.testing.assert_allclose(rep.trace.first_token_s, tr.first_token_s)
    np.testing.assert_allclose(rep.trace.finish_s, tr.finish_s)
    # the ITL p95 over the summary's window is the simulation's
    since = float(tr.arrival_s[int(400 * 0.1)])
    assert rep.itl_quantiles([0.95], since=since)[0] == pytest.approx(res.itl_p95_s)


def test_replay_windows_and_validation() -> None:
    arrivals = [0.0, 0.05, 10.0]
    rep = replay(STEP, LIMITS, arrivals, [200, 300, 100], [40, 40, 40])
    alone = STEP.ttft_alone(100)
    assert rep.trace.first_token_s[2] - rep.trace.arrival_s[2] == pytest.approx(alone)
    early = rep.itl_quantiles([0.5], until=5.0)[0]
    late = rep.itl_quantiles([0.5], since=5.0)[0]
    assert early > late  # two requests decode together early on, one alone later
    assert math.isnan(rep.itl_quantiles([0.5], since=20.0, until=30.0)[0])
    with pytest.raises(ValueError, match="ascending"):
        replay(STEP, LIMITS, [1.0, 0.5], [10, 10], [5, 5])
