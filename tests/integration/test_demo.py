"""``rightsizer demo`` is reproducible (issue 11): two runs with the same seed agree on the
recommendation, and their capacity is within 10%.

Each run is the real demo (two emulated engines, the proxy, the estimator in its child
process) with a 40-second schedule: about 45 s each on the shared 2-core machine. Its figures
must also tell one story: every request recorded, the proxy's ITL read over token gaps, the
projected latencies at the measured rate close to the measured ones.

The emulated engines run on the host's CPU: when other work on the machine slows them (a
loaded 2-core host stretched their decode steps by 10-30% and their tail by more), the two
runs measured different engines, and the estimator rightly says different things. So the pair
is judged only when both runs measured the same engine (pooled ITL p50, a plain decode step,
within 5%; median TTFT within 10%); otherwise it is run again, up to three pairs, the way the
accuracy benchmark reruns a drifted engine.
"""

from __future__ import annotations

import asyncio

import pytest

from estimator.records import GAP_BINS, Outcome, add_gap_histogram, gap_quantiles
from proxy.programs.demo import DemoResult, demo

DURATION_S = 40.0
SAME_ENGINE = 0.05  # decode step
SAME_TTFT = 0.10  # median TTFT: the prefill and the event loop's promptness
PAIRS = 3


def run() -> DemoResult:
    return asyncio.run(demo(duration_s=DURATION_S, requests=2000, seed=7, show=False))


def engine_pace(r: DemoResult) -> tuple[float, float]:
    """(pooled ITL p50: a plain decode step; TTFT p50) as the proxy measured them."""
    dense = [0] * GAP_BINS
    ttft = []
    for rec in r.records:
        if rec.outcome is Outcome.OK:
            add_gap_histogram(dense, rec.itl)
            if rec.streamed and rec.ttft_s is not None:
                ttft.append(rec.ttft_s)
    p50 = gap_quantiles(dense, [0.5])[0]
    assert p50 is not None and ttft
    return p50, sorted(ttft)[len(ttft) // 2]


def same_engine_pair() -> tuple[DemoResult, DemoResult]:
    paces = []
    for _ in range(PAIRS):
        first, second = run(), run()
        (itl_a, ttft_a), (itl_b, ttft_b) = engine_pace(first), engine_pace(second)
        paces.append(((itl_a, ttft_a), (itl_b, ttft_b)))
        if abs(itl_a / itl_b - 1) <= SAME_ENGINE and abs(ttft_a / ttft_b - 1) <= SAME_TTFT:
            return first, second
    pytest.fail(f"the host changed the emulated engines' pace in every pair: {paces}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_runs_of_the_same_seed_agree() -> None:
    first, second = same_engine_pair()
    a, b = first.deployment, second.deployment
    assert a is not None and b is not None
    for r, d in ((first, a), (second, b)):
        assert r.sent == len(r.records) and r.errors == 0
        assert d.status == "ok" and d.fit.source == "calibrated"
        assert d.observed_gaps > 1000 and d.observed_itl_p95_s is not None
        # the projection at the measured rate against the measurement (thousands of gaps)
        projected, measured = d.projected_itl_p95_s, d.observed_itl_p95_s
        assert projected is not None and abs(projected / measured - 1) <= 0.5
    assert a.recommended_replicas == b.recommended_replicas
    recs_a = {r.kind: r.value for r in a.recommendations}
    recs_b = {r.kind: r.value for r in b.recommendations}
    assert recs_a["replicas"] == recs_b["replicas"]
    assert a.capacity_rps is not None and b.capacity_rps is not None
    assert abs(a.capacity_rps / b.capacity_rps - 1) <= 0.10, (a.capacity_rps, b.capacity_rps)
