"""Experiments in the proxy: config checks, assignment (split, stickiness, header, tenant),
the group routing filter with per-group admission queues, rollback windows and rule, live
control, drift digests and the exported families."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from estimator.records import Outcome
from proxy.config import (
    ConfigError,
    ExperimentConfig,
    GroupConfig,
    RollbackConfig,
    RoutingConfig,
    load_config,
)
from proxy.experiments import Experiments, drift
from proxy.experiments.control import Window
from proxy.routing import PluginDeps, RouteCtx, build_router
from proxy.telemetry import ExperimentsView, Metrics
from tests.support.fakes import Admission, FakeClock, pool_of, record, request, snapshot

GROUPS = (
    GroupConfig(name="base", backends=("b0:80",)),
    GroupConfig(name="cand", backends=("b1:80",)),
)


def experiments(clock: FakeClock | None = None, available: bool = True, **kw: Any) -> Experiments:
    rollback = kw.pop("rollback", RollbackConfig(window_s=60.0, min_samples=10))
    cfg = ExperimentConfig(name="e", baseline="base", candidate="cand", rollback=rollback, **kw)
    return Experiments(GROUPS, [cfg], slo_ttft_s=0.5, slo_itl_s=0.05,
                       available=lambda _g: available, clock=clock or FakeClock())  # fmt: skip


# --- config ------------------------------------------------------------------------------

BASE_CFG: dict[str, Any] = {
    "backends": [{"url": "http://a:1", "name": "a"}, {"url": "http://b:1", "name": "b"}],
    "groups": [{"name": "base", "backends": ["a"]}, {"name": "cand", "backends": ["b"]}],
    "experiments": [{"name": "e", "baseline": "base", "candidate": "cand"}],
}


def _with(path: str, value: Any) -> dict[str, Any]:
    cfg = {k: [dict(x) for x in v] for k, v in BASE_CFG.items()}
    section, rest = path.split(".", 1)
    idx, key = rest.split(".", 1)
    target = cfg[section][int(idx)]
    *parents, leaf = key.split(".")
    for p in parents:
        target = target.setdefault(p, {})
    target[leaf] = value
    return cfg


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        ("groups.0.backends", ["zz"], r"groups\[0\]\.backends\[0\]: unknown backend 'zz'"),
        ("groups.1.backends", ["a"], r"groups\[1\]\.backends\[0\]: backend 'a' is already"),
        ("groups.1.name", "base", r"groups\[1\]\.name: duplicate group"),
        ("experiments.0.candidate", "nope", r"experiments\[0\]\.candidate: unknown group"),
        ("experiments.0.candidate", "base", r"experiments\[0\]\.candidate: must differ"),
        ("experiments.0.weight", 1.5, r"experiments\[0\]\.weight: must be in \[0, 1\]"),
        ("experiments.0.stickiness", "user", r"experiments\[0\]\.stickiness: unknown"),
        ("experiments.0.shadow.share", 2.0, r"experiments\[0\]\.shadow\.share"),
        ("experiments.0.rollback.metrics", ["latency"], r"rollback\.metrics\[0\]: unknown"),
        ("experiments.0.rollback.confidence", 0.3, r"rollback\.confidence"),
        ("groups.0.usd_per_1m_input_tokens", 0.5, r"groups\[0\]\.usd_per_1m_output_tokens"),
        ("groups.0.gpus_per_backend", 0, r"groups\[0\]\.gpus_per_backend"),
        ("groups.0.settings", {"max_model_len": [1]}, r"groups\[0\]\.settings\.max_model_len"),
    ],
    ids=lambda x: x if isinstance(x, str) and "." in x and "\\" not in x else None,
)
def test_config_errors_name_the_key(path: str, value: Any, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=_with(path, value), environ={})


def test_two_experiments_on_one_model_are_refused() -> None:
    cfg = dict(BASE_CFG, experiments=[*BASE_CFG["experiments"],
                                      {"name": "f", "baseline": "cand", "candidate": "base"}])  # fmt: skip
    with pytest.raises(ConfigError, match=r"experiments\[1\]\.models: overlaps"):
        load_config(overrides=cfg, environ={})


def test_group_settings_take_scalars_of_any_type() -> None:
    cfg = load_config(overrides=_with("groups.0.settings", {"max_model_len": 8192,
                                                            "kv_cache_dtype": "fp8",
                                                            "enforce_eager": True}), environ={})  # fmt: skip
    assert dict(cfg.groups[0].settings) == {"max_model_len": 8192, "kv_cache_dtype": "fp8",
                                            "enforce_eager": True}  # fmt: skip


# --- assignment ----------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0.0, 0.05, 0.3, 1.0], ids=str)
def test_split_matches_the_weight(weight: float) -> None:
    exps = experiments(weight=weight)
    n = 20_000
    cand = sum(exps.assign(request(), {}).group == "cand" for _ in range(n))  # type: ignore[union-attr]
    sd = math.sqrt(n * weight * (1 - weight))
    assert abs(cand - n * weight) <= 4 * sd + 1e-9


@pytest.mark.parametrize("stickiness", ["session", "tenant"])
def test_sticky_keys_stay_and_a_ramp_only_adds(stickiness: str) -> None:
    exps = experiments(weight=0.1, stickiness=stickiness)

    def group(key: str, rid: int) -> str:
        req = request(tenant=key if stickiness == "tenant" else "t")
        hdrs = {"x-session-id": key} if stickiness == "session" else {}
        return exps.assign(req, hdrs).group  # type: ignore[union-attr]

    keys = [f"k{i}" for i in range(400)]
    before = {k: {group(k, i) for i in range(3)} for k in keys}
    assert all(len(v) == 1 for v in before.values()), "a key changed group between requests"
    exps.set("e", weight=0.4)
    after = {k: group(k, 0) for k in keys}
    on_cand = [k for k, v in before.items() if v == {"cand"}]
    assert on_cand and all(after[k] == "cand" for k in on_cand), "ramping up moved keys back"
    assert sum(v == "cand" for v in after.values()) > len(on_cand)


def test_header_and_tenant_select_the_group() -> None:
    exps = experiments(weight=0.0, tenants=("beta",))
    assert exps.assign(request(), {"x-rightsizer-group": "cand"}).reason == "header"  # type: ignore[union-attr]
    assert exps.assign(request(), {"x-rightsizer-group": "other"}).group == "base"  # type: ignore[union-attr]
    got = exps.assign(request(tenant="beta"), {})
    assert got is not None and (got.group, got.reason) == ("cand", "tenant")
    exps.experiments[0].state = "rolled_back"
    assert exps.assign(request(tenant="beta"), {}).group == "base"  # type: ignore[union-attr]
    assert exps.assign(request(), {"x-rightsizer-group": "cand"}).group == "cand"  # type: ignore[union-attr]


def test_models_outside_the_experiment_are_not_assigned() -> None:
    exps = experiments(weight=1.0, models=("m",))
    assert exps.assign(request(model="other"), {}) is None
    assert exps.assign(request(model="m"), {}).group == "cand"  # type: ignore[union-attr]


# --- routing and admission -------------------------------------------------------------------


def _stack(limit: int = 2) -> Admission:
    a = Admission(pool_of(3, limit=limit))
    exps = Experiments(GROUPS, [], slo_ttft_s=0.5, slo_itl_s=0.05)
    a.router = build_router(RoutingConfig(policy="least_loaded"), PluginDeps(
        load=a.limits.load, inflight=a.limits.inflight, headroom=a.limits.has_headroom,  # type: ignore[arg-type]
        group_of=exps.group_of), timer=a.metrics.plugin_timer)  # fmt: skip
    a.scheduler.router = a.router
    return a


@pytest.mark.parametrize(("group", "down", "expect"), [
    ("cand", (), {"b1:80"}),
    ("base", (), {"b0:80"}),
    (None, (), {"b0:80", "b1:80", "b2:80"}),
    ("cand", ("b1:80",), {"b0:80", "b2:80"}),  # the candidate is down: served elsewhere
], ids=["candidate", "baseline", "no-experiment", "fallback"])  # fmt: skip
def test_group_filter(group: str | None, down: Sequence[str], expect: set[str]) -> None:
    a = _stack()
    for b in a.pool.backends:
        b.healthy = b.name not in down
    got = a.router.filter(RouteCtx(model="m", group=group), a.pool.serving("m"))
    assert {b.name for b in got} == expect


async def test_a_full_canary_queues_alone_and_a_retry_may_leave_the_group() -> None:
    a = _stack(limit=1)
    cand = request(group="cand")
    t1 = await a.scheduler.admit(cand, RouteCtx(model="m", group="cand"))
    assert t1.backend is not None and t1.backend.name == "b1:80"
    assert {b.name for b in t1.fallbacks} == {"b0:80", "b2:80"}, "a retry may go to the baseline"
    import asyncio

    waiting = asyncio.create_task(a.scheduler.admit(request(group="cand"),
                                                    RouteCtx(model="m", group="cand")))  # fmt: skip
    await asyncio.sleep(0)
    assert a.scheduler.waiting("m", "cand") == 1
    t2 = await a.scheduler.admit(request(group="base"), RouteCtx(model="m", group="base"))
    assert t2.backend is not None and t2.backend.name == "b0:80", "baseline not held up"
    assert [d for d in a.scheduler.depths() if d[2]] == [("m", "normal", 1)]
    t1.release()
    t3 = await waiting
    assert t3.backend is not None and t3.backend.name == "b1:80"
    t2.release()
    t3.release()


# --- rollback ----------------------------------------------------------------------------------


def test_window_slides_and_totals_stay() -> None:
    w = Window(10.0)
    for t in range(20):
        w.add(float(t), error=t % 2 == 0, slo_miss=None)
    assert w.counts(19.5) == (10, 5, 0, 0)
    assert w.total == [20, 10, 0, 0]
    assert w.counts(100.0) == (0, 0, 0, 0)


def _feed(exps: Experiments, group: str, n: int, *, fail: int = 0, slow: int = 0) -> None:
    for i in range(n):
        outcome = Outcome.UPSTREAM_ERROR if i < fail else Outcome.OK
        ttft_end = 2.0 if fail <= i < fail + slow else 0.05
        exps.observe(record(group=group, outcome=outcome, first_token_s=ttft_end))


@pytest.mark.parametrize(("fail", "slow", "reason"), [
    (0, 0, None),
    (1, 0, None),  # 1 in 12 vs 0 in 200: not worse by 2% with 99% confidence
    (6, 0, "errors"),
    (0, 8, "slo"),
], ids=["healthy", "one-error", "errors", "slow"])  # fmt: skip
def test_rollback_rule(fail: int, slow: int, reason: str | None) -> None:
    clock = FakeClock()
    exps = experiments(clock, weight=0.05)
    _feed(exps, "base", 200)
    _feed(exps, "cand", 12, fail=fail, slow=slow)
    exps.tick()
    exp = exps.experiments[0]
    if reason is None:
        assert exp.state == "running" and exp.weight == 0.05
        return
    assert exp.state == "rolled_back" and exp.weight == 0.0
    assert exp.rolled_back is not None and exp.rolled_back["reason"] == reason
    assert exp.rollbacks[reason] == 1


def test_too_few_candidate_samples_are_not_judged() -> None:
    exps = experiments(weight=0.05)
    _feed(exps, "base", 200)
    _feed(exps, "cand", 9, fail=9)  # all failed, but min_samples is 10
    exps.tick()
    assert exps.experiments[0].state == "running"
    assert exps.experiments[0].last_check["errors"]["judged"] is False


def test_retried_attempts_count_against_their_group() -> None:
    exps = experiments(weight=0.5)
    _feed(exps, "base", 100)
    for _ in range(10):
        exps.attempt_failed(request(group="cand"), "b1:80")
    exps.tick()
    assert exps.experiments[0].rolled_back["reason"] == "errors"  # type: ignore[index]


def test_an_unavailable_candidate_is_rolled_back_after_a_window() -> None:
    clock = FakeClock()
    exps = experiments(clock, available=False, weight=0.1)
    exps.tick()
    clock.advance(59.0)
    exps.tick()
    assert exps.experiments[0].state == "running"
    clock.advance(1.0)
    exps.tick()
    assert exps.experiments[0].rolled_back["reason"] == "unavailable"  # type: ignore[index]


def test_shadow_only_experiments_are_never_rolled_back() -> None:
    exps = experiments(weight=0.0)
    _feed(exps, "base", 100)
    _feed(exps, "cand", 50, fail=50)
    exps.tick()
    assert exps.experiments[0].state == "running"
    assert exps.experiments[0].last_check["errors"]["worse"] is True  # but it is measured


def test_resuming_after_a_rollback_clears_the_windows() -> None:
    exps = experiments(weight=0.2)
    _feed(exps, "base", 100)
    _feed(exps, "cand", 20, fail=20)
    exps.tick()
    assert exps.experiments[0].state == "rolled_back"
    exps.set("e", weight=0.05)
    exps.tick()
    exp = exps.experiments[0]
    assert exp.state == "running" and exp.weight == 0.05
    assert exp.windows["cand"].total == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        exps.set("e", weight=1.2)
    with pytest.raises(KeyError):
        exps.set("nope", weight=0.1)


# --- drift and metrics -----------------------------------------------------------------------


def test_drift_counts_distinct_announced_versions() -> None:
    pool = pool_of(3)
    groups = (GroupConfig(name="g", backends=("b0:80", "b1:80", "b2:80")),)
    exps = Experiments(groups, [], slo_ttft_s=0.5, slo_itl_s=0.05)
    entry = {"id": "m", "root": "/models/m-v1", "max_model_len": 2048, "created": 1}
    for i, b in enumerate(pool.backends):
        b.model_entries = {"m": {**entry, "created": i}}  # start times differ: not a version
    (d,) = drift(pool.backends, exps.group_of)
    assert d.distinct == 1
    pool.backends[2].model_entries = {"m": {**entry, "root": "/models/m-v2"}}
    pool.backends[1].snapshot = snapshot("b1:80", max_num_seqs=64)
    (d,) = drift(pool.backends, exps.group_of)
    assert d.distinct == 3 and len(set(d.versions.values())) == 3


def test_experiment_families_are_exported() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg)
    exps = experiments(weight=0.25)
    exps.assign(request(), {})
    verdict = {"experiment": "e", "cost_ratio": 0.6,
               "groups": [{"group": "base", "capacity_rps": 4.0, "usd_per_month": 100.0},
                          {"group": "cand", "capacity_rps": None, "usd_per_month": 60.0}]}  # fmt: skip
    m.watch_experiments(ExperimentsView(
        experiments=lambda: exps.experiments, group_of_backends=lambda: [("b0:80", "base")],
        drift=lambda: [], shadow_depth=lambda _e: 3, verdicts=lambda: [verdict],
    ))  # fmt: skip
    get = reg.get_sample_value
    assert get("rightsizer_experiment_weight", {"experiment": "e", "group": "cand"}) == 0.25
    assert get("rightsizer_experiment_state", {"experiment": "e", "state": "running"}) == 1.0
    assert get("rightsizer_shadow_queue_depth", {"experiment": "e"}) == 3.0
    assert get("rightsizer_backend_group_info", {"backend": "b0:80", "group": "base"}) == 1.0
    assert get("rightsizer_experiment_cost_ratio", {"experiment": "e"}) == 0.6
    assert get("rightsizer_experiment_capacity_requests_per_second",
               {"experiment": "e", "group": "cand"}) is None  # unknown: no sample, never -1  # fmt: skip
    assert sum(get("rightsizer_experiment_assignments_total",
                   {"experiment": "e", "group": g, "reason": "weight"}) or 0
               for g in ("base", "cand")) == 1  # fmt: skip


def test_group_metrics_keep_shadow_apart() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg)
    m.record_group(record(group="cand", shadow=True), [0.01] * 3)
    m.record_group(record(group="cand"), [0.01] * 3)
    labels = {"model": "m", "group": "cand"}
    for traffic in ("live", "shadow"):
        assert reg.get_sample_value("rightsizer_group_requests_total",
                                    {**labels, "traffic": traffic, "outcome": "ok"}) == 1  # fmt: skip
        assert reg.get_sample_value("rightsizer_group_inter_token_latency_seconds_count",
                                    {**labels, "traffic": traffic}) == 3  # fmt: skip


def test_records_carry_group_and_shadow_through_json() -> None:
    from estimator.records import RequestRecord

    rec = record(group="cand", shadow=True)
    assert RequestRecord.from_dict(rec.to_dict()) == rec
    old = {k: v for k, v in rec.to_dict().items() if k not in ("group", "shadow")}
    back = RequestRecord.from_dict(old)  # logs written before groups existed
    assert back.group is None and back.shadow is False
    assert dataclasses.replace(back, group="cand", shadow=True) == rec


def test_rollback_defaults_are_the_ones_the_false_alarm_test_measures() -> None:
    from tests.unit.estimator import test_abtest as measured

    rule = RollbackConfig()
    assert (rule.confidence, rule.error_margin, rule.slo_margin, rule.min_samples,
            rule.window_s) == (measured.CONFIDENCE, measured.ERROR_MARGIN, measured.SLO_MARGIN,
                               measured.MIN_SAMPLES, measured.WINDOW)  # fmt: skip
