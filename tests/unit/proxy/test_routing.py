from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest

from proxy.app import build_app
from proxy.config import ConfigError, RoutingConfig, load_config
from proxy.routing import RouteCtx, Router, block_hashes, canonical_text
from proxy.routing.base import PluginDeps
from proxy.routing.prefix_index import PrefixIndex
from proxy.routing.registry import PLUGINS, POLICIES, SCORER_NAMES
from proxy.routing.scorers.session import ENTRY_BYTES, SessionScorer, session_key
from proxy.upstream.backends import Backend
from tests.support.fakes import Admission, pool_of


def stack(n: int, policy: str, limit: int = 10, **kw: float) -> tuple[Router, list[Backend]]:
    a = Admission(
        pool_of(n, limit=limit),
        routing=RoutingConfig(policy=policy, block_chars=16, **kw),  # type: ignore[arg-type]
    )
    return a.router, a.pool.backends


def ctx(text: str, session: str | None = None) -> RouteCtx:
    return RouteCtx(
        hashes=tuple(block_hashes(text, 16)),
        session=session_key(session) if session else None,
        now=100.0,
    )


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


def test_canonical_text_ignores_parts_without_text() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "image_url"}, {"text": None},
                                                      {"type": "text", "text": "ok"}]}]}  # fmt: skip
    assert canonical_text(body, "chat").endswith("ok\x1e")


def test_index_is_bounded_and_decays() -> None:
    idx = PrefixIndex(max_blocks=5, ttl_s=10.0)
    h = block_hashes("z" * 16 * 8, 16)
    idx.insert(h, now=0.0)
    assert len(idx) == 5
    assert idx.match(h, now=1.0) == 5, "deep blocks are evicted first; the shared head stays"
    assert idx.match(h, now=11.0) == 0, "expired"


def test_prefix_policy_follows_the_prefix() -> None:
    r, bs = stack(3, "prefix")
    first = r.route(ctx("system prompt A " * 8), bs)
    r.on_routed(ctx("system prompt A " * 8), first.ordered[0])
    again = r.route(ctx("system prompt A " * 8 + "more"), bs)
    assert again.ordered[0] is first.ordered[0] and again.reason == "prefix_hit"
    assert again.matched_ratio == pytest.approx(1.0)


def test_load_guard_breaks_affinity_before_a_hotspot() -> None:
    r, bs = stack(2, "prefix", imbalance_abs=2, imbalance_rel=0.5)
    c = ctx("shared system prompt " * 10)
    r.on_routed(c, bs[0])
    for _ in range(5):
        bs[0].acquire(1)
    d = r.route(c, bs)
    assert d.ordered[0] is bs[1] and d.reason == "imbalance_guard"
    for _ in range(3):
        bs[0].release(1)  # 2 in flight: within the guard, affinity wins
    assert r.route(c, bs).ordered[0] is bs[0]


def test_round_robin_and_least_loaded() -> None:
    rr, bs = stack(3, "round_robin")
    assert [rr.route(RouteCtx(), bs).ordered[0].name for _ in range(6)] == [b.name for b in bs] * 2
    ll, bs = stack(3, "least_loaded")
    for b, n in zip(bs, (3, 1, 2), strict=True):
        for _ in range(n):
            b.acquire(1)
    assert ll.route(RouteCtx(), bs).ordered[0] is bs[1]


def test_session_affinity() -> None:
    r, bs = stack(3, "session")
    d = r.route(ctx("hello", session="s1"), bs)
    r.on_routed(ctx("hello", session="s1"), d.ordered[0])
    for _ in range(3):
        got = r.route(ctx("other", session="s1"), bs)
        assert got.ordered[0] is d.ordered[0] and got.reason == "session"


def test_sessions_are_hashed_and_bounded_by_bytes() -> None:
    scorer = SessionScorer(memory_bytes=100 * ENTRY_BYTES)
    _, bs = stack(1, "session")
    for i in range(1000):
        scorer.on_routed(RouteCtx(session=session_key(f"{i}-" + "x" * 15_000)), bs[0])
    assert len(scorer) == 100
    assert all(len(k) == 16 for k in scorer._table), "ids are kept as 16-byte digests only"


def test_session_ids_are_not_kept_unless_the_policy_uses_them() -> None:
    r, _ = stack(2, "prefix")
    assert not r.uses_session and r.plugin("session") is None


def test_every_policy_builds_and_names_are_checked_at_load() -> None:
    for policy in POLICIES:
        assert stack(2, policy)[0].scorers
    for routing, key in (({"scorers": {"prefx": 1.0}}, r"routing\.scorers\.prefx"),
                         ({"policy": "fastest"}, r"routing\.policy")):  # fmt: skip
        config = load_config(overrides={"routing": routing}, environ={})
        with pytest.raises(ConfigError, match=key):  # at start-up, naming the key
            build_app(config)


def test_registry_knows_every_scorer_name() -> None:
    assert set(SCORER_NAMES) == {n for n, c in PLUGINS.items() if hasattr(c, "score")}


def test_plugins_are_timed() -> None:
    a = Admission(pool_of(2, limit=4), routing=RoutingConfig(policy="prefix", block_chars=16))
    a.router.route(ctx("q" * 64), a.pool.backends)
    a.router.filter(ctx("q" * 64), a.pool.backends)
    assert {"prefix", "load", "max_score", "headroom"} <= set(a.metrics.plugin_timer.calls)
    sample = a.registry.get_sample_value(
        "rightsizer_routing_plugin_calls_total", {"plugin": "prefix"}
    )
    assert sample == 1


# --- conformance: every registered plugin --------------------------------------------------


def _fresh(type_name: str, bs: Sequence[Backend]) -> object:
    a = Admission(pool_of(0))
    deps = PluginDeps(
        load=a.limits.load,
        inflight=a.limits.inflight,  # type: ignore[arg-type]
        headroom=a.limits.has_headroom,
    )  # type: ignore[arg-type]
    return PLUGINS[type_name].from_config(RoutingConfig(block_chars=16), deps)  # type: ignore[attr-defined]


def _backends(n: int) -> list[Backend]:
    bs = pool_of(n, limit=4).backends
    for i, b in enumerate(bs):
        for _ in range(i * 3):  # 0, 3, 6 (over its limit of 4), ...
            b.acquire(10)
    return bs


def _state(bs: Sequence[Backend]) -> list[tuple[object, ...]]:
    return [(b.name, b.inflight, b.inflight_tokens, b.healthy, b.models) for b in bs]


@pytest.mark.parametrize("n", [0, 1, 3], ids=["none", "one", "three"])
@pytest.mark.parametrize("type_name", sorted(PLUGINS))
def test_plugin_conformance(type_name: str, n: int) -> None:
    """Every registered plugin: output in range, inputs untouched, deterministic from a fresh
    instance, and well defined for 0, 1 and N candidates."""
    bs = _backends(n)
    c = ctx("abc" * 40, session="s")
    before, cands = _state(bs), list(bs)
    outs = []
    for _ in range(2):
        plugin = _fresh(type_name, bs)
        if hasattr(plugin, "on_routed") and bs:
            plugin.on_routed(c, bs[0])  # some history, the same for both instances
        if hasattr(plugin, "score"):
            out = plugin.score(c, cands)
            assert set(out) == {b.name for b in bs}
            assert all(0.0 <= v <= 1.0 for v in out.values()), out
        elif hasattr(plugin, "filter"):
            out = plugin.filter(c, cands)
            assert all(b in bs for b in out) and out == [b for b in bs if b in out]
        else:  # the picker
            out = plugin.order(cands, {b.name: 0.5 for b in bs}) if bs else []
            assert sorted(b.name for b in out) == sorted(b.name for b in bs)
            if len(out) > 1:
                guarded = copy.copy(out)
                plugin.guard(guarded)
                assert sorted(b.name for b in guarded) == sorted(b.name for b in bs)
            out = [b.name for b in out]
        outs.append(out)
    assert _state(bs) == before and cands == bs, "a plugin changed its inputs"
    assert outs[0] == outs[1], "not deterministic"
