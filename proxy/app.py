"""``build_app(config, deps) -> web.Application``: builds every component with explicit
arguments, wires them, and registers routes, the error middleware and the lifetimes; no logic.

Wiring, in one place: the backend pool tells admission (``on_change``: re-check the queue;
``on_snapshot``: learn in-flight limits) and the estimator (``on_snapshot``); the router's
prefix scorer and the shared view exchange prefix blocks; the recorder feeds metrics, the
request log, the estimator (served models only) and the shared view's records stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from estimator.records import RequestRecord

from . import handlers as h
from .admission import Limits, Scheduler, TenantLedger
from .config import ProxyConfig
from .errors import (
    ExpectationFailed,
    HeaderFieldsTooLarge,
    MethodNotAllowed,
    ProxyError,
    error_body,
    error_response,
)
from .estimation import EstimatorRunner
from .experiments import Experiments, ShadowRunner, drift
from .experiments import admin as experiments_admin
from .gpu import GpuSampler
from .recorder import Recorder, RequestLog
from .routing import PluginDeps, Router, build_router
from .shm import ShmView
from .state import LocalView, RedisView, SharedView
from .telemetry import ExperimentsView, Metrics, metrics_handler
from .upstream.backends import BackendPool
from .upstream.relay import Drain
from .upstream.transport import Transport

log = logging.getLogger("rightsizer.app")


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSlot:
    """This process's place among the workers of ``serve --workers N``."""

    index: int
    count: int
    shm: str  # the shared-memory segment (``proxy.shm``)
    folder: str  # the run folder: sockets of the estimator and of each worker

    def socket(self, index: int) -> str:
        return f"{self.folder}/worker-{index}.sock"


@dataclass(slots=True, kw_only=True)
class Deps:
    """What the app is built with besides its config; tests inject their own."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    estimator: EstimatorRunner | None = None
    subscribers: list[tuple[str, Callable[[RequestRecord], None]]] = field(default_factory=list)
    gpu: GpuSampler | None = None
    source: str = "config"  # where the config came from, for errors naming keys
    worker: WorkerSlot | None = None  # one of several worker processes


def _request_id(request: web.Request) -> str:
    rid = request.headers.get("x-request-id", "")
    if 0 < len(rid) <= 128 and rid.isascii() and rid.isprintable():
        return rid
    return os.urandom(12).hex()


def _rid(request: web.Request) -> str:
    rid = request.get(h.REQUEST_ID)
    if rid is None:
        rid = request[h.REQUEST_ID] = _request_id(request)
    return rid


async def _tag_response(request: web.Request, response: web.StreamResponse) -> None:
    """Every response carries ``x-request-id`` (the client's, when it is sane, else a new one);
    while the proxy drains, every response closes its connection."""
    if "x-request-id" not in response.headers:
        response.headers["x-request-id"] = _rid(request)
    if request.app[h.PROXY].drain.draining:
        response.force_close()


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` is answered as aiohttp does; any other expectation gets the
    OpenAI-style 417 (aiohttp's own answer is plain text, before the middlewares)."""
    expect = request.headers.get("expect", "").strip().lower()
    if expect == "100-continue":
        if request.version == aiohttp.HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the response proper has not started
        return None
    return error_response(ExpectationFailed(), _rid(request))


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], object]
) -> web.StreamResponse:
    rid = _rid(request)
    try:
        _check_header_total(request)
        return await handler(request)  # type: ignore[misc, no-any-return]
    except ProxyError as err:
        if err.status >= 500 and type(err) is ProxyError:
            log.error("internal error in request %s: %s", rid, err.message)
        return error_response(err, rid)
    except web.HTTPException as exc:  # router-level: unknown path, wrong method, body too big
        if exc.status == 405:
            return error_response(
                MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}."), rid
            )
        message = exc.reason if exc.status != 404 else f"Unknown path {request.path[:200]}."
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


def check_config(config: ProxyConfig, source: str = "config") -> None:
    """What only building the components can check (routing plugin names), without building
    the app: raises ``ConfigError`` naming the key."""
    limits = Limits(config.scheduling, LocalView())
    build_router(
        config.routing,
        PluginDeps(load=limits.load, inflight=limits.inflight, headroom=limits.has_headroom),  # type: ignore[arg-type]
        source=source,
    )


MAX_HEADERS_TOTAL = 64 * 1024
"""All request headers together at most (Envoy's default max_request_headers_kb is 60)."""


def _check_header_total(request: web.Request) -> None:
    total = sum(len(k) + len(v) for k, v in request.raw_headers)
    if total > MAX_HEADERS_TOTAL:
        raise HeaderFieldsTooLarge(
            f"The request headers total {total} bytes; the limit is {MAX_HEADERS_TOTAL}.",
            code="headers_too_large",
        )


def build_app(config: ProxyConfig, deps: Deps | None = None) -> web.Application:
    deps = deps or Deps()
    app = web.Application(
        middlewares=[error_middleware], client_max_size=config.server.max_body_bytes
    )
    app.on_response_prepare.append(_tag_response)
    metrics = Metrics(deps.registry, max_tenants=config.metrics.max_tenants)
    gpu = deps.gpu if deps.gpu is not None and deps.gpu.available else None
    gpu_backend = config.gpu.backend
    pool = BackendPool(
        config.backends,
        config.health,
        metrics,
        gpu_source=(lambda name: gpu.last if name == gpu_backend else ()) if gpu else None,
    )
    # the shared view and admission need each other: the view's callbacks name components
    # built below (late-bound closures), so nothing is patched after construction
    view = _view(
        config,
        deps.worker,
        backend_inflight=lambda: {b.name: b.inflight for b in pool.backends},
        tenant_inflight=lambda: dict(tenants.inflight),
        tenant_tokens=lambda: dict(tenants.tokens_this_minute()),
        learn_prefix=lambda b, hs, t: _learn_prefix(router, pool, b, hs, t),
        on_change=lambda: scheduler.pump(),
        on_dropped=lambda n: metrics.records_dropped.labels("redis_stream").inc(n),
    )
    tenants = TenantLedger(config.tenants, config.auth, view)
    limits = Limits(config.scheduling, view)
    exps = _experiments(config, pool)
    router = build_router(
        config.routing,
        PluginDeps(load=limits.load, inflight=limits.inflight, headroom=limits.has_headroom,  # type: ignore[arg-type]
                   group_of=exps.group_of if exps is not None else lambda _b: None),
        timer=metrics.plugin_timer,
        source=deps.source,
    )  # fmt: skip
    scheduler = Scheduler(
        config.scheduling, pool, router, tenants, limits, metrics,
        retry_after_s=config.health.interval_s,
    )  # fmt: skip
    transport = Transport(
        config.timeouts, on_stale=lambda b: metrics.retries.labels(b, "stale_connection").inc()
    )
    request_log = RequestLog(config.request_log, metrics) if config.request_log.path else None
    recorder = Recorder(metrics, request_log)
    est = deps.estimator
    _wire(config, pool, limits, scheduler, router, view, recorder, metrics, est, gpu)
    shadow = None
    if exps is not None:
        recorder.subscribe("experiments", exps.observe)
        if exps.experiments:
            shadow = ShadowRunner(config, exps, pool=pool, limits=limits, transport=transport,
                                  recorder=recorder, waiting=scheduler.waiting)  # fmt: skip
    for name, fn in deps.subscribers:
        recorder.subscribe(name, fn)
    px = h.Proxy(
        config=config, pool=pool, transport=transport, recorder=recorder, router=router,
        scheduler=scheduler, tenants=tenants, drain=Drain(),
        report=est.report if est is not None else None,
        deny_headers=frozenset(
            x.lower() for x in (*config.server.forward_headers_deny, config.routing.session_header)
        ),
        worker=deps.worker.index if deps.worker is not None else None,
        experiments=exps, shadow=shadow,
    )  # fmt: skip
    if exps is not None:
        _watch_experiments(px, exps, metrics)
    app[h.PROXY] = px
    app[_DEPS] = deps
    app[_VIEW] = view
    app.cleanup_ctx.append(_lifetime)
    _routes(app, px, metrics, deps.worker)
    return app


def _experiments(config: ProxyConfig, pool: BackendPool) -> Experiments | None:
    """Groups and experiments, when configured (the pool answers what a group serves)."""
    if not config.groups:
        return None
    members = {g.name: [pool.by_name[b] for b in g.backends] for g in config.groups}

    def serves(group: str, model: str) -> bool:
        return any(model in b.models for b in members.get(group, ()))

    def available(group: str) -> bool:
        now = time.monotonic()
        return any(b.available(now) for b in members.get(group, ()))

    est = config.estimator
    return Experiments(config.groups, config.experiments, slo_ttft_s=est.slo_ttft_p95_s,
                       slo_itl_s=est.slo_itl_p95_s, session_header=config.routing.session_header,
                       serves=serves, available=available)  # fmt: skip


def _watch_experiments(px: h.Proxy, exps: Experiments, metrics: Metrics) -> None:
    shadow = px.shadow
    metrics.watch_experiments(ExperimentsView(
        experiments=lambda: exps.experiments,
        group_of_backends=lambda: [(b, g) for b in px.pool.by_name
                                   if (g := exps.group_of(b)) is not None],
        drift=lambda: drift(px.pool.backends, exps.group_of),
        shadow_depth=shadow.depth if shadow is not None else lambda _e: 0,
        verdicts=lambda: experiments_admin.verdicts(px),
    ))  # fmt: skip


def _view(
    config: ProxyConfig, worker: WorkerSlot | None, **hooks: Callable[..., object]
) -> SharedView:
    if not config.shared.redis_url:
        if worker is None:
            return LocalView()
        return ShmView(
            worker.shm,
            worker.index,
            [b.name for b in config.backends],
            [t.name for t in config.tenants],
            learn_prefix=hooks["learn_prefix"],  # type: ignore[arg-type]
            sync_interval_s=min(config.shared.sync_interval_s, 0.05),
        )

    class _Local:  # this replica's own counts, read by the sync
        backend_inflight = staticmethod(hooks["backend_inflight"])
        tenant_inflight = staticmethod(hooks["tenant_inflight"])
        tenant_tokens = staticmethod(hooks["tenant_tokens"])

    return RedisView(
        config.shared,
        _Local(),  # type: ignore[arg-type]
        learn_prefix=hooks["learn_prefix"],  # type: ignore[arg-type]
        prefix_ttl_s=config.routing.prefix_ttl_s,
        on_change=hooks["on_change"],  # type: ignore[arg-type]
        on_dropped=hooks["on_dropped"],  # type: ignore[arg-type]
    )


def _learn_prefix(
    router: Router, pool: BackendPool, backend: str, hashes: Sequence[bytes], t: float
) -> None:
    """Another replica's routing decision, for this replica's prefix scorer."""
    prefix = router.plugin("prefix")
    if prefix is not None and backend in pool.by_name:
        prefix.learn(backend, hashes, t)


def _wire(
    config: ProxyConfig,
    pool: BackendPool,
    limits: Limits,
    scheduler: Scheduler,
    router: Router,
    view: SharedView,
    recorder: Recorder,
    metrics: Metrics,
    est: EstimatorRunner | None,
    gpu: GpuSampler | None,
) -> None:
    pool.on_change(scheduler.pump)
    pool.on_snapshot(limits.observe)
    metrics.watch_backends(pool.backends)
    metrics.watch_limits(lambda: limits.rows(pool.backends))
    metrics.watch_queue(scheduler.depths)
    metrics.watch_slo(config.estimator.slo_ttft_p95_s, config.estimator.slo_itl_p95_s)
    if gpu is not None:
        metrics.watch_gpus(lambda: gpu.last)
    if isinstance(view, RedisView):
        prefix = router.plugin("prefix")
        if prefix is not None:
            prefix.subscribe(view.on_routed)
        recorder.subscribe("redis_stream", view.on_record)
        metrics.watch_shared(
            lambda: view.up, lambda: dict(view.remote_by_backend()), lambda: view.syncs
        )
    if est is not None:
        pool.on_snapshot(lambda _b, snap: est.observe_backend(snap))
        recorder.subscribe("estimator", lambda rec: _served(pool, rec) and est.observe(rec))
        metrics.watch_estimator(est)


def _served(pool: BackendPool, rec: RequestRecord) -> bool:
    """Only requests for a model a backend serves reach the estimator (no state per name a
    client made up)."""
    return rec.backend is not None and pool.knows(rec.model)


_DEPS: web.AppKey[Deps] = web.AppKey("deps", Deps)
_VIEW: web.AppKey[SharedView] = web.AppKey("view", object)  # type: ignore[arg-type]


async def _loop_lag(metrics: Metrics, period_s: float = 0.05) -> None:
    """How late a timer fires on the event loop, sampled (telemetry: event loop lag)."""
    loop = asyncio.get_running_loop()
    observe = metrics.loop_lag.observe
    while True:
        due = loop.time() + period_s
        await asyncio.sleep(period_s)
        observe(max(0.0, loop.time() - due))


def _siblings(worker: WorkerSlot) -> Callable[[], Awaitable[list[bytes]]]:
    """The other workers' own expositions, read over their unix sockets (those that answer)."""

    async def fetch(index: int) -> bytes | None:
        url = "http://worker/metrics?scope=local"
        try:
            conn = aiohttp.UnixConnector(path=worker.socket(index))
            async with (
                aiohttp.ClientSession(connector=conn) as s,
                s.get(url, timeout=aiohttp.ClientTimeout(total=2.0)) as r,
            ):
                return await r.read() if r.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def gather() -> list[bytes]:
        others = [i for i in range(worker.count) if i != worker.index]
        got = await asyncio.gather(*(fetch(i) for i in others))
        return [g for g in got if g is not None]

    return gather


def _routes(app: web.Application, px: h.Proxy, metrics: Metrics, worker: WorkerSlot | None) -> None:
    app.router.add_post("/v1/chat/completions", h.chat_completions, expect_handler=_expect)
    app.router.add_post("/v1/completions", h.completions, expect_handler=_expect)
    app.router.add_get("/v1/models", h.list_models)
    app.router.add_route("*", "/v1/{tail:.*}", h.other_v1, expect_handler=_expect)
    app.router.add_get("/health", h.health)
    app.router.add_get("/ready", h.ready)
    siblings = _siblings(worker) if worker is not None and worker.count > 1 else None
    app.router.add_get("/metrics", metrics_handler(metrics.registry, siblings))
    app.router.add_get(
        "/admin/estimator", h.estimator_report_handler(px.report, px.config.server.admin_token)
    )
    app.router.add_get("/admin/experiments", experiments_admin.get_experiments)
    app.router.add_post("/admin/experiments/{name}", experiments_admin.set_experiment)


async def _rollback_checks(exps: Experiments) -> None:
    interval = min(e.config.rollback.interval_s for e in exps.experiments)
    while True:
        await asyncio.sleep(interval)
        exps.tick()


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    px, deps, view = app[h.PROXY], app[_DEPS], app[_VIEW]
    await px.transport.start()
    await px.pool.start(px.transport.session)
    background: list[asyncio.Task[None]] = []
    if deps.gpu is not None and deps.gpu.available:
        background.append(asyncio.create_task(deps.gpu.run(px.config.gpu.interval_s)))
    await view.start()
    background.append(asyncio.create_task(_loop_lag(px.recorder.metrics)))
    if deps.estimator is not None:
        background.append(asyncio.create_task(deps.estimator.run()))
    if px.experiments is not None and px.experiments.experiments:
        background.append(asyncio.create_task(_rollback_checks(px.experiments)))
    if px.shadow is not None:
        await px.shadow.start()
    try:
        yield
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if px.shadow is not None:
            await px.shadow.stop()
        await view.stop()
        await px.pool.stop()
        await px.transport.close()
        px.recorder.close()
