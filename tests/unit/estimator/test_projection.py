"""``project()``: pure, one pass, one story (headline, advice and alternatives agree), its own
uncertainty, and the offline shapes (recommended replicas, does not fit)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from estimator.catalog import load_gpu_catalog
from estimator.engine import roofline_prior
from estimator.engines import get_profile, profile_names
from estimator.loads import Load
from estimator.memory import plan_memory
from estimator.modelarch import load_model_arch
from estimator.projection import (
    BenchRequest,
    DeploymentInputs,
    EngineObserved,
    ObservedLatency,
    ProjectionCache,
    engine_limits,
    project,
    traffic_from_profile,
)
from estimator.settings import EstimatorConfig, validate
from estimator.traffic import TrafficProfile

CONFIGS = Path(__file__).parent / "configs"
CATALOG = load_gpu_catalog()
LLAMA8 = load_model_arch(CONFIGS / "llama-3.1-8b.json")
LLAMA70 = load_model_arch(CONFIGS / "llama-2-70b.json")


def inputs(*, gpu: str = "a100-80gb", traffic: str = "rate=3,prompt=512,output=128",
           arch: object = LLAMA8, **kw: object) -> DeploymentInputs:  # fmt: skip
    over: dict[str, object] = dict(
        gpu=gpu,
        max_model_len=8192,
        sim_requests=400,
        advisor_gpus=("l4", "a100-80gb"),
        advisor_max_simulated=3,
    )
    cfg_kw = {
        k: kw.pop(k) for k in list(kw) if k in {f.name for f in dataclasses.fields(EstimatorConfig)}
    }
    config = validate(EstimatorConfig(**{**over, **cfg_kw}), CATALOG)  # type: ignore[arg-type]
    g = CATALOG[gpu]
    base: dict[str, object] = dict(
        model="m",
        now=0.0,
        config=config,
        catalog=CATALOG,
        arch=arch,
        gpu=g,
        running=False,
        traffic=traffic_from_profile(TrafficProfile.parse(traffic), 0.0, 3600.0),
        prior=roofline_prior(arch, g, engine=config.engine),  # type: ignore[arg-type]
    )  # type: ignore[arg-type]
    base.update(kw)
    return DeploymentInputs(**base)  # type: ignore[arg-type]


def test_pure_same_inputs_same_report_with_or_without_a_cache() -> None:
    inp = inputs()
    cache = ProjectionCache()
    first = project(inp, cache).report
    assert project(inp, cache).report == first  # from the memo
    assert project(inp).report == first  # a fresh cache: the same figures


def test_one_pass_headline_advice_and_alternatives_agree() -> None:
    d = project(inputs()).report
    assert d.status == "ok" and d.capacity_rps_per_replica is not None
    now = next(a for a in d.alternatives if a.current)
    assert now.capacity_rps_per_replica == d.capacity_rps_per_replica
    assert now.replicas == d.recommended_replicas == d.replicas  # offline: the recommended count
    replicas = next(r for r in d.recommendations if r.kind == "replicas")
    assert replicas.value == d.recommended_replicas
    assert d.cost is not None and d.cost.at == "offered rate"  # offline: the rate given
    assert d.cost_at_capacity is not None and d.cost_at_capacity.at == "capacity"
    priced = [a for a in d.alternatives if a.meets_slo]
    assert priced and all(a.priced_at_rps == pytest.approx(3.0) for a in priced)


@pytest.mark.parametrize("rate", [1.0, 3.0, 7.5])
def test_default_replicas_meet_the_slo(rate: float) -> None:
    d = project(inputs(traffic=f"rate={rate},prompt=lognormal:1024:0.8,output=256")).report
    assert d.meets_slo_at_rate is True
    assert d.replicas == d.recommended_replicas
    assert d.utilization is not None and d.utilization < 1.0


def test_replicas_as_asked_can_miss() -> None:
    d = project(inputs(traffic="rate=7.5,prompt=lognormal:1024:0.8,output=256",
                       replicas=1)).report  # fmt: skip
    assert d.replicas == 1 and d.meets_slo_at_rate is False
    assert d.recommended_replicas is not None and d.recommended_replicas > 1


def test_a_model_that_does_not_fit_lists_options_without_prices() -> None:
    d = project(inputs(gpu="l4", arch=LLAMA70, advisor_gpus=("l4", "h100-sxm"))).report
    assert d.status == "does_not_fit" and d.capacity_rps is None
    assert any("does not fit" in n for n in d.notes)
    now = next(a for a in d.alternatives if a.current)
    assert not now.fits and now.verdict() == "does not fit" and now.usd_per_1m_tokens is None
    assert d.memory is not None and not d.memory.fits and d.memory.params > 60e9


def test_too_wide_a_band_gives_a_range_not_a_count() -> None:
    d = project(inputs(max_actionable_band=0.2)).report  # the uncalibrated prior is +-50%
    assert d.capacity_band is not None and d.capacity_band.rel_error == 0.5
    assert not d.actionable and d.recommended_replicas is None
    rec = next(r for r in d.recommendations if r.kind == "replicas")
    assert rec.value is None and "no count is recommended" in rec.message
    assert d.gauges()["estimator_recommended_replicas"] is None


@pytest.mark.parametrize(
    ("requests", "gaps", "widens"),
    [(1000, 50_000, True), (100, 50_000, True), (100, 100, False)],
    ids=["both", "itl-only", "too-thin"],
)
def test_the_model_is_checked_against_the_measurement(requests: int, gaps: int,
                                                      widens: bool) -> None:  # fmt: skip
    bare = project(inputs()).report
    assert bare.projected_itl_p95_s is not None and bare.projected_ttft_p95_s is not None
    observed = ObservedLatency(ttft_p95_s=bare.projected_ttft_p95_s, window_s=60.0,
                               itl_p95_s=bare.projected_itl_p95_s / 2.0,  # the model says 2x
                               requests=requests, gaps=gaps)  # fmt: skip
    d = project(inputs(observed=observed, replicas=bare.replicas)).report
    check = d.model_check
    assert check is not None and d.capacity_band is not None
    if widens:
        assert check.itl_error == pytest.approx(1.0)
        assert d.capacity_band.rel_error == pytest.approx(1.0)
        assert "miss" in d.capacity_band.source and not d.actionable
    else:
        assert check.itl_error is None and check.ttft_error is None
        assert d.capacity_band.rel_error == 0.5


def test_windows_never_claim_more_history_than_there_is() -> None:
    from estimator.projection import traffic_from_stats
    from estimator.records import RequestRecord
    from estimator.traffic import TrafficStats

    t = TrafficStats(1024)
    for i in range(40):  # 20 s of traffic at 2 req/s
        t.observe(RequestRecord(request_id=str(i), model="m", arrival_epoch=1000.0 + i / 2,
                                prompt_tokens=100, completion_tokens=10))  # fmt: skip
    tr = traffic_from_stats(t, 1020.0, 3600.0)
    assert tr.report.history_s == pytest.approx(20.0) and tr.report.rate_window_s == 20.0
    assert tr.rate_long_window_s == 20.0 and "last 20 s" in tr.report.description
    assert tr.report.rate_rps == pytest.approx(2.0, rel=0.06)


# ---- engine limits -------------------------------------------------------------------------
# (engine, GPU, exposed by the engine, with a memory plan) ->
# (max_num_seqs, max_num_batched_tokens, block_size, KV tokens or None = the plan's, reserve)
EXPOSED = EngineObserved(kv_capacity_tokens=128 * 400, block_size=128)
LIMIT_CASES = {
    "vllm-cpu-exposed": ("vllm", "cpu", EXPOSED, False, (128, 2048, 128, 51200, False)),
    "vllm-cpu-exposed-seqs": ("vllm", "cpu", EngineObserved(kv_capacity_tokens=51200,
                              block_size=128, max_num_seqs=8), False, (8, 2048, 128, 51200, False)),
    "vllm-cpu-plan": ("vllm", "cpu", EngineObserved(), True, (128, 2048, 128, None, False)),
    "vllm-h100-plan": ("vllm", "h100-sxm", EngineObserved(), True, (1024, 8192, 16, None, False)),
    "trtllm-h100-plan": ("trtllm", "h100-sxm", EngineObserved(), True,
                         (2048, 8192, 32, None, True)),
    "vllm-unknown-gpu-exposed": ("vllm", None, EngineObserved(kv_capacity_tokens=16000,
                                 block_size=16), False, (256, 2048, 16, 16000, False)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_engine_limits_come_from_the_engine_then_the_plan_then_the_profile(case: str) -> None:
    engine, gpu_key, observed, with_plan, want = LIMIT_CASES[case]
    cfg = validate(EstimatorConfig(engine=engine, max_model_len=8192), CATALOG)
    gpu = CATALOG[gpu_key] if gpu_key else None
    plan = plan_memory(LLAMA8, gpu, engine=engine, max_model_len=8192) if with_plan else None
    limits, notes = engine_limits(observed, plan, cfg, 0.0, gpu)
    seqs, batched, block, kv, reserve = want
    assert (limits.max_num_seqs, limits.max_num_batched_tokens, limits.block_size) == (
        seqs, batched, block)  # fmt: skip
    assert limits.kv_capacity_tokens == (kv if kv is not None else plan.kv_capacity_tokens)  # type: ignore[union-attr]
    assert limits.reserve_output == reserve
    assert notes == ([] if kv is not None else ["KV capacity from the memory plan"])


def test_without_kv_figures_the_cache_is_assumed_unbounded_and_said() -> None:
    cfg = validate(EstimatorConfig(engine="sglang"), CATALOG)
    limits, notes = engine_limits(EngineObserved(), None, cfg, 0.5, CATALOG["h100-sxm"])
    assert limits.max_num_seqs == 4096 and limits.prefix_cache_hit_ratio == 0.5
    assert notes == ["KV capacity unknown: assumed unbounded, max_num_seqs=4096"]


# ---- a simulated benchmark run and "which runtime?" (offline) -----------------------------
@pytest.mark.parametrize(("load", "kind", "requests"),
                         [(None, "poisson", 400), (Load.concurrency(16), "concurrency", 400),
                          (Load.burst(200), "burst", 200)],
                         ids=["offered-rate", "concurrency", "burst"])  # fmt: skip
def test_a_benchmark_load_with_percentiles_and_bands(load: Load | None, kind: str,
                                                     requests: int) -> None:  # fmt: skip
    d = project(inputs(bench=BenchRequest(load=load))).report
    r = d.load
    assert r is not None and r.kind == kind and r.requests == requests and r.engine == "vllm"
    if load is None:  # the offered rate per replica
        assert r.value == pytest.approx(3.0 / d.replicas)
    for name in ("ttft", "itl", "tpot", "e2e"):
        s = getattr(r, name)
        assert 0 < s.p50 <= s.p90 <= s.p95 <= s.p99, name
        lo, hi = r.bands[name]
        assert lo < s.mean < hi, name
    lo, hi = r.bands["throughput"]
    assert lo < r.output_tokens_per_s < hi


def test_every_engine_under_the_same_load_ranked_with_its_caveat() -> None:
    d = project(inputs(engine="sglang", bench=BenchRequest(load=Load.concurrency(16)))).report
    assert [c.rank for c in d.engines] == list(range(1, len(profile_names()) + 1))
    assert {c.engine for c in d.engines} == set(profile_names())
    for c in d.engines:
        assert c.validation == get_profile(c.engine).validation and c.title
    tps = [c.output_tokens_per_s for c in d.engines if c.fits]
    assert tps == sorted(tps, reverse=True)  # a closed loop: most tokens/s first
    (mine,) = [c for c in d.engines if c.current]
    assert mine.engine == "sglang" and d.load is not None  # the same run as the load table
    assert mine.output_tokens_per_s == pytest.approx(d.load.output_tokens_per_s, rel=1e-9)
    assert mine.ttft_mean_s == pytest.approx(d.load.ttft.mean, rel=1e-9)


def test_no_benchmark_unless_asked() -> None:
    d = project(inputs()).report
    assert d.load is None and d.engines == ()
