"""``proxy.dispatch`` over real sockets: a connect timeout is a connect failure (nothing was
sent, so it is retried on the fallback) and its error names what timed out, while a read
timeout is not retried and names the read limit."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Iterator

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from proxy.admission.scheduler import Ticket
from proxy.config import BackendConfig, HealthConfig, TimeoutConfig
from proxy.dispatch import dispatch
from proxy.errors import UpstreamTimeout
from proxy.request import Measurement
from proxy.telemetry import Metrics
from proxy.upstream.backends import BackendPool
from proxy.upstream.transport import Transport
from tests.support.fakes import Admission, request, up


@contextlib.contextmanager
def blackhole() -> Iterator[str]:
    """A listener whose accept queue is full: the kernel drops further SYNs, so a connect to it
    hangs until the client gives up (what an overloaded or wedged server looks like)."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    try:
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(hole.getsockname())
            fillers.append(s)
        host, port = hole.getsockname()
        yield f"http://{host}:{port}"
    finally:
        for s in [*fillers, hole]:
            s.close()


async def _server(delay_s: float) -> TestServer:
    async def answer(_: web.Request) -> web.Response:
        await asyncio.sleep(delay_s)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


def _setup(urls: list[str], timeouts: TimeoutConfig) -> tuple[Admission, Transport]:
    metrics = Metrics(CollectorRegistry())
    pool = BackendPool([BackendConfig(url=u) for u in urls], HealthConfig(), metrics)
    for b in pool.backends:
        up(b)
    return Admission(pool), Transport(timeouts)


def _url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


def _send(
    adm: Admission, transport: Transport, fallbacks: int
) -> tuple[Ticket, Measurement, Awaitable[ClientResponse]]:
    """A request on the pool's first backend with ``fallbacks`` of the others behind it."""
    req = request()
    first, *rest = adm.pool.backends
    ticket = Ticket(adm.scheduler, req, first, rest[:fallbacks], counted=True)
    meas = Measurement(req.request_id)
    sent = dispatch(req, ticket, meas, transport=transport, pool=adm.pool, metrics=adm.metrics)
    return ticket, meas, sent


async def test_a_connect_timeout_is_retried_on_the_fallback() -> None:
    good = await _server(0.0)
    with blackhole() as hole:
        adm, transport = _setup([hole, _url(good)], TimeoutConfig(connect_s=0.3, read_s=5.0))
        await transport.start()
        try:
            first, second = adm.pool.backends
            ticket, meas, sent = _send(adm, transport, fallbacks=1)
            resp = await sent
            assert resp.status == 200
            resp.release()
            assert meas.attempts == 2 and ticket.backend is second
            assert first.consecutive_failures == 1
            retried = adm.registry.get_sample_value(
                "rightsizer_upstream_retries_total",
                {"backend": first.name, "reason": "connect_timeout"},
            )
            assert retried == 1.0
            # with no fallback left, the error says what timed out, and the limit
            _, _, sent = _send(adm, transport, fallbacks=0)
            with pytest.raises(UpstreamTimeout, match=r"Could not connect to .* within 0\.3s"):
                await sent
        finally:
            await transport.close()
            await good.close()


async def test_a_read_timeout_is_not_retried_and_names_the_read_limit() -> None:
    slow, good = await _server(2.0), await _server(0.0)
    adm, transport = _setup([_url(slow), _url(good)], TimeoutConfig(read_s=0.3))
    await transport.start()
    try:
        ticket, meas, sent = _send(adm, transport, fallbacks=1)
        with pytest.raises(UpstreamTimeout, match=r"did not answer within 0\.3s"):
            await sent
        # not retried: the engine may still be working on it
        assert meas.attempts == 1 and ticket.backend is adm.pool.backends[0]
    finally:
        await transport.close()
        await slow.close()
        await good.close()
