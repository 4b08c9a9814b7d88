"""Request handlers, thin: parse -> route -> relay -> record (exactly once, in ``finally``)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from estimator.records import Outcome

from .admission import Scheduler
from .backends import BackendPool
from .config import ProxyConfig
from .errors import (
    BodyTooLarge,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NoHealthyBackend,
    ProxyError,
    Shed,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
)
from .exchange import Exchange
from .prefix import block_hashes, canonical_text
from .recorder import Recorder
from .relay import Upstream, forward_other, relay_plain, relay_stream
from .routing import RouteCtx, Router
from .telemetry import Metrics
from .tenants import TenantLedger
from .validate import parse_body, parse_deadline_ms, parse_priority, upstream_body

REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
_FORWARD_HEADERS = ("authorization", "x-request-id", "openai-organization", "openai-project")
_INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
DEFAULT_OUTPUT_ESTIMATE = 256  # tokens assumed for in-flight accounting when max_tokens is unset


@dataclass(slots=True, kw_only=True)
class ProxyState:
    config: ProxyConfig
    pool: BackendPool
    upstream: Upstream
    recorder: Recorder
    metrics: Metrics
    router: Router
    scheduler: Scheduler
    tenants: TenantLedger
    report: Any = None  # callable returning the estimator's latest report (dict) or None


STATE: web.AppKey[ProxyState] = web.AppKey("state", ProxyState)


def _outcome(err: ProxyError) -> Outcome:
    if isinstance(err, Shed | NoHealthyBackend):
        return Outcome.SHED
    if isinstance(err, UpstreamTimeout):
        return Outcome.TIMEOUT
    if isinstance(err, UpstreamError):
        return Outcome.UPSTREAM_ERROR
    return Outcome.CLIENT_ERROR


async def read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(
            f"The request body is {request.content_length} bytes; the limit is {limit}."
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"The request body exceeds the limit of {limit} bytes.") from None


def _upstream_headers(request: web.Request, request_id: str) -> dict[str, str]:
    h = {k: v for k in _FORWARD_HEADERS if (v := request.headers.get(k)) is not None}
    h["x-request-id"] = request_id
    h["Content-Type"] = "application/json"
    return h


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _inference(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _inference(request, "completions")


async def _inference(request: web.Request, endpoint: str) -> web.StreamResponse:
    st = request.app[STATE]
    ex = Exchange(request[REQUEST_ID], endpoint=endpoint)
    with _recorded(st, ex):
        raw = await read_body(request, st.config.server.max_body_bytes)
        parsed = parse_body(raw, endpoint)
        ex.request_body = body = parsed.body
        ex.model, ex.streamed, ex.max_tokens = parsed.model, parsed.stream, parsed.max_tokens
        ex.tenant, default_class = st.tenants.identify(request.headers, body)
        ex.priority = parse_priority(request.headers.get("x-priority"), default_class or "normal")
        deadline_s = parse_deadline_ms(request.headers.get("x-request-deadline-ms"))
        ex.est_prompt_tokens = parsed.est_prompt_tokens
        ex.est_tokens = ex.est_prompt_tokens + (parsed.max_tokens or DEFAULT_OUTPUT_ESTIMATE)
        candidates = _candidates(st.pool, parsed.model)
        ctx = _route_ctx(st, request, body, endpoint)
        decision = await st.scheduler.admit(ex, candidates, ctx, deadline_s)
        try:
            return await _relay(
                request, st, ex, parsed.stream, decision.ordered, upstream_body(parsed)
            )
        finally:
            st.scheduler.release(ex)


@contextlib.contextmanager
def _recorded(st: ProxyState, ex: Exchange) -> Iterator[None]:
    """Every request ends in exactly one record, whatever happens."""
    try:
        yield
    except ProxyError as err:
        ex.fail(_outcome(err), err.status)
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        ex.fail(Outcome.CLIENT_CANCELLED, 499)
        raise
    finally:
        ex.end_s = time.perf_counter()
        st.recorder.submit(ex, ex.request_body)


def _route_ctx(
    st: ProxyState, request: web.Request, body: dict[str, Any], endpoint: str
) -> RouteCtx:
    r = st.router
    hashes = block_hashes(canonical_text(body, endpoint), r.block_chars) if r.uses_prefix else ()
    session = request.headers.get(st.config.routing.session_header)
    return RouteCtx(hashes=hashes, session=session, now=time.monotonic())


async def _relay(
    request: web.Request,
    st: ProxyState,
    ex: Exchange,
    stream: bool,
    ordered: list[Any],
    data_strip: tuple[bytes, bool],
) -> web.StreamResponse:
    data, strip = data_strip
    headers = _upstream_headers(request, ex.request_id)
    _, resp = await st.upstream.dispatch(
        ex, ordered, request.path, data, headers, st.scheduler.move
    )
    if stream and resp.status == 200 and resp.content_type == "text/event-stream":
        total = st.config.timeouts.total_s
        return await relay_stream(
            request,
            ex,
            resp,
            strip_usage=strip,
            read_timeout_s=st.config.timeouts.read_s,
            deadline=None if total is None else ex.arrival_s + total,
        )
    return await relay_plain(request, ex, resp)


def _candidates(pool: BackendPool, model: str) -> list[Any]:
    candidates = pool.candidates(model)
    if candidates:
        return candidates
    if model not in pool.known_models():
        raise ModelNotFound(model, pool.models())
    raise NoHealthyBackend(
        f"Every backend serving model '{model}' is down or ejected.",
        reason="no_backend",
        retry_after_s=pool.health.interval_s,
    )


async def other_v1(request: web.Request) -> web.StreamResponse:
    """Other /v1 paths (embeddings, tokenize, ...): forwarded, measured as plain requests."""
    if request.path in _INFERENCE_PATHS:
        raise MethodNotAllowed(
            f"Method {request.method} is not allowed on {request.path}; use POST."
        )
    st = request.app[STATE]
    ex = Exchange(request[REQUEST_ID], endpoint=request.path.rsplit("/", 1)[-1] or "other")
    with _recorded(st, ex):
        raw = await read_body(request, st.config.server.max_body_bytes)
        model = _model_of(raw)
        if model is not None:
            ex.model = model
            candidates = _candidates(st.pool, model)
        else:
            candidates = [b for b in st.pool.backends if b.available(time.monotonic())]
        if not candidates:
            raise NoHealthyBackend("No healthy backend.", reason="no_backend")
        ordered = sorted(candidates, key=st.scheduler.utilization)
        st.scheduler.hold(ex, ordered[0])
        headers = _upstream_headers(request, ex.request_id)
        try:
            return await forward_other(
                request, ex, st.upstream, ordered, raw, headers, st.scheduler.move
            )
        finally:
            st.scheduler.unhold(ex)


def _model_of(raw: bytes) -> str | None:
    if not raw:
        return None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    model = obj.get("model") if isinstance(obj, dict) else None
    return model if isinstance(model, str) and model else None


async def list_models(request: web.Request) -> web.Response:
    pool = request.app[STATE].pool
    data = [
        {"id": m, "object": "model", "created": 0, "owned_by": "rightsizer"} for m in pool.models()
    ]
    return web.json_response(
        {"object": "list", "data": data}, dumps=lambda o: orjson.dumps(o).decode()
    )


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    pool = request.app[STATE].pool
    now = time.monotonic()
    backends = {
        b.name: {"up": b.available(now), "models": sorted(b.models), "inflight": b.inflight}
        for b in pool.backends
    }
    ok = pool.ready()
    return web.json_response(
        {"status": "ready" if ok else "not_ready", "backends": backends}, status=200 if ok else 503
    )


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[STATE].metrics.registry
    resp = web.Response(body=generate_latest(registry))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def _check_admin(request: web.Request) -> None:
    token = request.app[STATE].config.server.admin_token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise Unauthorized("The admin endpoints need 'Authorization: Bearer <admin token>'.")


async def estimator_report(request: web.Request) -> web.Response:
    _check_admin(request)
    report = request.app[STATE].report
    data = report() if report is not None else None
    if data is None:
        return web.json_response(
            {"status": "no_report", "detail": "The estimator has no report yet."}, status=503
        )
    return web.Response(body=orjson.dumps(data), content_type="application/json")
