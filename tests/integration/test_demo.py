"""``rightsizer demo`` is reproducible (issue 11): two runs with the same seed agree on the
recommendation, and their capacity is within 10%.

Each run is the real demo (two emulated engines, the proxy, the estimator in its child
process) with a 30-second schedule: about 35 s each on the shared 2-core machine. Its figures
must also tell one story: every request recorded, the proxy's ITL read over token gaps, the
projected latencies at the measured rate within the capacity band of the measured ones.
"""

from __future__ import annotations

import asyncio

import pytest

from proxy.programs.demo import DemoResult, demo

DURATION_S = 30.0


def run() -> DemoResult:
    return asyncio.run(demo(duration_s=DURATION_S, requests=2000, seed=7, show=False))


@pytest.mark.timeout(240)
def test_two_runs_of_the_same_seed_agree() -> None:
    first, second = run(), run()
    a, b = first.deployment, second.deployment
    assert a is not None and b is not None
    for r, d in ((first, a), (second, b)):
        assert r.sent == len(r.records) and r.errors == 0
        assert d.status == "ok" and d.fit.source == "calibrated"
        assert d.observed_gaps > 1000 and d.observed_itl_p95_s is not None
        assert d.capacity_band is not None
        band = d.capacity_band.rel_error
        for projected, measured in ((d.projected_itl_p95_s, d.observed_itl_p95_s),
                                    (d.projected_ttft_p95_s, d.observed_ttft_p95_s)):  # fmt: skip
            assert projected is not None and measured is not None
            assert abs(projected / measured - 1) <= max(band, 0.5)
    assert a.recommended_replicas == b.recommended_replicas is not None
    recs_a = {r.kind: r.value for r in a.recommendations}
    recs_b = {r.kind: r.value for r in b.recommendations}
    assert recs_a["replicas"] == recs_b["replicas"]
    assert a.capacity_rps is not None and b.capacity_rps is not None
    assert abs(a.capacity_rps / b.capacity_rps - 1) <= 0.10, (a.capacity_rps, b.capacity_rps)
