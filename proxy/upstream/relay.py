"""The byte-faithful relay of one upstream response to the client, measured on the way.

Streaming hot path, per read from the backend (often several SSE events at once under load):
one timestamp, split off any incomplete trailing event (held until the rest arrives, at most
``relay.max_event_bytes``), count events by their blank-line boundaries, and run one compiled
scan for the few markers that need a closer look (a ``"usage": {`` object, a string
``"finish_reason"``, ``[DONE]``; JSON whitespace allowed). Only blocks holding one of those, or
blocks before the first content token, are split into events and parsed; ordinary token chunks
are forwarded as they came. The usage chunk the proxy asked for on the client's behalf is
recognised structurally (``usage`` present, ``choices`` empty) and removed.

ITL: a read that brings k content events after a gap g records k gaps of g/k (the events
arrived together; their mean spacing is what the engine produced), so the mean ITL times the
token count equals the decode time.

A stream ends one of these ways, each with a truthful ``Measurement``: ``data: [DONE]``
(complete; a client that leaves after it still got everything), a backend failure or timeout
(a final SSE ``error`` event), an event over ``max_event_bytes`` (error event), the proxy's
shutdown grace running out (error event, code ``shutdown``), or the client leaving.

Upstream bodies come uncompressed (the proxy asks for ``identity``); a backend that compresses
anyway with gzip or deflate is decoded here, anything else is refused with 502.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import zlib
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from estimator.records import Outcome

from ..errors import ProxyError, ShuttingDown, UpstreamError, UpstreamTimeout, sse_error_event
from ..request import Measurement

_DONE = b"[DONE]"
_MARKERS = re.compile(rb'"usage"\s*:\s*\{|"finish_reason"\s*:\s*"|\[DONE\]')
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
     "proxy-connection", "trailer", "upgrade", "x-request-id"}
)  # fmt: skip
"""Response headers not passed to the client: hop-by-hop ones, the length and coding (the
relay may change both), and the backend's own request id (the client gets the proxy's)."""
_DECODABLE = frozenset({"gzip", "x-gzip", "deflate"})


class Drain:
    """The proxy's shutdown state, read by the relay: once ``expired``, a request still
    running is ended with a ``shutdown`` error instead of being cut silently."""

    __slots__ = ("draining", "expired", "tasks")

    def __init__(self) -> None:
        self.draining = False
        self.expired = False
        self.tasks: set[asyncio.Task[Any]] = set()


def response_headers(resp: aiohttp.ClientResponse, request_id: str) -> dict[str, str]:
    out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP}
    out["x-request-id"] = request_id
    return out


def decoder(resp: aiohttp.ClientResponse, backend: str | None) -> Any:
    """A zlib decompressor for a gzip/deflate body, None for identity; 502 for others."""
    enc = resp.headers.get("Content-Encoding", "").strip().lower()
    if enc in ("", "identity"):
        return None
    if enc in _DECODABLE:
        return zlib.decompressobj(wbits=47)  # gzip or zlib header, detected
    resp.close()
    raise UpstreamError(
        f"Backend {backend} answered with Content-Encoding '{enc[:32]}' although the proxy "
        "asked for identity."
    )


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


def apply_usage(meas: Measurement, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(pt, int) and not isinstance(pt, bool) and pt >= 0:
        meas.prompt_tokens = pt
    if isinstance(ct, int) and not isinstance(ct, bool) and ct >= 0:
        meas.completion_tokens = ct
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        meas.cached_tokens = details["cached_tokens"]


def _apply_finish(meas: Measurement, obj: Any) -> None:
    if isinstance(obj, dict):
        for ch in obj.get("choices") or ():
            if isinstance(ch, dict) and isinstance(ch.get("finish_reason"), str):
                meas.finish_reason = ch["finish_reason"][:64]


async def relay_plain(
    request: web.Request, meas: Measurement, resp: aiohttp.ClientResponse
) -> web.Response:
    """Non-streamed: read the whole body, take usage from it, forward it (decoded)."""
    dec = decoder(resp, meas.backend)
    done = False
    try:
        body = await resp.read()
        done = True
    except TimeoutError:
        raise UpstreamTimeout(
            f"Backend {meas.backend} did not finish within the read timeout."
        ) from None
    except aiohttp.ClientError:
        raise UpstreamError(f"Backend {meas.backend} failed while sending its answer.") from None
    finally:
        # a whole body gives the connection back to the pool; a cancelled or failed read
        # closes it, so the engine stops working for a client that left
        resp.release() if done else resp.close()
    if dec is not None:
        try:
            body = dec.decompress(body) + dec.flush()
        except zlib.error:
            raise UpstreamError(f"Backend {meas.backend} sent a corrupt compressed body.") from None
    meas.status = resp.status  # no first-token time: a whole body shows no token timing
    if resp.status < 400:
        obj = _json(body)
        if isinstance(obj, dict):
            apply_usage(meas, obj.get("usage"))
            _apply_finish(meas, obj)
    else:
        meas.outcome = Outcome.CLIENT_ERROR if resp.status < 500 else Outcome.UPSTREAM_ERROR
    return web.Response(
        status=resp.status, body=body, headers=response_headers(resp, meas.request_id)
    )


class _TotalTimeout(Exception):
    pass


class _EventTooLarge(Exception):
    pass


class StreamState:
    """What the stream loop keeps between reads."""

    __slots__ = ("done", "finish_event", "last_t", "sep", "usage_event")

    def __init__(self) -> None:
        self.done = False
        self.usage_event: bytes | None = None
        self.finish_event: bytes | None = None
        self.last_t = 0.0
        self.sep = b"\n\n"


def _classify(
    meas: Measurement, st: StreamState, block: bytes, now: float, strip_usage: bool
) -> bytes:
    """Slow path: split a block into events; returns the bytes to forward."""
    sep = st.sep
    events = block.split(sep)[:-1]
    kept: list[bytes] = []
    content = 0
    for ev in events:
        if ev.startswith(b"data: [DONE]") or ev.rstrip().endswith(_DONE):
            st.done = True
            kept.append(ev)
            continue
        marked = _MARKERS.search(ev) is not None
        obj = _event_json(ev) if marked or meas.first_token_s is None else None
        if marked and isinstance(obj, dict):
            if isinstance(obj.get("usage"), dict):
                st.usage_event = ev
                if strip_usage and not obj.get("choices"):
                    continue  # the usage chunk we asked for on the client's behalf
            if any(isinstance(c, dict) and isinstance(c.get("finish_reason"), str)
                   for c in obj.get("choices") or ()):  # fmt: skip
                st.finish_event = ev
        kept.append(ev)
        if meas.first_token_s is None:
            if _is_content(obj):
                meas.first_token_s = st.last_t = now
                meas.content_events = 1
            continue
        if not _EMPTY_CHOICES.search(ev):
            content += 1
    _add_gaps(meas, st, content, now)
    if len(kept) == len(events):
        return block
    return b"".join(ev + sep for ev in kept)


def _add_gaps(meas: Measurement, st: StreamState, k: int, now: float) -> None:
    if k <= 0:
        return
    gap = (now - st.last_t) / k
    meas.gaps.extend([gap] * k)
    meas.content_events += k
    st.last_t = now


async def relay_stream(
    request: web.Request,
    meas: Measurement,
    resp: aiohttp.ClientResponse,
    *,
    strip_usage: bool,
    est_prompt_tokens: int,
    read_timeout_s: float,
    max_event_bytes: int,
    deadline: float | None,
    drain: Drain,
) -> web.StreamResponse:
    """Streamed: forward bytes as they come, timing every content event (see module doc).
    ``deadline``: the request's end on ``time.perf_counter``'s clock (``timeouts.total_s``)."""
    dec = decoder(resp, meas.backend)
    out = web.StreamResponse(status=resp.status, headers=response_headers(resp, meas.request_id))
    meas.status = resp.status
    st = StreamState()
    clean = False
    try:
        # inside the try: a client that leaves while the headers go out cancels us here,
        # and the upstream response must still be closed (else the engine generates on)
        await out.prepare(request)
        loop = asyncio.get_running_loop()
        limit = None if deadline is None else loop.time() + (deadline - time.perf_counter())
        async with asyncio.timeout_at(limit):
            await _pump(out, meas, st, resp, dec, strip_usage, max_event_bytes)
        clean = True
    except TimeoutError:
        if deadline is not None and time.perf_counter() >= deadline:
            err: ProxyError = UpstreamTimeout("The request exceeded the proxy's total time limit.")
        else:
            err = UpstreamTimeout(
                f"Backend {meas.backend} sent nothing for {read_timeout_s:g}s mid-stream."
            )
        await _fail_stream(out, meas, Outcome.TIMEOUT, err)
    except _EventTooLarge:
        await _fail_stream(
            out,
            meas,
            Outcome.UPSTREAM_ERROR,
            UpstreamError(
                f"Backend {meas.backend} sent an event over {max_event_bytes} bytes "
                "(relay.max_event_bytes)."
            ),
        )
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, zlib.error) as exc:
        if isinstance(exc, ConnectionResetError | aiohttp.ClientConnectionResetError):
            raise  # the client went away: the handler records it
        await _fail_stream(
            out,
            meas,
            Outcome.UPSTREAM_ERROR,
            UpstreamError(f"Backend {meas.backend} failed mid-stream: the connection broke."),
        )
    except asyncio.CancelledError:
        if drain.expired and not meas.last_event_sent:  # the end, properly framed
            await _fail_stream(out, meas, Outcome.SHUTDOWN, ShuttingDown())
            with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
                await out.write_eof()
        raise
    finally:
        # a finished stream gives its keep-alive connection back to the pool; any other end
        # closes it, so the engine stops generating for nobody
        resp.release() if clean else resp.close()
        _finish_stream(meas, st, est_prompt_tokens)
    with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
        await out.write_eof()
    return out


async def _pump(
    out: web.StreamResponse,
    meas: Measurement,
    st: StreamState,
    resp: aiohttp.ClientResponse,
    dec: Any,
    strip_usage: bool,
    max_event_bytes: int,
) -> None:
    """The per-read loop (the hot path)."""
    reader = resp.content
    perf = time.perf_counter
    markers = _MARKERS.search
    pending: list[bytes] = []  # an incomplete trailing event, in pieces (no quadratic joins)
    pending_len = 0
    sep = b""
    while True:
        data = await reader.readany()
        if not data:
            break
        now = perf()
        if dec is not None:
            data = dec.decompress(data)
            if not data:
                continue
        if not sep:  # decided at the first line ending: CRLF servers exist
            data = b"".join((*pending, data)) if pending else data
            pending, pending_len = [], 0
            eol = data.find(b"\n")
            if eol < 0:
                if len(data) > max_event_bytes:
                    raise _EventTooLarge
                pending, pending_len = [data], len(data)
                continue
            sep = st.sep = b"\r\n\r\n" if data[eol - 1 : eol] == b"\r" else b"\n\n"
        if pending:
            tail = pending[-1][-(len(sep) - 1) :]
            if sep not in tail + data[: len(sep) - 1] and sep not in data:
                pending.append(data)
                pending_len += len(data)
                if pending_len > max_event_bytes:
                    raise _EventTooLarge
                continue
            data = b"".join(pending) + data
            pending, pending_len = [], 0
        if data.endswith(sep):  # the usual read: whole events
            block = data
        else:
            end = data.rfind(sep)
            if end < 0:
                if len(data) > max_event_bytes:
                    raise _EventTooLarge
                pending, pending_len = [data], len(data)
                continue
            end += len(sep)
            block = data[:end]
            pending, pending_len = [data[end:]], len(data) - end
            if pending_len > max_event_bytes:
                raise _EventTooLarge
        if meas.first_token_s is None or markers(block) is not None:
            block = _classify(meas, st, block, now, strip_usage)
        else:  # k content events after a gap: k gaps of gap/k (inlined _add_gaps)
            k = block.count(sep)
            gap = (now - st.last_t) / k
            if k == 1:
                meas.gaps.append(gap)
            else:
                meas.gaps.extend([gap] * k)
            meas.content_events += k
            st.last_t = now
        if block:
            await out.write(block)
            if st.done:
                meas.last_event_sent = True
    if pending:
        await out.write(b"".join(pending))
    if not st.done:
        raise aiohttp.ClientPayloadError("stream ended before [DONE]")


async def _fail_stream(
    out: web.StreamResponse, meas: Measurement, outcome: Outcome, err: ProxyError
) -> None:
    meas.outcome = outcome
    with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
        await out.write(sse_error_event(err))


def _finish_stream(meas: Measurement, st: StreamState, est_prompt_tokens: int) -> None:
    if st.usage_event is not None:
        obj = _event_json(st.usage_event)
        if isinstance(obj, dict):
            apply_usage(meas, obj.get("usage"))
    if st.finish_event is not None:
        _apply_finish(meas, _event_json(st.finish_event))
    if meas.completion_tokens is None:
        # the backend ignored include_usage: fall back to counting content events
        meas.completion_tokens = meas.content_events
        meas.prompt_tokens = meas.prompt_tokens or est_prompt_tokens
        meas.tokens_estimated = True


async def relay_raw(
    request: web.Request, meas: Measurement, resp: aiohttp.ClientResponse, *, deadline: float | None
) -> web.StreamResponse:
    """Any other body (an event stream of another API, audio, a file): forwarded as it comes,
    decoded if the backend compressed it, bounded by ``deadline`` (perf_counter clock). A
    failure after the status line went out can only cut the body; the record says why."""
    dec = decoder(resp, meas.backend)
    out = web.StreamResponse(status=resp.status, headers=response_headers(resp, meas.request_id))
    meas.status = resp.status
    if resp.status >= 400:
        meas.outcome = Outcome.CLIENT_ERROR if resp.status < 500 else Outcome.UPSTREAM_ERROR
    clean = False
    try:
        await out.prepare(request)
        loop = asyncio.get_running_loop()
        limit = None if deadline is None else loop.time() + (deadline - time.perf_counter())
        async with asyncio.timeout_at(limit):
            while data := await resp.content.readany():
                if meas.first_token_s is None:
                    meas.first_token_s = time.perf_counter()
                await out.write(dec.decompress(data) if dec is not None else data)
        clean = True
    except TimeoutError:
        meas.outcome = Outcome.TIMEOUT
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, zlib.error) as exc:
        if isinstance(exc, ConnectionResetError | aiohttp.ClientConnectionResetError):
            raise
        meas.outcome = Outcome.UPSTREAM_ERROR
    finally:
        resp.release() if clean else resp.close()
    if clean:
        with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
            await out.write_eof()
    elif request.transport is not None:
        request.transport.close()  # the body is incomplete: the client must not take it whole
    return out


class _Discard:
    """Where a shadow copy's bytes go: nowhere (the pump's ``out``)."""

    async def write(self, data: bytes) -> None:
        return None


async def drain_stream(
    meas: Measurement,
    resp: aiohttp.ClientResponse,
    *,
    est_prompt_tokens: int,
    max_event_bytes: int,
) -> None:
    """Read a streamed answer to its end, measured like a relayed one, and discard it (shadow
    copies: no client waits for it). Failures end up in ``meas.outcome``, never raised, except
    cancellation."""
    meas.status = resp.status
    st = StreamState()
    clean = False
    try:
        dec = decoder(resp, meas.backend)
        await _pump(_Discard(), meas, st, resp, dec, False, max_event_bytes)  # type: ignore[arg-type]
        clean = True
    except TimeoutError:
        meas.outcome = Outcome.TIMEOUT
    except (_EventTooLarge, UpstreamError, aiohttp.ClientError, zlib.error):
        meas.outcome = Outcome.UPSTREAM_ERROR
    finally:
        resp.release() if clean else resp.close()
        _finish_stream(meas, st, est_prompt_tokens)
