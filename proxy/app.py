"""``build_app(config, deps) -> web.Application``: routes, middlewares and lifetimes; no logic."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from estimator.records import BackendSnapshot, RequestRecord

from . import handlers as h
from .admission import Scheduler
from .backends import BackendPool
from .config import ProxyConfig
from .errors import MethodNotAllowed, ProxyError, error_body, error_response
from .gpu import GpuSampler
from .recorder import Recorder, RequestLog
from .relay import Upstream
from .routing import make_router
from .shared import SharedState
from .telemetry import GaugeRow, Metrics
from .tenants import TenantLedger

log = logging.getLogger("rightsizer.app")


class EstimatorLike(Protocol):
    def observe(self, record: RequestRecord) -> None: ...
    def observe_backend(self, snapshot: BackendSnapshot) -> None: ...
    def refresh(self) -> Any: ...


@dataclass(slots=True, kw_only=True)
class Deps:
    """What the app is built with; tests inject their own registry and subscribers."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    estimator: EstimatorLike | None = None
    report_dict: Callable[[], dict[str, Any] | None] | None = None
    report_gauges: Callable[[], Iterable[GaugeRow]] | None = None
    subscribers: list[tuple[str, Callable[[RequestRecord], None]]] = field(default_factory=list)
    gpu: GpuSampler | None = None


def _request_id(request: web.Request) -> str:
    rid = request.headers.get("x-request-id", "")
    if 0 < len(rid) <= 128 and rid.isprintable():
        return rid
    return os.urandom(12).hex()


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    rid = request[h.REQUEST_ID] = _request_id(request)
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except ProxyError as err:
        return error_response(err, rid)
    except web.HTTPException as exc:  # router-level: unknown path, wrong method, body too big
        if exc.status == 405:
            return error_response(
                MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}."), rid
            )
        message = exc.reason if exc.status != 404 else f"Unknown path {request.path}."
        return web.json_response(
            error_body(message, "invalid_request_error"),
            status=exc.status,
            headers={"x-request-id": rid},
        )
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in request %s", rid)
        return web.json_response(
            error_body("Internal error in the proxy; see its log.", "internal_error"),
            status=500,
            headers={"x-request-id": rid},
        )


def build_app(config: ProxyConfig, deps: Deps | None = None) -> web.Application:
    deps = deps or Deps()
    app = web.Application(
        middlewares=[error_middleware], client_max_size=config.server.max_body_bytes
    )
    metrics = Metrics(deps.registry, max_tenants=config.metrics.max_tenants)
    est = deps.estimator
    pool = BackendPool(
        config.backends, config.health, metrics, on_snapshot=est.observe_backend if est else None
    )
    gpu = deps.gpu
    if gpu is not None and gpu.available:
        metrics.add_state(gpu.gauges)
        if config.gpu.backend is not None:
            gpu_backend = config.gpu.backend
            pool.gpu_source = lambda name: gpu.last if name == gpu_backend else ()
    request_log = RequestLog(config.request_log, metrics) if config.request_log.path else None
    recorder = Recorder(metrics, request_log)
    if est is not None:
        recorder.subscribe("estimator", est.observe)
    for name, fn in deps.subscribers:
        recorder.subscribe(name, fn)
    if deps.report_gauges is not None:
        metrics.add_state(deps.report_gauges)
    app[_DEPS] = deps
    app[_POOL] = pool
    app[_RECORDER] = recorder
    app[_CONFIG] = config
    app[_METRICS] = metrics
    app.cleanup_ctx.append(_lifetime)
    _routes(app)
    return app


_DEPS: web.AppKey[Deps] = web.AppKey("deps", Deps)
_POOL: web.AppKey[BackendPool] = web.AppKey("pool", BackendPool)
_RECORDER: web.AppKey[Recorder] = web.AppKey("recorder", Recorder)
_CONFIG: web.AppKey[ProxyConfig] = web.AppKey("config", ProxyConfig)
_METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)


def _routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", h.chat_completions)
    app.router.add_post("/v1/completions", h.completions)
    app.router.add_get("/v1/models", h.list_models)
    app.router.add_route("*", "/v1/{tail:.+}", h.other_v1)
    app.router.add_get("/health", h.health)
    app.router.add_get("/ready", h.ready)
    app.router.add_get("/metrics", h.metrics)
    app.router.add_get("/admin/estimator", h.estimator_report)


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    config, pool, deps = app[_CONFIG], app[_POOL], app[_DEPS]
    connector = aiohttp.TCPConnector(
        limit=0, ttl_dns_cache=300, keepalive_timeout=config.timeouts.keepalive_s
    )
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    metrics = app[_METRICS]
    upstream = Upstream(session, pool, config.timeouts, metrics)
    tenants = TenantLedger(config.tenants, config.auth, metrics)
    router = make_router(config.routing, load=lambda b: b.total_inflight / max(1, b.limit))
    scheduler = Scheduler(config.scheduling, pool, router, tenants, metrics)
    app[h.STATE] = h.ProxyState(
        config=config,
        pool=pool,
        upstream=upstream,
        recorder=app[_RECORDER],
        metrics=metrics,
        router=router,
        scheduler=scheduler,
        tenants=tenants,
        report=deps.report_dict,
    )
    await pool.start(session)
    background: list[asyncio.Task[None]] = []
    if deps.gpu is not None and deps.gpu.available:
        background.append(asyncio.create_task(deps.gpu.run(config.gpu.interval_s)))
    shared = None
    if config.shared.redis_url:
        shared = SharedState(config.shared, pool, router, tenants, metrics)
        router.listeners.append(shared.on_routed)
        app[_RECORDER].subscribe("redis_stream", shared.on_record)
        await shared.start()
    if deps.estimator is not None:
        background.append(asyncio.create_task(_refresh_loop(deps.estimator, config)))
    try:
        yield
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if shared is not None:
            await shared.stop()
        await pool.stop()
        await upstream.close()
        await session.close()
        app[_RECORDER].close()


async def _refresh_loop(est: EstimatorLike, config: ProxyConfig) -> None:
    """Refit and re-project off the event loop, on a timer."""
    interval = config.estimator.refresh_interval_s
    failed_once = False
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(est.refresh)
        except Exception:  # the estimator must never take the proxy down; logged once
            if not failed_once:
                log.exception("estimator refresh failed (further failures not logged)")
                failed_once = True
