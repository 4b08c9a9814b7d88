"""``rightsizer estimator``: the estimator as its own process, fed by the Redis stream of
RequestRecords (each entry a JSON array of records) that every proxy replica publishes
(``shared.redis_url``), so one estimator sees the whole fleet. Serves ``/metrics`` (the
estimator's gauges), ``/admin/estimator`` (the JSON report, behind ``server.admin_token`` like
the proxy's) and ``/health``. Reading resumes from the newest entry at start
(``--from-start`` replays what the stream still holds); if Redis goes away it keeps its state,
retries, and resumes where it stopped."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError

from estimator.records import RequestRecord
from proxy.estimation import InProcessEstimator
from proxy.handlers import estimator_report_handler
from proxy.tasks import cancel_and_wait
from proxy.telemetry import Metrics, metrics_handler

log = logging.getLogger("rightsizer.estimator")


class RecentIds:
    """The last ``size`` request ids seen: a replica resends a batch whose acknowledgement Redis
    could not deliver (at-least-once), and the estimator must count each request once."""

    def __init__(self, size: int = 200_000) -> None:
        self.size = size
        self._order: collections.deque[str] = collections.deque()
        self._seen: set[str] = set()

    def first_time(self, rid: str) -> bool:
        if rid in self._seen:
            return False
        self._seen.add(rid)
        self._order.append(rid)
        if len(self._order) > self.size:
            self._seen.discard(self._order.popleft())
        return True


async def consume(
    est: InProcessEstimator, client: aioredis.Redis, stream: str, last_id: str
) -> None:
    """Feed every record of the stream to the estimator, once each, forever."""
    recent = RecentIds()
    down = False
    while True:
        try:
            got: Any = await client.xread({stream: last_id}, count=5000, block=1000)
        except (RedisError, OSError) as exc:
            if not down:
                log.warning("records stream unavailable (%s); retrying", type(exc).__name__)
                down = True
            await asyncio.sleep(1.0)
            continue
        if down:
            log.info("records stream back")
            down = False
        for _name, entries in got or ():
            for entry_id, fields in entries:
                last_id = entry_id.decode()
                try:
                    for d in orjson.loads(fields[b"rs"]):
                        key = f"{d.get('request_id')}|{d.get('arrival_epoch')}|{d.get('end_s')}"
                        if recent.first_time(key):  # a client may reuse its request ids
                            est.observe(RequestRecord.from_dict(d))
                except (KeyError, ValueError, TypeError):
                    log.warning("skipping a malformed records entry %s", last_id)


def build_estimator_app(
    runner: InProcessEstimator,
    redis_url: str,
    stream: str,
    from_start: bool,
    *,
    admin_token: str | None = None,
) -> web.Application:
    app = web.Application()
    registry = CollectorRegistry()
    Metrics(registry).watch_estimator(runner)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        client = aioredis.Redis.from_url(redis_url, socket_timeout=5.0)
        tasks = [
            asyncio.create_task(consume(runner, client, stream, "0-0" if from_start else "$")),
            asyncio.create_task(runner.run()),
        ]
        yield
        await cancel_and_wait(tasks)
        await client.aclose()

    app.router.add_get("/metrics", metrics_handler(registry))
    app.router.add_get("/admin/estimator", estimator_report_handler(runner.report, admin_token))
    app.router.add_get("/health", health)
    app.cleanup_ctx.append(lifetime)
    return app
