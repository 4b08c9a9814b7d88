"""Two proxy replicas sharing state through a real redis-server (started here, on its own
port), in front of two emulated engines: they share in-flight counts, the prefix index and
the records stream, and keep serving when Redis dies and comes back."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import orjson
import pytest
import redis

from tests.support.procs import (
    Proc,
    http_get,
    metric_value,
    read_records,
    start_emulator,
    start_proxy,
    wait_for,
)
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    r = RedisServer()
    r.start()
    yield r
    r.stop()


@pytest.fixture
def fleet(redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[list[Proc], list[Proc]]]:
    emus = [start_emulator("emu", ttft=0.02, itl=0.01, max_num_seqs=64) for _ in range(2)]
    cfg = {
        "backends": [{"url": e.url, "max_inflight": 6} for e in emus],
        "shared": {
            "redis_url": f"redis://127.0.0.1:{redis_server.port}/0",
            "sync_interval_s": 0.05,
        },
        "health": {"interval_s": 1.0, "scrape_interval_s": 0},
        "scheduling": {"engine_waiting_high": 1000},
        "routing": {"policy": "prefix", "block_chars": 64},
    }
    proxies = [start_proxy([], config=cfg, request_log=tmp_path / f"p{i}.jsonl") for i in range(2)]
    for i, p in enumerate(proxies):
        p.extra["log"] = tmp_path / f"p{i}.jsonl"
    yield proxies, emus
    for proc in (*proxies, *emus):
        proc.stop()


async def _load(urls: list[str], n: int, concurrency: int, max_tokens: int = 40) -> list[object]:
    clients = [
        openai.AsyncOpenAI(base_url=u + "/v1", api_key="x", max_retries=0, timeout=60) for u in urls
    ]
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> object:
        async with sem:
            try:
                r = await clients[i % len(clients)].completions.create(
                    model="emu", prompt=f"request {i} " * 5, max_tokens=max_tokens)  # fmt: skip
                return r.usage.completion_tokens if r.usage else None
            except openai.APIError as exc:
                return exc

    try:
        return list(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        for c in clients:
            await c.close()


def _peak_running(emus: list[Proc], stop: threading.Event, peaks: list[float]) -> None:
    time.sleep(1.0)  # steady state: after both replicas have synced once under load
    while not stop.is_set():
        for i, e in enumerate(emus):
            text = e.metrics_text()
            peaks[i] = max(peaks[i], metric_value(text, "vllm:num_requests_running")
                           + metric_value(text, "vllm:num_requests_waiting"))  # fmt: skip
        time.sleep(0.02)


def test_two_replicas_share_backend_limits(fleet: tuple[list[Proc], list[Proc]]) -> None:
    proxies, emus = fleet
    stop, peaks = threading.Event(), [0.0, 0.0]
    sampler = threading.Thread(target=_peak_running, args=(emus, stop, peaks))
    sampler.start()
    try:
        results = asyncio.run(_load([p.url for p in proxies], 240, 48))
    finally:
        stop.set()
        sampler.join()
    assert results == [40] * 240
    # 6 per backend across both replicas; each replica alone would allow 6 more (12). A sync
    # interval of slack is allowed.
    assert max(peaks) <= 9, peaks
    for p in proxies:
        assert metric_value(p.metrics_text(), "rightsizer_shared_state_up") == 1.0


def _syncs(p: Proc) -> float:
    return metric_value(p.metrics_text(), "rightsizer_shared_state_syncs_total", result="ok")


def _two_syncs(proxies: list[Proc]) -> None:
    """Wait until every replica completed two more sync rounds (no sleeping on a guess)."""
    start = [_syncs(p) for p in proxies]
    wait_for(lambda: all(_syncs(p) >= s + 2 for p, s in zip(proxies, start, strict=True)))


def test_prefix_index_is_shared(fleet: tuple[list[Proc], list[Proc]]) -> None:
    proxies, _ = fleet
    a, b = (openai.OpenAI(base_url=p.url + "/v1", api_key="x", max_retries=0) for p in proxies)
    for k in range(6):
        system = f"You are assistant number {k}. " * 20
        a.chat.completions.create(model="emu", max_tokens=2, extra_headers={"x-request-id": f"a{k}"},
                                  messages=[{"role": "system", "content": system}, {"role": "user", "content": "hi"}])  # fmt: skip
        _two_syncs(proxies)  # a has pushed its decision and b has pulled it
        b.chat.completions.create(model="emu", max_tokens=2, extra_headers={"x-request-id": f"b{k}"},
                                  messages=[{"role": "system", "content": system}, {"role": "user", "content": "bye"}])  # fmt: skip
    wait_for(lambda: len(read_records(proxies[1].extra["log"])) >= 6)  # type: ignore[arg-type]
    ra = {r["request_id"]: r["backend"] for r in read_records(proxies[0].extra["log"])}  # type: ignore[arg-type]
    rb = {r["request_id"]: r["backend"] for r in read_records(proxies[1].extra["log"])}  # type: ignore[arg-type]
    assert all(ra[f"a{k}"] == rb[f"b{k}"] for k in range(6)), (ra, rb)
    assert (
        metric_value(
            proxies[1].metrics_text(), "rightsizer_routing_decisions_total", reason="prefix_hit"
        )
        >= 6
    )


def test_records_stream_sees_every_replica(
    fleet: tuple[list[Proc], list[Proc]], redis_server: RedisServer
) -> None:
    proxies, _ = fleet
    results = asyncio.run(_load([p.url for p in proxies], 30, 8, max_tokens=3))
    assert results == [3] * 30
    c = redis.Redis(port=redis_server.port)

    def in_stream() -> int:
        return sum(len(orjson.loads(f[b"rs"])) for _, f in c.xrange("rightsizer:records"))

    wait_for(lambda: in_stream() == 30, timeout_s=5)
    c.close()


def test_redis_outage_fails_no_request(
    fleet: tuple[list[Proc], list[Proc]], redis_server: RedisServer
) -> None:
    proxies, _ = fleet
    result: list[object] = []
    t = threading.Thread(
        target=lambda: result.extend(
            asyncio.run(_load([p.url for p in proxies], 400, 16, max_tokens=10))
        )
    )
    t.start()
    time.sleep(0.7)
    redis_server.signal(signal.SIGKILL)
    wait_for(
        lambda: all(
            metric_value(p.metrics_text(), "rightsizer_shared_state_up") == 0 for p in proxies
        ),
        timeout_s=10,
    )
    time.sleep(0.5)
    redis_server.start()  # same port
    wait_for(
        lambda: all(
            metric_value(p.metrics_text(), "rightsizer_shared_state_up") == 1 for p in proxies
        ),
        timeout_s=10,
    )
    t.join(timeout=120)
    assert result == [10] * 400, [r for r in result if r != 10][:3]
    logs = "".join(p.log_path.read_text() for p in proxies)
    assert logs.count("Redis unavailable") == 2, "one warning per replica per outage"
    assert logs.count("Redis is back") == 2
    with contextlib.suppress(Exception):
        redis.Redis(port=redis_server.port).close()


def test_standalone_estimator_sees_all_replicas(
    fleet: tuple[list[Proc], list[Proc]], redis_server: RedisServer
) -> None:
    from tests.support.procs import start_estimator

    proxies, _ = fleet
    assert asyncio.run(_load([p.url for p in proxies], 60, 8, max_tokens=4)) == [4] * 60
    est = start_estimator(f"redis://127.0.0.1:{redis_server.port}/0",
                          config={"estimator": {"refresh_interval_s": 0.5, "min_records": 10}})  # fmt: skip
    try:

        def observed() -> int:
            status, body = http_get(est.url + "/admin/estimator")
            if status != 200:
                return 0
            deps = orjson.loads(body)["deployments"]
            return sum(d["requests_observed"] for d in deps)

        wait_for(lambda: observed() == 60, timeout_s=20)
        assert "rightsizer_estimator_rate_requests_per_second" in est.metrics_text()
    finally:
        est.stop()
