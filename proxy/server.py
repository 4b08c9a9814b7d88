"""The listener: aiohttp's server with the guards a proxy facing untrusted clients needs.

``GuardedRunner`` is a ``web.AppRunner`` whose connections

* answer a request aiohttp rejects before the app sees it (a malformed request line or header,
  a header over the limits) with the OpenAI-style JSON error every other error of the proxy
  has, where aiohttp answers ``text/plain``; the body never echoes what the client sent (a
  malformed ``Authorization`` header must not come back, or reach the log), and the log gets
  one INFO line naming the kind of problem, not a traceback;
* close a connection whose request headers do not complete within ``header_timeout_s`` of
  their first byte (slowloris), and an idle keep-alive connection after ``keepalive_s``;
* answer 503 and close when ``max_connections`` are already open.

aiohttp offers no hook for these but ``RequestHandler`` itself: its ``Server`` makes the
handlers, so the server the runner made is given the subclass that makes ours. That touches
private attributes of aiohttp (``_loop``, ``_kwargs``, ``_waiter``, ``_messages``,
``_keepalive_handle``, ``_next_keepalive_close_time``, ``_process_keepalive``), so
``tests/integration/test_proxy_emulated.py`` and ``tests/adversarial`` drive each guard over
raw sockets.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .errors import error_body, error_response, protocol_error

log = logging.getLogger("rightsizer.server")


@dataclass(frozen=True, slots=True, kw_only=True)
class Guards:
    header_timeout_s: float = 10.0
    keepalive_s: float = 30.0
    max_connections: int = 4096
    on_reject: Any = None  # callable(reason) counting refusals (telemetry), or None


_BUSY = orjson.dumps(
    error_body(
        "The proxy has too many open connections; retry shortly.", "service_unavailable",
        code="too_many_connections",
    )
)  # fmt: skip
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
    + str(len(_BUSY)).encode()
    + b"\r\n\r\n"
    + _BUSY
)


class _GuardedHandler(RequestHandler):
    _guards: Guards
    _header_started = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if manager is not None and len(manager.connections) > self._guards.max_connections:
            self._count("too_many_connections")
            transport.write(_BUSY_RESPONSE)  # type: ignore[attr-defined]
            self.force_close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages or self._request_in_progress or self._upgraded:
            self._header_started = False  # a whole request head arrived, or one is served
            return
        if data and not self._header_started:  # the first bytes of a request head
            self._header_started = True
            self._close_at(self._loop.time() + self._guards.header_timeout_s)

    def _close_at(self, when: float) -> None:
        """Bring aiohttp's idle-close timer forward to ``when`` (it closes only while idle)."""
        if self._keepalive_handle is not None and when >= self._next_keepalive_close_time:
            return
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
        self._next_keepalive_close_time = when
        self._keepalive_handle = self._loop.call_at(when, self._process_keepalive)

    def _process_keepalive(self) -> None:
        waiting = self._waiter is not None and not self._waiter.done()
        due = self._loop.time() >= self._next_keepalive_close_time
        if self._header_started and waiting and due:
            self._count("header_timeout")
        super()._process_keepalive()

    def _count(self, reason: str) -> None:
        if self._guards.on_reject is not None:
            self._guards.on_reject(reason)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a reply began: the connection is broken
            raise ConnectionError("the response had started; no error response possible")
        err = protocol_error(status, exc, message)
        if err.status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            log.info("refused a malformed request from %s: %s", request.remote, err.message)
        self._count(err.code or "malformed")
        resp = error_response(err, os.urandom(12).hex())
        resp.force_close()  # as aiohttp does: the connection's framing may be lost
        return resp


class _GuardedServer(web.Server):
    guards: Guards

    def __call__(self) -> RequestHandler:
        handler = _GuardedHandler(self, loop=self._loop, **self._kwargs)
        handler._guards = self.guards
        return handler


class GuardedRunner(web.AppRunner):
    """``web.AppRunner`` with the protocol guards (see the module docstring)."""

    def __init__(self, app: web.Application, *, guards: Guards | None = None, **kw: Any) -> None:
        self.guards = guards or Guards()
        kw.setdefault("keepalive_timeout", self.guards.keepalive_s)
        super().__init__(app, **kw)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _GuardedServer
        server.guards = self.guards  # type: ignore[attr-defined]
        return server
