"""In-flight limits: configured, engine-reported, or learned from the engine's own signals."""

from __future__ import annotations

from proxy.admission import Limits
from proxy.config import BackendConfig, SchedulingConfig
from proxy.state import LocalView
from proxy.upstream.backends import Backend
from tests.support.fakes import FakeClock, snapshot


def setup(**sched: object) -> tuple[Limits, Backend, FakeClock]:
    clock = FakeClock()
    limits = Limits(SchedulingConfig(**sched), LocalView(), clock=clock)  # type: ignore[arg-type]
    return limits, Backend(BackendConfig(url="http://b0:80")), clock


def offer(b: Backend, n: int) -> None:
    """The proxy has ``n`` requests in flight on ``b``."""
    while b.inflight < n:
        b.acquire(1)
    while b.inflight > n:
        b.release(1)


def test_sources_in_order() -> None:
    limits, b, _ = setup()
    assert (limits.limit(b), limits.source(b)) == (64, "default")
    b.snapshot = snapshot(b.name, max_num_seqs=256)
    assert (limits.limit(b), limits.source(b)) == (256 + 4, "engine")  # + its own small queue
    fixed = Backend(BackendConfig(url="http://b1:80", max_inflight=7))
    fixed.snapshot = snapshot(fixed.name, max_num_seqs=256)
    assert (limits.limit(fixed), limits.source(fixed)) == (7, "config")


def test_probes_up_while_the_engine_takes_everything() -> None:
    """A 256-sequence engine behind the 64 default: doubled while it runs all it gets without
    queueing, then set to what it runs once it queues."""
    limits, b, _ = setup()
    for expected in (128, 256, 512):
        offer(b, limits.limit(b))
        limits.observe(b, snapshot(b.name, running=limits.limit(b), waiting=0, kv_usage=0.3))
        assert (limits.limit(b), limits.source(b)) == (expected, "probing")
    offer(b, 512)
    limits.observe(b, snapshot(b.name, running=240, waiting=272, kv_usage=0.5))
    assert (limits.limit(b), limits.source(b)) == (512, "probing"), "one scrape is not enough"
    limits.observe(b, snapshot(b.name, running=256, waiting=256, kv_usage=0.5))
    assert (limits.limit(b), limits.source(b)) == (256 + 4, "learned")  # + engine_waiting_high


def test_no_probe_without_demand_or_with_a_full_cache() -> None:
    limits, b, _ = setup()
    offer(b, 10)  # far below the limit: nothing to learn
    limits.observe(b, snapshot(b.name, running=10, waiting=0))
    assert limits.limit(b) == 64
    offer(b, 64)
    limits.observe(b, snapshot(b.name, running=64, waiting=0, kv_usage=0.99))
    assert limits.limit(b) == 64, "a full KV cache is no room to grow into"


def test_learned_limit_follows_a_queueing_engine_and_reprobes_gently() -> None:
    limits, b, clock = setup(probe_hold_s=60.0)
    limits.observe(b, snapshot(b.name, running=8, waiting=5))
    assert (limits.limit(b), limits.source(b)) == (64, "default")
    limits.observe(b, snapshot(b.name, running=8, waiting=5))
    assert (limits.limit(b), limits.source(b)) == (8 + 4, "learned")
    # a scrape between vLLM's admissions (finished sequences not yet replaced) is ignored...
    limits.observe(b, snapshot(b.name, running=3, waiting=1))
    assert limits.limit(b) == 8 + 4
    # ... and a concurrency that stays lower is followed down
    limits.observe(b, snapshot(b.name, running=3, waiting=1))
    assert limits.limit(b) == 3 + 4
    offer(b, 7)
    limits.observe(b, snapshot(b.name, running=7, waiting=0))
    assert limits.limit(b) == 7, "held for probe_hold_s after the engine queued"
    clock.advance(61)
    limits.observe(b, snapshot(b.name, running=7, waiting=0))
    assert limits.limit(b) == 8, "then one small step at a time"


def test_ceiling_bounds_probing() -> None:
    limits, b, _ = setup(max_inflight_ceiling=100)
    for _ in range(3):
        offer(b, limits.limit(b))
        limits.observe(b, snapshot(b.name, running=limits.limit(b), waiting=0))
    assert limits.limit(b) == 100


def test_engine_pressure_lowers_the_effective_limit() -> None:
    limits, b, _ = setup()
    b.snapshot = snapshot(b.name, running=12, waiting=20)
    assert limits.effective_limit(b) == 12
    b.snapshot = snapshot(b.name, running=12, waiting=0, kv_usage=0.99)
    assert limits.effective_limit(b) == 12
    b.snapshot = snapshot(b.name, running=12, waiting=0, kv_usage=0.5)
    assert limits.effective_limit(b) == 64
