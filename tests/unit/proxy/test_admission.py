from __future__ import annotations

import asyncio
import time

import pytest

from proxy.admission import Scheduler, Ticket, key_digest
from proxy.config import AuthConfig, SchedulingConfig, TenantConfig
from proxy.errors import NoHealthyBackend, Shed, Unauthorized
from proxy.request import InferenceRequest
from proxy.routing import RouteCtx
from tests.support.fakes import Admission, FakeClock, pool_of, request, snapshot


def make(
    limit: int = 1,
    tenants: tuple[TenantConfig, ...] = (),
    auth: bool = False,
    clock: FakeClock | None = None,
    **sched: object,
) -> Admission:
    return Admission(
        pool_of(1, limit=limit),
        scheduling=SchedulingConfig(**sched),  # type: ignore[arg-type]
        tenants=tenants,
        auth=AuthConfig(required=auth),
        clock=clock,
    )


def ex(priority: str = "normal", tenant: str = "t", tokens: int = 100) -> InferenceRequest:
    return request(priority=priority, tenant=tenant, tokens=tokens)


async def admit(s: Scheduler, r: InferenceRequest, deadline: float | None = None) -> Ticket:
    if deadline is not None:
        r = InferenceRequest(**{**_fields(r), "deadline_s": deadline})
    return await s.admit(r, RouteCtx(model="m"))


def _fields(r: InferenceRequest) -> dict[str, object]:
    return {f: getattr(r, f) for f in r.__dataclass_fields__}


async def test_grants_at_once_with_headroom_then_queues() -> None:
    a = make(limit=1)
    s = a.scheduler
    first = await admit(s, ex())
    assert first.backend is a.pool.backends[0] and a.pool.backends[0].inflight == 1
    waiting = asyncio.ensure_future(admit(s, ex()))
    await asyncio.sleep(0.01)
    assert not waiting.done() and s.total_waiting() == 1
    first.release()
    await asyncio.wait_for(waiting, 1)
    assert a.pool.backends[0].inflight == 1 and s.total_waiting() == 0


async def grant_order(s: Scheduler, blocker: Ticket, reqs: list[InferenceRequest]) -> list[str]:
    order: list[str] = []

    async def one(r: InferenceRequest) -> None:
        t = await admit(s, r)
        order.append(r.request_id)
        await asyncio.sleep(0)
        t.release()

    tasks = [asyncio.ensure_future(one(r)) for r in reqs]
    await asyncio.sleep(0.01)
    blocker.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    return order


async def test_strict_priority_between_classes() -> None:
    s = make(limit=1).scheduler
    blocker = await admit(s, ex())
    low, normal, critical = ex("low"), ex("normal"), ex("critical")
    order = await grant_order(s, blocker, [low, normal, critical])
    assert order == [critical.request_id, normal.request_id, low.request_id]


async def test_aging_prevents_starvation() -> None:
    clock = FakeClock()
    s = make(limit=1, aging_s=0.02, clock=clock).scheduler
    blocker = await admit(s, ex())
    order: list[str] = []

    async def one(r: InferenceRequest) -> None:
        t = await admit(s, r)
        order.append(r.request_id)
        await asyncio.sleep(0)
        t.release()

    old_low = ex("low")
    t = asyncio.ensure_future(one(old_low))
    await asyncio.sleep(0.01)
    clock.advance(0.1)  # waited 5 aging periods: now ranks above a fresh high
    high = ex("high")
    t2 = asyncio.ensure_future(one(high))
    await asyncio.sleep(0.01)
    blocker.release()
    await asyncio.wait_for(asyncio.gather(t, t2), 2)
    assert order == [old_low.request_id, high.request_id]


async def test_tenant_fairness_inside_a_class() -> None:
    """A tenant flooding the queue is interleaved with a light one, not served first (FIFO)."""
    s = make(limit=1).scheduler
    blocker = await admit(s, ex(tenant="heavy"))
    heavy = [ex(tenant="heavy") for _ in range(6)]
    light = [ex(tenant="light") for _ in range(3)]
    order = await grant_order(s, blocker, heavy + light)
    light_ids = {r.request_id for r in light}
    assert light_ids <= set(order[:6]), order
    assert order[:6:2] == [r.request_id for r in heavy[:3]]


async def test_new_tenant_gets_no_idle_credit() -> None:
    s = make(limit=1).scheduler
    await admit(s, ex(tenant="a"))
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
    a = make(limit=1, max_queue=1, shed_sheddable_above=0.5)
    s = a.scheduler
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
    labels = {"model": "m", "priority": priority, "reason": reason}
    assert a.registry.get_sample_value("rightsizer_shed_total", labels) == 1


async def test_no_healthy_backend_is_503_and_counted() -> None:
    a = make(limit=1)
    a.pool.backends[0].healthy = False
    with pytest.raises(NoHealthyBackend) as info:
        await admit(a.scheduler, ex())
    assert info.value.status == 503 and info.value.headers()["Retry-After"]
    labels = {"model": "m", "priority": "normal", "reason": "no_backend"}
    assert a.registry.get_sample_value("rightsizer_shed_total", labels) == 1


async def test_higher_class_displaces_lowest_newest_when_full() -> None:
    s = make(limit=1, max_queue=1).scheduler
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
    s = make(limit=1).scheduler
    await admit(s, ex())
    s._queue("m").completions.extend([time.perf_counter() - 20 + i for i in range(5)])  # ~0.25/s
    waiters = [asyncio.ensure_future(admit(s, ex())) for _ in range(3)]
    await asyncio.sleep(0.01)
    with pytest.raises(Shed) as info:
        await admit(s, ex(), deadline=2.0)
    assert info.value.reason == "predicted_wait"
    for w in waiters:
        w.cancel()


async def test_cancelled_waiter_leaks_no_slot() -> None:
    a = make(limit=1)
    s = a.scheduler
    first = await admit(s, ex())
    t = asyncio.ensure_future(admit(s, ex()))
    await asyncio.sleep(0.01)
    t.cancel()
    await asyncio.sleep(0.01)
    first.release()
    assert a.pool.backends[0].inflight == 0 and s.total_waiting() == 0


async def test_ticket_release_is_idempotent_and_moves_with_a_retry() -> None:
    a = Admission(pool_of(2, limit=4))
    b0, b1 = a.pool.backends
    t = await admit(a.scheduler, ex())
    first = t.backend
    other = b1 if first is b0 else b0
    t.move(other)
    assert (first.inflight, other.inflight) == (0, 1)
    t.release()
    t.release()
    assert (b0.inflight, b1.inflight) == (0, 0)


async def test_tenant_limits_and_api_keys() -> None:
    tenants = (TenantConfig(name="acme", api_key_sha256=(key_digest("sk-acme"),), priority="high",
                            max_concurrency=1, tokens_per_minute=150),)  # fmt: skip
    s = make(limit=5, tenants=tenants, auth=True).scheduler
    who = s.tenants.identify({"authorization": "Bearer sk-acme"}, None)
    assert (who.tenant, who.default_class) == ("acme", "high")
    assert s.tenants.identify({"authorization": "bearer sk-acme"}, None).tenant == "acme"
    with pytest.raises(Unauthorized):
        s.tenants.identify({"authorization": "Bearer nope"}, None)
    with pytest.raises(Unauthorized):  # a non-UTF-8 key is an unknown key, not a crash
        s.tenants.identify({"authorization": "Bearer sk-\udcff"}, None)
    a = await admit(s, ex(tenant="acme", tokens=100))
    with pytest.raises(Shed) as info:
        await admit(s, ex(tenant="acme"))
    assert info.value.reason == "tenant_concurrency"
    a.release(60 + 40)
    with pytest.raises(Shed) as info:
        await admit(s, ex(tenant="acme", tokens=100))  # 100 used + 100 > 150 per minute
    assert info.value.reason == "tenant_tpm"


@pytest.mark.parametrize(
    ("headers", "tenant", "ceiling"),
    [
        ({"authorization": "Bearer sk-vip"}, "vip", "critical"),
        ({"x-tenant": "open-team"}, "open-team", "high"),
        ({"x-tenant": "stranger"}, "stranger", "normal"),
        ({}, "default", "normal"),
    ],
    ids=["api-key", "configured-without-keys", "unconfigured-claim", "anonymous"],
)
def test_priority_ceilings(headers: dict[str, str], tenant: str, ceiling: str) -> None:
    tenants = (
        TenantConfig(name="vip", api_key_sha256=(key_digest("sk-vip"),), max_priority="critical"),
        TenantConfig(name="open-team", max_priority="high"),
    )
    s = make(tenants=tenants).scheduler
    who = s.tenants.identify(headers, None)
    assert (who.tenant, who.ceiling) == (tenant, ceiling)


def test_a_tenant_cannot_ask_above_its_own_class_unless_allowed() -> None:
    tenants = (TenantConfig(name="team", api_key_sha256=(key_digest("sk-t"),), priority="low"),)
    who = make(tenants=tenants).scheduler.tenants.identify({"authorization": "Bearer sk-t"}, None)
    assert (who.default_class, who.ceiling) == ("low", "low")


def test_claiming_a_keyed_tenant_without_its_key_is_refused() -> None:
    tenants = (TenantConfig(name="vip", api_key_sha256=(key_digest("sk-vip"),)),)
    s = make(tenants=tenants).scheduler
    with pytest.raises(Unauthorized):
        s.tenants.identify({"x-tenant": "vip"}, None)


def test_body_user_becomes_a_digest_not_a_label() -> None:
    s = make().scheduler
    who = s.tenants.identify({}, {"user": "alice@example.com"})
    assert who.tenant.startswith("user-") and "alice" not in who.tenant


async def test_engine_saturation_holds_new_work() -> None:
    a = make(limit=10)
    b = a.pool.backends[0]
    await admit(a.scheduler, ex())
    b.snapshot = snapshot(b.name, waiting=20)
    assert a.router.filter(RouteCtx(), [b]) == []
    b.snapshot = snapshot(b.name, waiting=0, kv_usage=0.5)
    assert a.router.filter(RouteCtx(), [b]) == [b]
