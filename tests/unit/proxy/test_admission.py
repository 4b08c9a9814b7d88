from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from prometheus_client import CollectorRegistry

from proxy.admission import Scheduler
from proxy.backends import BackendPool
from proxy.config import (
    AuthConfig,
    BackendConfig,
    HealthConfig,
    RoutingConfig,
    SchedulingConfig,
    TenantConfig,
)
from proxy.errors import Shed, Unauthorized
from proxy.exchange import Exchange
from proxy.routing import RouteCtx, make_router
from proxy.telemetry import Metrics
from proxy.tenants import TenantLedger, key_digest

_ids = itertools.count()


def make(
    limit: int = 1, tenants: tuple[TenantConfig, ...] = (), auth: bool = False, **sched: object
) -> tuple[Scheduler, CollectorRegistry]:
    reg = CollectorRegistry()
    metrics = Metrics(reg)
    pool = BackendPool(
        [BackendConfig(url="http://b0:80", max_inflight=limit)], HealthConfig(), metrics
    )
    for b in pool.backends:
        b.healthy, b.models = True, frozenset({"m"})
    router = make_router(
        RoutingConfig(policy="least_loaded"), load=lambda b: b.total_inflight / b.limit
    )
    ledger = TenantLedger(tenants, AuthConfig(required=auth), metrics)
    return Scheduler(SchedulingConfig(**sched), pool, router, ledger, metrics), reg  # type: ignore[arg-type]


def ex(priority: str = "normal", tenant: str = "t", tokens: int = 100) -> Exchange:
    e = Exchange(f"r{next(_ids)}", endpoint="chat")
    e.model, e.priority, e.tenant, e.est_tokens = "m", priority, tenant, tokens
    return e


async def admit(s: Scheduler, e: Exchange, deadline: float | None = None) -> object:
    return await s.admit(e, s.pool.candidates("m"), RouteCtx(), deadline)


async def test_grants_at_once_with_headroom_then_queues() -> None:
    s, _ = make(limit=1)
    first = ex()
    await admit(s, first)
    assert first.held is s.pool.backends[0] and s.pool.backends[0].inflight == 1
    waiting = asyncio.ensure_future(admit(s, ex()))
    await asyncio.sleep(0.01)
    assert not waiting.done() and s.total_waiting() == 1
    s.release(first)
    await asyncio.wait_for(waiting, 1)
    assert s.pool.backends[0].inflight == 1 and s.total_waiting() == 0


async def grant_order(s: Scheduler, blocker: Exchange, exchanges: list[Exchange]) -> list[str]:
    order: list[str] = []

    async def one(e: Exchange) -> None:
        await admit(s, e)
        order.append(e.request_id)
        await asyncio.sleep(0)
        s.release(e)

    tasks = [asyncio.ensure_future(one(e)) for e in exchanges]
    await asyncio.sleep(0.01)
    s.release(blocker)
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    return order


async def test_strict_priority_between_classes() -> None:
    s, _ = make(limit=1)
    blocker = ex()
    await admit(s, blocker)
    low, normal, critical = ex("low"), ex("normal"), ex("critical")
    order = await grant_order(s, blocker, [low, normal, critical])
    assert order == [critical.request_id, normal.request_id, low.request_id]


async def test_aging_prevents_starvation() -> None:
    s, _ = make(limit=1, aging_s=0.02)
    blocker = ex()
    await admit(s, blocker)
    order: list[str] = []

    async def one(e: Exchange) -> None:
        await admit(s, e)
        order.append(e.request_id)
        await asyncio.sleep(0)
        s.release(e)

    old_low = ex("low")
    t = asyncio.ensure_future(one(old_low))
    await asyncio.sleep(0.1)  # waited 5 aging periods: now ranks above a fresh high
    high = ex("high")
    t2 = asyncio.ensure_future(one(high))
    await asyncio.sleep(0.01)
    s.release(blocker)
    await asyncio.wait_for(asyncio.gather(t, t2), 2)
    assert order == [old_low.request_id, high.request_id]


async def test_tenant_fairness_inside_a_class() -> None:
    """A tenant flooding the queue is interleaved with a light one, not served first (FIFO)."""
    s, _ = make(limit=1)
    blocker = ex(tenant="heavy")
    await admit(s, blocker)
    heavy = [ex(tenant="heavy") for _ in range(6)]
    light = [ex(tenant="light") for _ in range(3)]
    order = await grant_order(s, blocker, heavy + light)
    light_ids = {e.request_id for e in light}
    assert light_ids <= set(order[:6]), order
    assert order[:6:2] == [e.request_id for e in heavy[:3]]


async def test_new_tenant_gets_no_idle_credit() -> None:
    s, _ = make(limit=1)
    blocker = ex(tenant="a")
    await admit(s, blocker)
    s.tenants.vtc["a"] = 500.0
    t = asyncio.ensure_future(admit(s, ex(tenant="a")))
    await asyncio.sleep(0)
    await asyncio.ensure_future(asyncio.sleep(0))
    t2 = asyncio.ensure_future(admit(s, ex(tenant="b")))
    await asyncio.sleep(0.01)
    assert s.tenants.counter("b") == 500.0
    for task in (t, t2):
        task.cancel()


@pytest.mark.parametrize("reason", ["deadline_exceeded", "queue_full", "saturated"])
async def test_shedding_reasons(reason: str) -> None:
    s, reg = make(limit=1, max_queue=1, shed_sheddable_above=0.5)
    await admit(s, ex())
    if reason == "deadline_exceeded":
        with pytest.raises(Shed) as info:
            await admit(s, ex(), deadline=0.05)
    elif reason == "queue_full":
        t = asyncio.ensure_future(admit(s, ex()))
        await asyncio.sleep(0.01)
        with pytest.raises(Shed) as info:
            await admit(s, ex())
        t.cancel()
    else:
        with pytest.raises(Shed) as info:
            await admit(s, ex("sheddable"))
    assert info.value.reason == reason and info.value.status == 429
    assert info.value.headers()["Retry-After"]
    priority = "sheddable" if reason == "saturated" else "normal"
    assert (
        reg.get_sample_value(
            "rightsizer_shed_total", {"model": "m", "priority": priority, "reason": reason}
        )
        == 1
    )


async def test_higher_class_displaces_lowest_newest_when_full() -> None:
    s, _ = make(limit=1, max_queue=1)
    await admit(s, ex())
    low = asyncio.ensure_future(admit(s, ex("low")))
    await asyncio.sleep(0.01)
    high = asyncio.ensure_future(admit(s, ex("high")))
    await asyncio.sleep(0.01)
    with pytest.raises(Shed) as info:
        await low
    assert info.value.reason == "displaced" and not high.done()
    high.cancel()


async def test_predicted_wait_sheds_early() -> None:
    s, _ = make(limit=1)
    q_ex = ex()
    await admit(s, q_ex)
    queue = s.queues["m"]
    queue.completions.extend([time.perf_counter() - 20 + i for i in range(5)])  # ~0.25 req/s
    waiters = [asyncio.ensure_future(admit(s, ex())) for _ in range(3)]
    await asyncio.sleep(0.01)
    with pytest.raises(Shed) as info:
        await admit(s, ex(), deadline=2.0)
    assert info.value.reason == "predicted_wait"
    for w in waiters:
        w.cancel()


async def test_cancelled_waiter_leaks_no_slot() -> None:
    s, _ = make(limit=1)
    first = ex()
    await admit(s, first)
    t = asyncio.ensure_future(admit(s, ex()))
    await asyncio.sleep(0.01)
    t.cancel()
    await asyncio.sleep(0.01)
    s.release(first)
    assert s.pool.backends[0].inflight == 0 and s.total_waiting() == 0


async def test_tenant_limits_and_api_keys() -> None:
    tenants = (TenantConfig(name="acme", api_key_sha256=(key_digest("sk-acme"),), priority="high",
                            max_concurrency=1, tokens_per_minute=150),)  # fmt: skip
    s, _ = make(limit=5, tenants=tenants, auth=True)
    assert s.tenants.identify({"authorization": "Bearer sk-acme"}, None) == ("acme", "high")
    with pytest.raises(Unauthorized):
        s.tenants.identify({"authorization": "Bearer nope"}, None)
    a = ex(tenant="acme", tokens=100)
    await admit(s, a)
    with pytest.raises(Shed) as info:
        await admit(s, ex(tenant="acme"))
    assert info.value.reason == "tenant_concurrency"
    a.prompt_tokens, a.completion_tokens = 60, 40
    s.release(a)
    with pytest.raises(Shed) as info:
        await admit(s, ex(tenant="acme", tokens=100))  # 100 used + 100 > 150 per minute
    assert info.value.reason == "tenant_tpm"


async def test_engine_saturation_holds_new_work() -> None:
    from estimator.records import BackendSnapshot

    s, _ = make(limit=10)
    b = s.pool.backends[0]
    await admit(s, ex())
    b.snapshot = BackendSnapshot(backend=b.name, time_s=0, waiting=20)
    assert s.with_headroom([b]) == []
    b.snapshot = BackendSnapshot(backend=b.name, time_s=0, waiting=0, kv_usage=0.5)
    assert s.with_headroom([b]) == [b]


def test_limit_learned_from_a_queueing_engine() -> None:
    from estimator.records import BackendSnapshot

    s, _ = make(limit=1)
    b = s.pool.backends[0]
    object.__setattr__(b.config, "max_inflight", None)  # no configured limit: learn it
    assert b.limit == 64  # scheduling.default_max_inflight
    b.learn(BackendSnapshot(backend=b.name, time_s=0, running=8, waiting=5))
    assert b.limit == 9  # 8 seen running while queueing, plus one probe
    b.learn(BackendSnapshot(backend=b.name, time_s=1, running=3, waiting=1))  # transient
    assert b.limit == 4
    for running in (4, 5, 6):
        b.learn(BackendSnapshot(backend=b.name, time_s=2, running=running, waiting=0))
    assert b.limit == 7, "climbs back while the engine takes more without queueing"
