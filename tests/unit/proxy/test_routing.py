from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from proxy.backends import Backend, BackendPool
from proxy.config import BackendConfig, HealthConfig, RoutingConfig
from proxy.prefix import PrefixIndex, block_hashes, canonical_text
from proxy.routing import POLICIES, SCORERS, RouteCtx, Router, make_router
from proxy.telemetry import Metrics


def backends(n: int, limit: int = 10) -> list[Backend]:
    pool = BackendPool([BackendConfig(url=f"http://b{i}:80", max_inflight=limit) for i in range(n)],
                       HealthConfig(), Metrics(CollectorRegistry()))  # fmt: skip
    for b in pool.backends:
        b.healthy, b.models = True, frozenset({"m"})
    return pool.backends


def router(policy: str, **kw: float) -> Router:
    return make_router(
        RoutingConfig(policy=policy, block_chars=16, **kw),
        load=lambda b: b.total_inflight / b.limit,
    )  # type: ignore[arg-type]


def ctx(text: str, session: str | None = None) -> RouteCtx:
    return RouteCtx(hashes=block_hashes(text, 16), session=session, now=100.0)


def test_hashes_are_chained_prefix_names() -> None:
    a, b = block_hashes("x" * 64, 16), block_hashes("x" * 48 + "y" * 16, 16)
    assert len(a) == 4 and a[:3] == b[:3] and a[3] != b[3]
    assert block_hashes("x" * 15, 16) == []
    assert block_hashes("y" * 16 + "x" * 16, 16)[1] != a[1], "a block's hash depends on its prefix"


def test_canonical_text_separates_roles() -> None:
    one = canonical_text({"messages": [{"role": "user", "content": "ab"}]}, "chat")
    two = canonical_text({"messages": [{"role": "use", "content": "rab"}]}, "chat")
    assert one != two
    assert canonical_text({"prompt": "hi"}, "completions") == "hi"


def test_index_is_bounded_and_decays() -> None:
    idx = PrefixIndex(max_blocks=5, ttl_s=10.0)
    h = block_hashes("z" * 16 * 8, 16)
    idx.insert(h, now=0.0)
    assert len(idx) == 5
    assert idx.match(h, now=1.0) == 5, "deep blocks are evicted first; the shared head stays"
    assert idx.match(h, now=11.0) == 0, "expired"


def test_prefix_policy_follows_the_prefix() -> None:
    r, bs = router("prefix"), backends(3)
    first = r.route(ctx("system prompt A " * 8), bs)
    r.on_routed(first.ordered[0], ctx("system prompt A " * 8))
    again = r.route(ctx("system prompt A " * 8 + "more"), bs)
    assert again.ordered[0] is first.ordered[0] and again.reason == "prefix_hit"
    assert again.matched_ratio == pytest.approx(1.0)


def test_load_guard_breaks_affinity_before_a_hotspot() -> None:
    r, bs = router("prefix", imbalance_abs=2, imbalance_rel=0.5), backends(2)
    c = ctx("shared system prompt " * 10)
    r.on_routed(bs[0], c)
    bs[0].inflight = 5
    d = r.route(c, bs)
    assert d.ordered[0] is bs[1] and d.reason == "imbalance_guard"
    bs[0].inflight = 2  # within the guard: affinity wins
    assert r.route(c, bs).ordered[0] is bs[0]


def test_round_robin_and_least_loaded() -> None:
    bs = backends(3)
    rr = router("round_robin")
    assert [rr.route(RouteCtx(), bs).ordered[0].name for _ in range(6)] == [b.name for b in bs] * 2
    ll = router("least_loaded")
    bs[0].inflight, bs[1].inflight, bs[2].inflight = 3, 1, 2
    assert ll.route(RouteCtx(), bs).ordered[0] is bs[1]


def test_session_affinity() -> None:
    r, bs = router("session"), backends(3)
    d = r.route(ctx("hello", session="s1"), bs)
    r.on_routed(d.ordered[0], ctx("hello", session="s1"))
    for _ in range(3):
        assert r.route(ctx("other", session="s1"), bs).ordered[0] is d.ordered[0]


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_every_scorer_stays_in_unit_range(name: str) -> None:
    """Conformance: every registered scorer returns scores in [0, 1]."""
    r, bs = (
        Router(scorers=[(name, 1.0)], load=lambda b: b.total_inflight / b.limit, block_chars=16),
        backends(3),
    )
    c = ctx("abc" * 40, session="s")
    r.on_routed(bs[0], c)
    bs[1].inflight = 50  # overloaded: load above 1
    loads = {b.name: b.total_inflight / b.limit for b in bs}
    matched = {b.name: r.index(b).match(c.hashes, c.now) for b in bs}
    for i, b in enumerate(bs):
        assert 0.0 <= SCORERS[name](r, c, b, i, loads, matched, len(c.hashes)) <= 1.0


def test_every_policy_builds() -> None:
    for policy in POLICIES:
        assert router(policy).scorers


def test_unknown_scorer_is_refused() -> None:
    with pytest.raises(ValueError, match="prefx"):
        Router(scorers=[("prefx", 1.0)], load=lambda b: 0.0)
