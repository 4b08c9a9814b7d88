"""Request handlers, thin: parse -> admit -> dispatch -> relay -> record (exactly once).

``recorded`` wraps every proxied request: whatever happens, the request ends in exactly one
``RequestRecord`` with a truthful outcome and status, its admission ticket is released, and it
is known to the shutdown drain while it runs.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from estimator.records import Outcome

from .admission import Scheduler, TenantLedger, Ticket
from .admission.tenants import bearer_token
from .config import ProxyConfig
from .dispatch import dispatch
from .errors import (
    BodyTooLarge,
    InvalidRequest,
    MalformedBody,
    MethodNotAllowed,
    ModelNotFound,
    NoHealthyBackend,
    ProxyError,
    RequestTimeout,
    Shed,
    ShuttingDown,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
    error_response,
)
from .experiments import Experiments, ShadowRunner
from .recorder import Recorder
from .request import InferenceRequest, Measurement
from .routing import RouteCtx, Router, block_hashes, canonical_text
from .routing.scorers.session import session_key
from .upstream.backends import BackendPool
from .upstream.relay import Drain, relay_plain, relay_raw, relay_stream
from .upstream.transport import Transport
from .validate import (
    ParsedRequest,
    cap_priority,
    parse_body,
    parse_deadline_ms,
    parse_json_object,
    parse_priority,
    upstream_body,
    upstream_headers,
    upstream_path,
)

log = logging.getLogger("rightsizer.handlers")

REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
_INFERENCE = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
DEFAULT_OUTPUT_ESTIMATE = 256  # tokens assumed for in-flight accounting when max_tokens is unset


@dataclass(frozen=True, slots=True, kw_only=True)
class Proxy:
    """The components a handler uses, built once by ``proxy.app.build_app``."""

    config: ProxyConfig
    pool: BackendPool
    transport: Transport
    recorder: Recorder
    router: Router
    scheduler: Scheduler
    tenants: TenantLedger
    drain: Drain
    report: Any = None  # () -> the estimator's latest report (dict) or None
    deny_headers: frozenset[str] = field(default_factory=frozenset)
    worker: int | None = None  # this worker's index under ``serve --workers N``
    experiments: Experiments | None = None  # groups configured: who serves what, canaries
    shadow: ShadowRunner | None = None


PROXY: web.AppKey[Proxy] = web.AppKey("proxy", Proxy)


def outcome_of(err: ProxyError) -> Outcome:
    if isinstance(err, ShuttingDown):
        return Outcome.SHUTDOWN
    if isinstance(err, Shed | NoHealthyBackend):
        return Outcome.SHED
    if isinstance(err, UpstreamTimeout):
        return Outcome.TIMEOUT
    if isinstance(err, UpstreamError):
        return Outcome.UPSTREAM_ERROR
    if err.status >= 500:
        return Outcome.INTERNAL_ERROR
    return Outcome.CLIENT_ERROR


class Exchange:
    """One proxied request in flight: what ``recorded`` needs to end it truthfully."""

    __slots__ = ("endpoint", "meas", "req", "started", "ticket")

    def __init__(self, request_id: str, endpoint: str) -> None:
        self.meas = Measurement(request_id)
        self.endpoint = endpoint
        self.req: InferenceRequest | None = None
        self.ticket: Ticket | None = None
        self.started = False  # the response (status line) went to the client


class recorded:
    """Every request ends in exactly one record, whatever happens (see module docstring):
    ``async with recorded(px, request, endpoint) as ex: ...``."""

    __slots__ = ("ex", "px", "task")

    def __init__(self, px: Proxy, request: web.Request, endpoint: str) -> None:
        self.px = px
        self.ex = Exchange(request[REQUEST_ID], endpoint)
        self.task: asyncio.Task[Any] | None = None

    async def __aenter__(self) -> Exchange:
        self.task = asyncio.current_task()
        if self.task is not None:
            self.px.drain.tasks.add(self.task)
        return self.ex

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        meas = self.ex.meas
        if exc is None:
            pass
        elif isinstance(exc, ProxyError):
            meas.fail(outcome_of(exc), exc.status)
        elif isinstance(exc, asyncio.CancelledError | ConnectionResetError):
            if meas.outcome is Outcome.SHUTDOWN:
                pass  # the relay ended the stream with the shutdown event
            elif meas.last_event_sent:
                meas.outcome = Outcome.OK  # the client left after the last event: complete
            else:
                meas.fail(Outcome.CLIENT_CANCELLED, 499)
        elif isinstance(exc, Exception):
            meas.fail(Outcome.INTERNAL_ERROR, 500)
        self._finish()

    def _finish(self) -> None:
        px, ex, meas = self.px, self.ex, self.ex.meas
        if self.task is not None:
            px.drain.tasks.discard(self.task)
        meas.end_s = time.perf_counter()
        if px.experiments is not None:
            meas.group = px.experiments.group_of(meas.backend)
        if ex.ticket is not None:
            total = None
            if meas.prompt_tokens is not None or meas.completion_tokens is not None:
                total = (meas.prompt_tokens or 0) + (meas.completion_tokens or 0)
            ex.ticket.release(total)
        req = ex.req
        px.recorder.submit(meas, req, ex.endpoint, req.body if req is not None else None)


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(
            f"The request body is {request.content_length} bytes; the limit is {limit}."
        )
    try:
        if request.content.is_eof():  # all there already (the common case): no timer needed
            return await request.read()
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"The request body exceeds the limit of {limit} bytes.") from None
    except (HttpProcessingError, RequestPayloadError):
        # nothing more can be read of this body: mark it ended, so aiohttp does not try to
        # drain it after the answer (which would log the decoding error a second time); the
        # answer closes the connection
        request.content.feed_eof()
        raise MalformedBody(
            "The request body could not be read: its Content-Encoding or framing is invalid.",
            code="malformed_body",
        ) from None
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {timeout_s:g}s (server.body_timeout_s).",
            code="body_timeout",
        ) from None


def _check_headers(headers: Mapping[str, str]) -> None:
    """Header values must be valid UTF-8 (aiohttp keeps other bytes as surrogates)."""
    for name, value in headers.items():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(
                f"Header '{name[:64]}' is not valid UTF-8.", param=name[:64]
            ) from None


def _model_or_error(pool: BackendPool, model: str) -> None:
    if pool.knows(model):
        return
    pending = pool.undiscovered()
    if pending:
        raise NoHealthyBackend(
            "No backend that could serve this model has answered yet "
            f"({', '.join(b.name for b in pending[:5])}); retry shortly.",
            reason="no_backend",
            retry_after_s=pool.health.interval_s,
        )
    raise ModelNotFound(model, pool.models())


def _route_ctx(router: Router, request: web.Request, body: Mapping[str, Any], endpoint: str,
               model: str, session_header: str, group: str | None) -> RouteCtx:  # fmt: skip
    hashes = (
        tuple(block_hashes(canonical_text(body, endpoint), router.block_chars))  # type: ignore[arg-type]
        if router.uses_prefix
        else ()
    )
    raw_session = request.headers.get(session_header) if router.uses_session else None
    session = session_key(raw_session) if raw_session else None
    return RouteCtx(model=model, hashes=hashes, session=session, now=time.monotonic(),
                    group=group)  # fmt: skip


def _build_request(
    px: Proxy, request: web.Request, ex: Exchange, parsed: ParsedRequest, endpoint: str
) -> InferenceRequest:
    _model_or_error(px.pool, parsed.model)
    who = px.tenants.identify(request.headers, parsed.body)
    priority = parse_priority(request.headers.get("x-priority"), who.default_class or "normal")
    data, strip = upstream_body(parsed)
    return InferenceRequest(
        request_id=ex.meas.request_id,
        endpoint=endpoint,
        method="POST",
        path=request.path,
        model=parsed.model,
        stream=parsed.stream,
        body=parsed.body,
        data=data,
        strip_usage=strip,
        max_tokens=parsed.max_tokens,
        est_prompt_tokens=parsed.est_prompt_tokens,
        est_tokens=parsed.est_prompt_tokens + (parsed.max_tokens or DEFAULT_OUTPUT_ESTIMATE),
        tenant=who.tenant,
        priority=cap_priority(priority, who.ceiling),
        deadline_s=parse_deadline_ms(request.headers.get("x-request-deadline-ms")),
        headers=upstream_headers(
            request.headers.items(), request_id=ex.meas.request_id, deny=px.deny_headers
        ),
        client_auth=request.headers.get("authorization"),
    )


def _loop_deadline(meas: Measurement, total_s: float | None) -> float | None:
    """The request's total-time limit on the event loop's clock."""
    if total_s is None:
        return None
    return asyncio.get_running_loop().time() + (meas.arrival_s + total_s - time.perf_counter())


class _WithinTotal:
    """Bound the block by the request's ``timeouts.total_s``; a backend's own timeout inside
    (connect, read: already an ``UpstreamTimeout`` that names its limit) passes unchanged."""

    __slots__ = ("_timeout",)

    def __init__(self, meas: Measurement, total_s: float | None) -> None:
        self._timeout = asyncio.timeout_at(_loop_deadline(meas, total_s))

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()

    async def __aexit__(self, et: Any, exc: Any, tb: Any) -> bool:
        try:
            await self._timeout.__aexit__(et, exc, tb)  # TimeoutError only when it expired
        except TimeoutError:
            raise UpstreamTimeout("The request exceeded the proxy's total time limit.") from None
        return False


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _inference(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _inference(request, "completions")


async def _inference(request: web.Request, endpoint: str) -> web.StreamResponse:
    px = request.app[PROXY]
    srv = px.config.server
    async with recorded(px, request, endpoint) as ex:
        try:
            _check_headers(request.headers)
            raw = await read_body(request, srv.max_body_bytes, srv.body_timeout_s)
            parsed = parse_body(raw, endpoint)
            ex.req = req = _build_request(px, request, ex, parsed, endpoint)
            assigned = px.experiments.assign(req, request.headers) if px.experiments else None
            if assigned is not None:
                ex.req = req = replace(req, group=assigned.group)
            ctx = _route_ctx(px.router, request, parsed.body, endpoint, req.model,
                             px.config.routing.session_header, req.group)  # fmt: skip
            ex.ticket = await px.scheduler.admit(req, ctx)
            if assigned is not None:
                _mirror(px, req, ex.ticket)
            return await _forward(px, request, ex, req)
        except asyncio.CancelledError:
            if px.drain.expired and not ex.started and ex.meas.outcome is not Outcome.SHUTDOWN:
                ex.meas.fail(Outcome.SHUTDOWN, 503)
                return error_response(ShuttingDown(), ex.meas.request_id)
            raise
    raise AssertionError("unreachable")  # pragma: no cover  (recorded re-raises)


def _mirror(px: Proxy, req: InferenceRequest, ticket: Ticket) -> None:
    """Offer an admitted request's copy to its experiment's shadow queue (O(1))."""
    exps = px.experiments
    if px.shadow is None or exps is None or ticket.backend is None:
        return
    exp = exps.for_model(req.model)
    if exp is not None:
        px.shadow.offer(req, exp, exps.group_of(ticket.backend.name))


def _on_retry(px: Proxy, req: InferenceRequest) -> Any:
    exps = px.experiments
    if exps is None or req.group is None:
        return None
    return lambda backend: exps.attempt_failed(req, backend)


async def _forward(
    px: Proxy, request: web.Request, ex: Exchange, req: InferenceRequest
) -> web.StreamResponse:
    """Dispatch, then relay; ``timeouts.total_s`` bounds both (a stream enforces its part)."""
    assert ex.ticket is not None
    cfg, meas = px.config, ex.meas
    total = cfg.timeouts.total_s
    async with _WithinTotal(meas, total):
        resp = await dispatch(req, ex.ticket, meas, transport=px.transport, pool=px.pool,
                              metrics=px.recorder.metrics,
                              on_retry=_on_retry(px, req))  # fmt: skip
        streamed = req.stream and resp.status == 200 and resp.content_type == "text/event-stream"
        if not streamed:
            return await relay_plain(request, meas, resp)
    ex.started = True
    return await relay_stream(
        request, meas, resp, strip_usage=req.strip_usage,
        est_prompt_tokens=req.est_prompt_tokens, read_timeout_s=cfg.timeouts.read_s,
        max_event_bytes=cfg.relay.max_event_bytes,
        deadline=None if total is None else meas.arrival_s + total, drain=px.drain,
    )  # fmt: skip


async def other_v1(request: web.Request) -> web.StreamResponse:
    """Other /v1 paths (embeddings, tokenize, files, ...): forwarded with the client's method,
    measured as plain requests. Paths that leave /v1/ are refused."""
    px = request.app[PROXY]
    raw_path, _, raw_query = request.raw_path.partition("?")
    path = upstream_path(raw_path, raw_query)
    if request.path in _INFERENCE:
        raise MethodNotAllowed(
            f"Method {request.method} is not allowed on {request.path}; use POST."
        )
    srv = px.config.server
    endpoint = request.path.rstrip("/").rsplit("/", 1)[-1] or "other"
    async with recorded(px, request, endpoint[:64]) as ex:
        _check_headers(request.headers)
        raw = await read_body(request, srv.max_body_bytes, srv.body_timeout_s)
        model = _model_of(raw, request.content_type)
        if model is not None:
            _model_or_error(px.pool, model)
            candidates = px.pool.serving(model)
        else:
            now = time.monotonic()
            candidates = [b for b in px.pool.backends if b.available(now)]
        if not candidates:
            raise NoHealthyBackend("No healthy backend.", reason="no_backend")
        ex.req = req = InferenceRequest(
            request_id=ex.meas.request_id,
            endpoint=endpoint[:64],
            method=request.method,
            path=path,
            model=model or "",
            data=raw,
            headers=upstream_headers(
                request.headers.items(),
                request_id=ex.meas.request_id,
                deny=px.deny_headers,
                json_body=False,
            ),
            client_auth=request.headers.get("authorization"),
        )
        ex.ticket = px.scheduler.hold(req, candidates)
        total = px.config.timeouts.total_s
        async with _WithinTotal(ex.meas, total):
            resp = await dispatch(req, ex.ticket, ex.meas, transport=px.transport,
                                  pool=px.pool, metrics=px.recorder.metrics)  # fmt: skip
            if resp.content_type == "application/json":
                return await relay_plain(request, ex.meas, resp)
        ex.started = True
        return await relay_raw(
            request, ex.meas, resp, deadline=None if total is None else ex.meas.arrival_s + total
        )
    raise AssertionError("unreachable")  # pragma: no cover


def _model_of(raw: bytes, content_type: str) -> str | None:
    if not raw or content_type not in ("application/json", "application/octet-stream", ""):
        return None
    body = parse_json_object(raw)
    model = body.get("model")
    if model is not None and not (isinstance(model, str) and model):
        raise InvalidRequest("'model' must be a non-empty string.", param="model")
    return model


async def list_models(request: web.Request) -> web.Response:
    pool = request.app[PROXY].pool
    body = {"object": "list", "data": pool.model_list()}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    px = request.app[PROXY]
    now = time.monotonic()
    backends = {
        b.name: {"up": b.available(now), "models": sorted(b.models), "inflight": b.inflight,
                 **({"error": b.last_error} if b.last_error else {})}
        for b in px.pool.backends
    }  # fmt: skip
    if px.drain.draining:
        status, ok = "draining", False
    else:
        ok = px.pool.ready()
        status = "ready" if ok else "not_ready"
    body: dict[str, Any] = {"status": status, "backends": backends}
    if px.worker is not None:
        body["worker"] = px.worker
    return web.json_response(body, status=200 if ok else 503)


class NoReport(ProxyError):
    status = 503
    type = "service_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "The estimator has no report yet (it needs a few requests and one refresh), or it "
            "is not running.",
            code="no_report",
        )


def check_admin(request: web.Request, token: str | None) -> None:
    """``Authorization: Bearer <token>`` (scheme case-insensitive) on /admin/*."""
    if token is None:
        return
    given = bearer_token(request.headers.get("authorization", "")) or ""
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode()):
        raise Unauthorized("The admin endpoints need 'Authorization: Bearer <admin token>'.")


def estimator_report_handler(report: Any, token: str | None) -> Any:
    """The ``/admin/estimator`` handler of every program that runs an estimator."""

    async def handle(request: web.Request) -> web.Response:
        check_admin(request, token)
        data = report() if report is not None else None
        if data is None:
            raise NoReport()
        return web.Response(body=orjson.dumps(data), content_type="application/json")

    return handle
