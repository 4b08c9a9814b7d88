"""The experiment verdict on simulated engines: capacity ratio and the cheaper call against the
simulator's truth, managed versus dedicated with the break-even rate, insufficient data, the
estimator's per-group handling of shadow copies, the offline CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import orjson
import pytest

from estimator.capacity import Slo, max_rate_at_slo
from estimator.catalog import load_gpu_catalog
from estimator.compare import (
    ExperimentSpec,
    ExperimentsSpec,
    GroupSpec,
    Pricing,
    break_even,
    monthly,
    per_1m_tokens,
    pricing,
    replicas_for,
    slo_outcome,
)
from estimator.compare_cli import emit, offline, parse_group
from estimator.engine import StepModel
from estimator.experiments import compare_records, offline_rate
from estimator.records import ItlSummary, Outcome, RequestRecord
from estimator.report import to_dict
from estimator.service import Estimator, EstimatorConfig
from estimator.simulate import EngineLimits, Workload, simulate_trace
from estimator.verdict import jackknife_log_ratio

SLOW = StepModel(overhead_s=0.012, prefill_s_per_token=1.2e-4, decode_s_per_seq=2e-4,
                 kv_s_per_token=1e-7)  # fmt: skip
FAST = StepModel(overhead_s=0.006, prefill_s_per_token=6e-5, decode_s_per_seq=1e-4,
                 kv_s_per_token=5e-8)  # fmt: skip
LIMITS = EngineLimits(max_num_seqs=32, kv_capacity_tokens=400_000)
SLO = Slo(ttft_p95_s=1.0, itl_p95_s=0.05)
T0 = 1.7e9
CATALOG = load_gpu_catalog()


def workload(seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    return Workload(prompt_tokens=rng.lognormal(math.log(400), 0.6, 2000).astype(int) + 1,
                    output_tokens=rng.lognormal(math.log(100), 0.5, 2000).astype(int) + 2)  # fmt: skip


def records(step: StepModel, group: str, *, rates: tuple[float, ...] = (1.0, 3.0, 6.0),
            n: int = 150, seed: int = 1, shadow: bool = False) -> list[RequestRecord]:  # fmt: skip
    """What a proxy in front of the simulated engine records, at several loads in turn."""
    out, off = [], 0.0
    for k, rate in enumerate(rates):
        _, tr = simulate_trace(step, LIMITS, workload(seed + k), rate, n_requests=n, seed=seed + k)
        for i in np.flatnonzero(np.isfinite(tr.first_token_s)):
            c, a = int(tr.output_tokens[i]), off + float(tr.arrival_s[i])
            f, e = off + float(tr.first_token_s[i]), off + float(tr.finish_s[i])
            gap = (e - f) / (c - 1)
            out.append(RequestRecord(
                request_id=f"{seed}-{k}-{i}", model="m", backend=group, streamed=True,
                status=200, arrival_s=a, dispatch_s=a, first_token_s=f, end_s=e,
                arrival_epoch=T0 + a, prompt_tokens=int(tr.prompt_tokens[i]), completion_tokens=c,
                itl=ItlSummary(count=c - 1, mean=gap, p50=gap, p95=gap),
                inflight_requests=int(tr.inflight_at_arrival[i]), group=group, shadow=shadow,
            ))  # fmt: skip
        off += float(np.nanmax(tr.finish_s)) + 5.0
    return out


def config(*groups: GroupSpec, **kw: object) -> tuple[EstimatorConfig, ExperimentsSpec]:
    spec = ExperimentsSpec(groups=groups, experiments=(ExperimentSpec(
        name="e", baseline=groups[0].name, candidate=groups[1].name, min_requests=50),),
        blocks=4)  # fmt: skip
    cfg = EstimatorConfig(slo_ttft_p95_s=SLO.ttft_p95_s, slo_itl_p95_s=SLO.itl_p95_s,
                          sim_requests=500, **kw)  # type: ignore[arg-type]  # fmt: skip
    return cfg, spec


@pytest.fixture(scope="module")
def slow_fast() -> tuple[list[RequestRecord], list[RequestRecord]]:
    return records(SLOW, "base", seed=1), records(FAST, "cand", seed=11)


def test_capacity_ratio_and_the_cheaper_call_follow_the_truth(
    slow_fast: tuple[list[RequestRecord], list[RequestRecord]],
) -> None:
    base, cand = slow_fast
    cfg, spec = config(GroupSpec(name="base", backends=("base",), gpu="a100-80gb"),
                 GroupSpec(name="cand", backends=("cand",), gpu="h100-sxm"))  # fmt: skip
    v = compare_records(base, cand, cfg, CATALOG, spec, rate_rps=6.0)
    w = workload(99)
    truth = (max_rate_at_slo(FAST, LIMITS, w, SLO).per_replica_rps
             / max_rate_at_slo(SLOW, LIMITS, w, SLO).per_replica_rps)  # fmt: skip
    assert v.status == "ok" and v.capacity_ratio is not None
    assert v.capacity_ratio == pytest.approx(truth, rel=0.3)
    assert v.capacity_ratio_low is not None and v.capacity_ratio_low < v.capacity_ratio
    gb, gc = v.groups
    assert gb.capacity_source == gc.capacity_source == "calibrated"
    # at 6 req/s the slow engine needs 2 A100s, the fast one H100: the candidate is cheaper
    assert (gb.replicas, gc.replicas) == (2, 1)
    assert v.cheaper == "candidate" and v.cost_ratio is not None and v.cost_ratio < 1
    assert v.verdict.startswith("candidate serves this traffic at the SLO for")
    assert "less per month" in v.verdict
    assert v.ttft[1].quantile == 0.95 and v.ttft[1].significant  # the fast one is faster
    json.dumps(to_dict(v))  # JSON-ready, no numpy scalars
    orjson.dumps(to_dict(v))


def test_equal_engines_are_not_called_different(
    slow_fast: tuple[list[RequestRecord], list[RequestRecord]],
) -> None:
    base = slow_fast[0]
    cand = [
        dataclasses.replace(r, group="cand", backend="cand") for r in records(SLOW, "x", seed=21)
    ]
    cfg, spec = config(GroupSpec(name="base", backends=("base",), gpu="a100-80gb"),
                 GroupSpec(name="cand", backends=("cand",), gpu="a100-80gb"))  # fmt: skip
    v = compare_records(base, cand, cfg, CATALOG, spec, rate_rps=2.0)
    assert v.cost_ratio == 1.0 and "same cost per month" in v.verdict
    assert v.cheaper in ("same", None)
    assert v.capacity_ratio == pytest.approx(1.0, rel=0.15)
    assert v.errors is not None and not v.errors.significant


def test_managed_api_against_dedicated_gives_the_break_even(
    slow_fast: tuple[list[RequestRecord], list[RequestRecord]],
) -> None:
    base, _ = slow_fast
    cand = [dataclasses.replace(r, group="api", backend="api") for r in records(FAST, "x", seed=31)]
    cfg, spec = config(GroupSpec(name="base", backends=("base",), gpu="a100-80gb"),
                 GroupSpec(name="api", usd_per_1m_input_tokens=1.0, usd_per_1m_output_tokens=4.0))  # fmt: skip
    v = compare_records(base, cand, cfg, CATALOG, spec, rate_rps=0.5)
    gb, ga = v.groups
    assert ga.managed and ga.capacity_rps is None and ga.usd_per_request is not None
    per_request = (ga.mean_prompt_tokens * 1.0 + ga.mean_completion_tokens * 4.0) / 1e6  # type: ignore[operator]
    assert ga.usd_per_request == pytest.approx(per_request)
    assert v.break_even_rps == pytest.approx(gb.usd_per_hour / 3600 / per_request)  # type: ignore[operator]
    assert v.break_even_rps is not None and v.break_even_rps > 0.5
    assert v.cheaper == "candidate"  # 0.5 req/s is below the break-even: the API is cheaper
    assert any("break-even" in r for r in v.reasons)


def test_too_few_requests_say_so() -> None:
    base = records(SLOW, "base", rates=(1.0,), n=30)
    cand = records(FAST, "cand", rates=(1.0,), n=30, seed=5)
    cfg, spec = config(GroupSpec(name="base"), GroupSpec(name="cand"))
    v = compare_records(base, cand, cfg, CATALOG, spec)
    assert v.status == "insufficient_data" and v.verdict.startswith("not enough data yet")
    assert v.groups[0].requests == 30


@pytest.mark.parametrize(("rate", "cap", "expect"), [
    (0.0, 5.0, 1), (5.0, 5.0, 1), (5.01, 5.0, 2), (3.0, None, None), (3.0, 0.0, None),
], ids=["idle", "at-capacity", "just-over", "unknown", "slo-unreachable"])  # fmt: skip
def test_replicas_for(rate: float, cap: float | None, expect: int | None) -> None:
    assert replicas_for(rate, cap) == expect


def test_prices() -> None:
    gpu = GroupSpec(name="g", gpu="h100-sxm", gpus_per_backend=2)
    assert pricing(gpu, 3.0, 100.0, 50.0) == Pricing(usd_per_hour=6.0)
    assert pricing(dataclasses.replace(gpu, usd_per_hour=4.0), 3.0, None, None).usd_per_hour == 4.0
    api = GroupSpec(name="a", usd_per_1m_input_tokens=2.0, usd_per_1m_output_tokens=8.0)
    p = pricing(api, None, 1000.0, 100.0)
    assert p.usd_per_request == pytest.approx(0.0028)
    assert monthly(p, None, 1.0) == (None, pytest.approx(0.0028 * 3600 * 730))
    assert monthly(Pricing(usd_per_hour=2.0), 4.0, 6.0) == (2, pytest.approx(2 * 2.0 * 730))
    assert per_1m_tokens(Pricing(usd_per_hour=3.6), 1.0, 1000.0) == pytest.approx(1.0)
    assert break_even(3.6, 10.0, 0.0001) == pytest.approx(10.0)
    assert break_even(3.6, 5.0, 0.0001) is None  # the API is cheaper than a full replica


def test_slo_outcome() -> None:
    base = records(SLOW, "g", rates=(0.5,), n=5)[0]
    assert slo_outcome(base, 1.0, 0.05) is True
    assert (
        slo_outcome(dataclasses.replace(base, first_token_s=base.arrival_s + 2.0), 1.0, 0.05)
        is False
    )
    assert slo_outcome(dataclasses.replace(base, outcome=Outcome.TIMEOUT), 1.0, 0.05) is False
    assert slo_outcome(dataclasses.replace(base, outcome=Outcome.SHED), 1.0, 0.05) is None
    assert slo_outcome(dataclasses.replace(base, streamed=False), 1.0, 0.05) is None


def test_jackknife_ratio_interval() -> None:
    assert jackknife_log_ratio([2.0, 2.1, 1.9], [1.0, 1.0, 1.0], 2.0) is not None
    lo, hi = jackknife_log_ratio([2.0, 2.1, 1.9, 2.05], [1.0, 1.02, 0.98, 1.0], 2.0)  # type: ignore[misc]
    assert lo < 2.0 < hi
    assert jackknife_log_ratio([2.0], [1.0], 2.0) is None


def test_the_estimator_keeps_shadow_copies_out_of_the_model_and_judges_each_group() -> None:
    base = records(SLOW, "base", seed=1)
    cand = records(FAST, "cand", seed=11, shadow=True)
    cfg, spec = config(GroupSpec(name="base", backends=("base",), gpu="a100-80gb"),
                 GroupSpec(name="cand", backends=("cand",), gpu="h100-sxm"))  # fmt: skip
    est = Estimator(cfg, experiments=spec)
    report = est.replay_records([*base, *cand])
    dep = report.deployment("m")
    assert dep is not None and dep.requests_observed == len(base), "shadow copies are not traffic"
    (v,) = report.experiments
    assert v.groups[1].shadow == len(cand) and v.groups[1].live == 0
    assert v.rate_rps >= 0.0
    d = report.to_dict()
    assert d["experiments"][0]["experiment"] == "e"
    orjson.dumps(d)


def test_offline_rate() -> None:
    base = records(SLOW, "base", rates=(2.0,), n=100)
    span = base[-1].arrival_epoch - base[0].arrival_epoch
    assert offline_rate(base, []) == pytest.approx((len(base)) / span, rel=0.02)
    assert offline_rate(base, base) == pytest.approx(2 * len(base) / span, rel=0.02)


def test_cli_offline_from_two_logs(tmp_path: Path,
                                   slow_fast: tuple[list[RequestRecord], list[RequestRecord]]) -> None:  # fmt: skip
    logs = []
    for name, recs in zip(("a.jsonl", "b.jsonl"), slow_fast, strict=True):
        path = tmp_path / name
        path.write_bytes(b"\n".join(orjson.dumps(dataclasses.replace(r, group=None).to_dict())
                                    for r in recs))  # fmt: skip
        logs.append(str(path))
    groups = [parse_group("old:gpu=a100-80gb"), parse_group("new:gpu=h100-sxm,count=1")]
    v = offline(logs, spec=None, groups=groups, slo=SLO, baseline="old", candidate="new",
                rate_rps=6.0)  # fmt: skip
    assert v["status"] == "ok" and v["cheaper"] == "candidate"
    out = io.StringIO()
    emit([v], as_json=False, out=out)
    text = out.getvalue()
    assert "old (baseline)" in text and "capacity at SLO" in text and "verdict:" in text
    with pytest.raises(ValueError, match="groups"):
        offline(logs[:1], spec=None, groups=(), slo=SLO)  # one log without groups


@pytest.mark.parametrize("text", ["", ":gpu=x", "a:gpu", "a:nope=1", "a:count=x", "a:input=1"])
def test_bad_group_flags(text: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_group(text)


def test_a_group_that_misses_the_slo_is_named(
    slow_fast: tuple[list[RequestRecord], list[RequestRecord]],
) -> None:
    base, _ = slow_fast
    slow_api = [dataclasses.replace(r, group="api", backend="api",
                                    first_token_s=r.arrival_s + 1.5)
                for r in records(FAST, "x", seed=41)]  # fmt: skip
    cfg, spec = config(GroupSpec(name="base", backends=("base",), gpu="a100-80gb"),
                 GroupSpec(name="api", usd_per_1m_input_tokens=0.1, usd_per_1m_output_tokens=0.4))  # fmt: skip
    v = compare_records(base, slow_api, cfg, CATALOG, spec, rate_rps=1.0)
    assert v.groups[1].slo_attainment == 0.0
    assert v.groups[1].meets_slo is False and v.groups[0].meets_slo is True
    assert "api misses the SLO on this traffic (p95 TTFT 1500 ms" in v.verdict
    assert v.ttft[1].significant and v.ttft[1].difference > 0  # type: ignore[operator]
