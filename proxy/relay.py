"""Upstream dispatch (with one retry before the first byte) and the byte-faithful relay.

Streaming hot path, per read from the backend (often several SSE events at once under load):
one timestamp, split off any incomplete trailing event (held until the rest arrives), count
events by their ``\\n\\n`` boundaries, and scan for a few byte markers (``"usage":{``,
``"finish_reason":"``, ``[DONE]``); only blocks holding one of those, or blocks before the
first content token, are split into events. JSON is parsed for the first content chunk, the
usage chunk and the finish chunk, once each, never for ordinary token chunks.

ITL: a read that brings k content events after a gap g records k gaps of g/k (the events
arrived together; their mean spacing is what the engine produced), so the mean ITL times the
token count equals the decode time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from estimator.records import Outcome

from .backends import Backend, BackendPool
from .config import TimeoutConfig
from .errors import (
    NoHealthyBackend,
    ProxyError,
    UpstreamError,
    UpstreamTimeout,
    sse_error_event,
)
from .exchange import Exchange
from .telemetry import Metrics

RETRYABLE_STATUS = frozenset({502, 503})
_SEP = b"\n\n"
_DONE = b"data: [DONE]"
_USAGE = b'"usage":{'
_FINISH = b'"finish_reason":"'
_EMPTY_CHOICES = b'"choices":[]'
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}
)


class Upstream:
    """One shared ``ClientSession`` and the dispatch policy around it."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        pool: BackendPool,
        timeouts: TimeoutConfig,
        metrics: Metrics,
    ) -> None:
        self.session = session
        self.pool = pool
        self.timeouts = timeouts
        self.metrics = metrics
        self.client_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts.connect_s, sock_read=timeouts.read_s
        )
        self._fresh: aiohttp.ClientSession | None = None

    def _fresh_session(self) -> aiohttp.ClientSession:
        """A session that never reuses a connection, for the retry after a stale one: under
        load many pooled connections go stale together, and the pool could hand out another."""
        if self._fresh is None or self._fresh.closed:
            self._fresh = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                auto_decompress=False,
            )
        return self._fresh

    async def close(self) -> None:
        if self._fresh is not None:
            await self._fresh.close()

    async def dispatch(
        self,
        ex: Exchange,
        ordered: Sequence[Backend],
        path: str,
        body: bytes,
        headers: dict[str, str],
        move: Callable[[Exchange, Backend], None],
    ) -> tuple[Backend, aiohttp.ClientResponse]:
        """Send to ``ordered[0]`` (whose slot ``ex`` holds); on a connect error or a 502/503,
        once more to the next backend, ``move``-ing the held slot there."""
        if not ordered:
            raise NoHealthyBackend(
                f"No healthy backend serves model '{ex.model}'.", reason="no_backend"
            )
        tries = list(ordered[:2])
        ex.dispatch_s = time.perf_counter()
        for i, backend in enumerate(tries):
            if i:
                move(ex, backend)
            ex.attempts += 1
            ex.backend = backend.name
            last_try = i == len(tries) - 1
            try:
                resp = await self._send(backend, path, body, headers)
            except aiohttp.ClientConnectorError:
                err: ProxyError = UpstreamError(f"Could not connect to backend {backend.name}.")
                kind = "connect"
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                err = UpstreamError(f"Backend {backend.name} closed the connection.")
                kind = "disconnect"
            except TimeoutError:
                self.pool.report_failure(backend, "timeout")
                raise UpstreamTimeout(
                    f"Backend {backend.name} did not answer within {self.timeouts.read_s:g}s."
                ) from None
            else:
                if resp.status not in RETRYABLE_STATUS or last_try:
                    if resp.status < 500:
                        self.pool.report_success(backend)
                    else:
                        self.pool.report_failure(backend, f"http_{resp.status}")
                    return backend, resp
                resp.release()
                err = UpstreamError(f"Backend {backend.name} answered {resp.status}.")
                kind = f"http_{resp.status}"
            self.pool.report_failure(backend, kind)
            if last_try:
                raise err
            self.metrics.retries.labels(backend.name, kind).inc()
        raise AssertionError("unreachable")

    async def _send(
        self, backend: Backend, path: str, body: bytes, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        hdrs = {**headers, **backend.auth_headers()}
        url = backend.url + path
        try:
            return await self.session.post(
                url, data=body, headers=hdrs, timeout=self.client_timeout
            )
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                raise
            # A pooled keep-alive connection the server had just closed (idle timeout, or
            # llama-server's 100 requests per connection): nothing was processed; once more,
            # on a new connection.
            self.metrics.retries.labels(backend.name, "stale_connection").inc()
            return await self._fresh_session().post(
                url, data=body, headers=hdrs, timeout=self.client_timeout
            )


def _response_headers(resp: aiohttp.ClientResponse, request_id: str) -> dict[str, str]:
    out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP}
    out["x-request-id"] = request_id
    return out


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _event_json(event: bytes) -> Any:
    start = event.find(b"data:")
    return None if start < 0 else _json(event[start + 5 :].strip())


def _is_content(obj: Any) -> bool:
    """Does this chunk carry generated content (text, a tool call, reasoning)?"""
    if not isinstance(obj, dict):
        return False
    for ch in obj.get("choices") or ():
        if not isinstance(ch, dict):
            continue
        if ch.get("text"):
            return True
        delta = ch.get("delta")
        if isinstance(delta, dict) and (
            delta.get("content")
            or delta.get("tool_calls")
            or delta.get("reasoning_content")
            or delta.get("reasoning")
        ):
            return True
    return False


def apply_usage(ex: Exchange, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(pt, int):
        ex.prompt_tokens = pt
    if isinstance(ct, int):
        ex.completion_tokens = ct
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        ex.cached_tokens = details["cached_tokens"]


def _apply_finish(ex: Exchange, obj: Any) -> None:
    if isinstance(obj, dict):
        for ch in obj.get("choices") or ():
            if isinstance(ch, dict) and isinstance(ch.get("finish_reason"), str):
                ex.finish_reason = ch["finish_reason"]


async def relay_plain(
    request: web.Request, ex: Exchange, resp: aiohttp.ClientResponse
) -> web.Response:
    """Non-streamed: read the whole body, take usage from it, forward it unchanged."""
    done = False
    try:
        body = await resp.read()
        done = True
    except TimeoutError:
        raise UpstreamTimeout(
            f"Backend {ex.backend} did not finish within the read timeout."
        ) from None
    except aiohttp.ClientError:
        raise UpstreamError(f"Backend {ex.backend} failed while sending its answer.") from None
    finally:
        # a whole body gives the connection back to the pool; a cancelled or failed read
        # closes it, so the engine stops working for a client that left
        resp.release() if done else resp.close()
    ex.status = resp.status  # no first-token time: a whole body shows no token timing
    if resp.status < 400:
        obj = _json(body)
        if isinstance(obj, dict):
            apply_usage(ex, obj.get("usage"))
            _apply_finish(ex, obj)
    else:
        ex.outcome = Outcome.CLIENT_ERROR if resp.status < 500 else Outcome.UPSTREAM_ERROR
    return web.Response(
        status=resp.status, body=body, headers=_response_headers(resp, ex.request_id)
    )


class _TotalTimeout(Exception):
    pass


class StreamState:
    """What the stream loop keeps between reads."""

    __slots__ = ("content_events", "done", "finish_event", "last_t", "usage_event")

    def __init__(self) -> None:
        self.content_events = 0
        self.done = False
        self.usage_event: bytes | None = None
        self.finish_event: bytes | None = None
        self.last_t = 0.0


def _classify(ex: Exchange, st: StreamState, block: bytes, now: float, strip_usage: bool) -> bytes:
    """Slow path: split a block into events; returns the bytes to forward."""
    events = block.split(_SEP)[:-1]
    kept: list[bytes] = []
    content = 0
    for ev in events:
        if ev.startswith(_DONE) or ev.endswith(b"[DONE]"):
            st.done = True
            kept.append(ev)
            continue
        if _USAGE in ev:
            st.usage_event = ev
            if strip_usage and _EMPTY_CHOICES in ev:
                continue  # the usage chunk we asked for on the client's behalf
        if _FINISH in ev:
            st.finish_event = ev
        kept.append(ev)
        if ex.first_token_s is None:
            if _is_content(_event_json(ev)):
                ex.first_token_s = st.last_t = now
                st.content_events = 1
            continue
        if _EMPTY_CHOICES not in ev:
            content += 1
    _add_gaps(ex, st, content, now)
    if len(kept) == len(events):
        return block
    return b"".join(ev + _SEP for ev in kept)


def _add_gaps(ex: Exchange, st: StreamState, k: int, now: float) -> None:
    if k <= 0:
        return
    gap = (now - st.last_t) / k
    ex.gaps.extend([gap] * k)
    st.content_events += k
    st.last_t = now


async def relay_stream(
    request: web.Request,
    ex: Exchange,
    resp: aiohttp.ClientResponse,
    *,
    strip_usage: bool,
    read_timeout_s: float,
    deadline: float | None = None,
) -> web.StreamResponse:
    """Streamed: forward bytes as they come, timing every content event (see module doc)."""
    out = web.StreamResponse(status=resp.status, headers=_response_headers(resp, ex.request_id))
    ex.status = resp.status
    st = StreamState()
    clean = False
    carry = b""
    reader = resp.content
    perf = time.perf_counter
    try:
        # inside the try: a client that leaves while the headers go out cancels us here,
        # and the upstream response must still be closed (else the engine generates on)
        await out.prepare(request)
        while True:
            data = await reader.readany()
            if not data:
                break
            now = perf()
            if deadline is not None and now > deadline:
                raise _TotalTimeout
            buf = carry + data if carry else data
            end = buf.rfind(_SEP)
            if end < 0:
                carry = buf
                continue
            end += 2
            block, carry = (buf, b"") if end == len(buf) else (buf[:end], buf[end:])
            if ex.first_token_s is None or _USAGE in block or _FINISH in block or _DONE in block:
                block = _classify(ex, st, block, now, strip_usage)
            else:
                _add_gaps(ex, st, block.count(_SEP), now)
            if block:
                await out.write(block)
        if carry:
            await out.write(carry)
        if not st.done:
            raise aiohttp.ClientPayloadError("stream ended before [DONE]")
        clean = True
    except _TotalTimeout:
        await _fail_stream(
            out,
            ex,
            Outcome.TIMEOUT,
            UpstreamTimeout("The request exceeded the proxy's total time limit."),
        )
    except TimeoutError:
        await _fail_stream(
            out,
            ex,
            Outcome.TIMEOUT,
            UpstreamTimeout(
                f"Backend {ex.backend} sent nothing for {read_timeout_s:g}s mid-stream."
            ),
        )
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        if isinstance(exc, ConnectionResetError | aiohttp.ClientConnectionResetError):
            raise  # the client went away; handled by the caller
        await _fail_stream(
            out,
            ex,
            Outcome.UPSTREAM_ERROR,
            UpstreamError(f"Backend {ex.backend} failed mid-stream: the connection broke."),
        )
    finally:
        # a finished stream gives its keep-alive connection back to the pool; any other end
        # closes it, so the engine stops generating for nobody
        resp.release() if clean else resp.close()
        _finish_stream(ex, st)
    await out.write_eof()
    return out


async def _fail_stream(
    out: web.StreamResponse, ex: Exchange, outcome: Outcome, err: ProxyError
) -> None:
    ex.outcome = outcome
    with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
        await out.write(sse_error_event(err))


def _finish_stream(ex: Exchange, st: StreamState) -> None:
    if st.usage_event is not None:
        obj = _event_json(st.usage_event)
        if isinstance(obj, dict):
            apply_usage(ex, obj.get("usage"))
    if st.finish_event is not None:
        _apply_finish(ex, _event_json(st.finish_event))
    if ex.completion_tokens is None:
        # the backend ignored include_usage: fall back to counting content events
        ex.completion_tokens = st.content_events
        ex.prompt_tokens = ex.prompt_tokens or ex.est_prompt_tokens
        ex.tokens_estimated = True


async def forward_other(
    request: web.Request,
    ex: Exchange,
    upstream: Upstream,
    ordered: Sequence[Backend],
    body: bytes,
    headers: dict[str, str],
    move: Callable[[Exchange, Backend], None],
) -> web.StreamResponse:
    """Any other /v1 path: forwarded and measured as a plain request."""
    _, resp = await upstream.dispatch(ex, ordered, request.path_qs, body, headers, move)
    return await relay_plain(request, ex, resp)
