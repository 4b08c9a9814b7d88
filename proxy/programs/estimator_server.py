"""``rightsizer estimator``: the estimator as its own process, fed by the Redis stream of
RequestRecords (each entry a JSON array of records) that every proxy replica publishes
(``shared.redis_url``), so one estimator sees
the whole fleet. Serves ``/metrics`` (the estimator's gauges), ``/admin/estimator`` (the JSON
report) and ``/health``. Reading resumes from the newest entry at start (``--from-start``
replays what the stream still holds); if Redis goes away it keeps its state, retries, and
resumes where it stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from redis.exceptions import RedisError

from estimator.records import RequestRecord
from estimator.service import Estimator
from proxy.telemetry import GaugeRow, StateCollector

log = logging.getLogger("rightsizer.estimator")
EST: web.AppKey[Estimator] = web.AppKey("estimator", Estimator)


async def consume(est: Estimator, client: aioredis.Redis, stream: str, last_id: str) -> None:
    """Feed every record of the stream to the estimator, forever."""
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
                        est.observe(RequestRecord.from_dict(d))
                except (KeyError, ValueError, TypeError):
                    log.warning("skipping a malformed records entry %s", last_id)


def build_estimator_app(
    est: Estimator, redis_url: str, stream: str, from_start: bool
) -> web.Application:
    app = web.Application()
    app[EST] = est
    registry = CollectorRegistry()

    def rows() -> list[GaugeRow]:
        report = est.report()
        if report is None:
            return []
        return [GaugeRow(f"rightsizer_{n}", d, ls, s) for n, d, ls, s in report.gauge_families()]

    registry.register(StateCollector(rows))

    async def metrics(request: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def report(request: web.Request) -> web.Response:
        r = est.report()
        if r is None:
            return web.json_response({"status": "no_report"}, status=503)
        return web.Response(body=orjson.dumps(r.to_dict()), content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        client = aioredis.Redis.from_url(redis_url, socket_timeout=5.0)
        tasks = [
            asyncio.create_task(consume(est, client, stream, "0-0" if from_start else "$")),
            asyncio.create_task(_refresh(est)),
        ]
        yield
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await client.aclose()

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/estimator", report)
    app.router.add_get("/health", health)
    app.cleanup_ctx.append(lifetime)
    return app


async def _refresh(est: Estimator) -> None:
    while True:
        await asyncio.sleep(est.config.refresh_interval_s)
        try:
            await asyncio.to_thread(est.refresh)
        except Exception:  # keep consuming; the next refresh may succeed
            log.exception("estimator refresh failed")
