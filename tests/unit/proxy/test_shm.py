"""ShmView: what one worker publishes, the others read at once; prefix decisions travel
through each writer's ring; a dead worker's block stops counting."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence

import pytest

from proxy import shm
from proxy.routing import block_hashes


@pytest.fixture
def segment() -> Iterator[str]:
    name = f"rightsizer-test-{os.getpid()}-{os.urandom(3).hex()}"
    seg = shm.create(name, workers=3, backends=2, tenants=1)
    try:
        yield name
    finally:
        for v in _open:
            v.close()
        _open.clear()
        shm.destroy(seg)


_open: list[shm.ShmView] = []


def view(
    name: str, index: int, learned: list[tuple[str, list[bytes]]] | None = None
) -> shm.ShmView:
    def learn(backend: str, hashes: Sequence[bytes], t: float) -> None:
        assert learned is not None
        learned.append((backend, list(hashes)))

    v = shm.ShmView(name, index, ["b0", "b1"], ["acme"],
                    learn_prefix=learn if learned is not None else None)  # fmt: skip
    _open.append(v)
    return v


def test_counts_are_seen_by_the_other_workers_at_once(segment: str) -> None:
    w0, w1, w2 = view(segment, 0), view(segment, 1), view(segment, 2)
    w0.publish_backend("b1", 3)
    w1.publish_backend("b1", 2)
    assert (w2.remote_inflight("b1"), w0.remote_inflight("b1"), w2.remote_inflight("b0")) == (
        5,
        2,
        0,
    )
    assert w0.replicas == 3 and w0.fresh
    window = int(time.time() // 60)
    w1.publish_tenant("acme", 1, 500, window)
    w2.publish_tenant("acme", 2, 300, window)
    assert (w0.remote_tenant_inflight("acme"), w0.remote_tenant_tokens("acme")) == (3, 800)
    w2.publish_tenant("acme", 0, 10, window - 1)  # a stale minute does not count
    assert w0.remote_tenant_tokens("acme") == 500
    assert w0.remote_inflight("unknown") == 0 and w0.remote_tenant_inflight("nobody") == 0


def test_prefix_decisions_reach_the_other_workers(segment: str) -> None:
    learned: list[tuple[str, list[bytes]]] = []
    w0, w1 = view(segment, 0), view(segment, 1, learned)
    first = block_hashes("system prompt " * 20, 16)
    second = block_hashes("other " * 20, 16)
    w0.on_routed("b1", first)
    w0.on_routed("b0", second)
    w1.sync()
    assert learned == [("b1", first), ("b0", second)]
    w1.sync()
    assert len(learned) == 2, "each decision is applied once"


def test_a_ring_overrun_skips_what_was_overwritten(segment: str) -> None:
    learned: list[tuple[str, list[bytes]]] = []
    w0, w1 = view(segment, 0), view(segment, 1, learned)
    h = block_hashes("z" * 16 * 5, 16)
    for _ in range(shm.RING // 5 + 10):
        w0.on_routed("b0", h)
    w1.sync()
    assert learned and all(b == "b0" and hs == h for b, hs in learned)
    assert len(learned) <= shm.RING // 5


def test_a_stopped_or_silent_worker_stops_counting(
    segment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    w0, w1 = view(segment, 0), view(segment, 1)
    w1.publish_backend("b0", 4)
    assert w0.remote_inflight("b0") == 4
    monkeypatch.setattr(shm, "STALE_S", 0.0)  # as if its heartbeat were old
    assert w0.remote_inflight("b0") == 0 and w0.replicas == 1
    monkeypatch.undo()
    seg = shm.attach(segment)
    shm.clear_block(seg, 1)  # what the supervisor does before restarting it
    seg.close()
    w1._beat()
    assert w0.remote_inflight("b0") == 0


def test_a_segment_of_another_configuration_is_refused(segment: str) -> None:
    with pytest.raises(ValueError, match="does not match"):
        shm.ShmView(segment, 0, ["b0"], [])
