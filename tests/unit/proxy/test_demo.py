"""``rightsizer demo``'s pieces: the seeded schedule, the proxy table over token gaps, the
80-column live line, the estimator behind a process boundary. (The whole demo, run twice:
tests/integration/test_demo.py.)"""

from __future__ import annotations

from dataclasses import replace

import pytest

from estimator.records import ItlSummary, Outcome, RequestRecord
from estimator.report import Report
from estimator.service import Estimator
from proxy.programs.demo import (
    DEMO_MODEL,
    ChildEstimator,
    demo_config,
    live_line,
    plan_traffic,
    ramp,
    summary_rows,
    verdict_lines,
)
from tests.unit.estimator.test_service import T0, engine_records


def test_the_schedule_is_the_seed_s() -> None:
    a, b = (plan_traffic(7, 20.0, 500, ramp(20.0)) for _ in range(2))
    assert a == b and len(a) > 50
    assert [p.at_s for p in a] == sorted(p.at_s for p in a) and a[-1].at_s < 20.0
    assert plan_traffic(8, 20.0, 500, ramp(20.0)) != a


def test_the_proxy_table_reads_itl_over_all_gaps() -> None:
    # engine-1: ten requests of ten 20 ms gaps, one of them with a 100 ms gap; engine-2 idle
    recs = [RequestRecord(request_id=str(i), model="m", backend="engine-1", streamed=True,
                          arrival_s=0.0, first_token_s=0.1, end_s=1.0,
                          itl=ItlSummary.from_gaps([0.02] * 9 + [0.1 if i == 0 else 0.02]))
            for i in range(10)]  # fmt: skip
    recs.append(RequestRecord(request_id="x", model="m", backend="engine-2",
                              outcome=Outcome.UPSTREAM_ERROR))  # fmt: skip
    rows = {r[0]: r for r in summary_rows(recs)}
    assert set(rows) == {"engine-1", "engine-2", "all"}
    _, n, ok, _, _, _, _, itl_p95, gaps = rows["all"]
    assert (n, ok, gaps) == ("11", "10", "100")
    assert float(itl_p95) == pytest.approx(20.0, rel=0.1)  # 1% of gaps at 100 ms: p95 is 20
    assert rows["engine-2"][3:8] == ["-"] * 5


@pytest.fixture(scope="module")
def report() -> Report:
    cfg = replace(demo_config(), gpu=None, model_configs={}, min_records=20)
    est = Estimator(cfg)
    return est.replay_records([replace(r, model=DEMO_MODEL) for r in engine_records(1.0, 300)])


def test_the_live_line_and_the_verdicts_fit_80_columns(report: Report) -> None:
    d = report.deployment(DEMO_MODEL)
    assert d is not None and d.status == "ok"
    line = live_line(report)
    assert "capacity" in line and "utilization" in line and len(line) <= 78
    assert live_line(None) == "estimator: gathering data"
    text = "\n".join(verdict_lines(d, demo_config()))
    assert "ITL p95 <= 50 ms (over all token gaps)" in text and "replicas for the forecast" in text


def test_the_estimator_refreshes_in_a_child_process_as_it_does_here() -> None:
    cfg = replace(demo_config(), gpu="a100-80gb", model_configs={DEMO_MODEL: "llama-3.1-8b"},
                  advisor_gpus=("a100-80gb",), sim_requests=400)  # fmt: skip
    records = [replace(r, model=DEMO_MODEL) for r in engine_records(1.0, 400)]
    now = T0 + 450
    child = ChildEstimator(cfg)
    try:
        for r in records:
            child.observe(r)
        remote = child.refresh(now)
    finally:
        child.close()
    local = Estimator(cfg).replay_records(records, now=now)
    assert child.report() is remote
    a, b = remote.to_dict(), local.to_dict()
    a.pop("refresh_seconds"), b.pop("refresh_seconds")
    assert a == b and remote.gauge_families() == local.gauge_families()
