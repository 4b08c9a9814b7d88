"""Sending a request upstream, with the retry policy and passive health around the transport.

Policy: a connect error or connect timeout, a broken connection or a 502/503 before the first
byte is retried once, on the next backend of the routing decision (the admission ticket moves
with it); a read timeout is not retried (the engine may still be working on it); nothing is
retried after the first byte.
Every failure counts toward the backend's passive ejection (``BackendPool.report_failure``).
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp

from .admission import Ticket
from .errors import NoHealthyBackend, ProxyError, UpstreamError, UpstreamTimeout
from .request import InferenceRequest, Measurement
from .telemetry import Metrics
from .upstream.backends import BackendPool
from .upstream.transport import Transport

RETRYABLE_STATUS = frozenset({502, 503})


async def dispatch(
    req: InferenceRequest,
    ticket: Ticket,
    meas: Measurement,
    *,
    transport: Transport,
    pool: BackendPool,
    metrics: Metrics,
    on_retry: Callable[[str], None] | None = None,
) -> aiohttp.ClientResponse:
    """The upstream response (headers received) from the ticket's backend or its fallback.
    ``on_retry(backend)``: an attempt on ``backend`` failed and the request goes on to the
    next (experiments count it against the backend's group)."""
    if ticket.backend is None:
        raise NoHealthyBackend(
            f"No healthy backend serves model '{req.model}'.", reason="no_backend"
        )
    tries = [ticket.backend, *ticket.fallbacks[:1]]
    for i, backend in enumerate(tries):
        if i:
            ticket.move(backend)
        meas.dispatched(backend.name, ticket.inflight_at_grant)
        last_try = i == len(tries) - 1
        try:
            resp = await transport.send(
                backend, req.method, req.path, req.data, req.headers, req.client_auth
            )
        except aiohttp.ClientConnectorError:
            err: ProxyError = UpstreamError(f"Could not connect to backend {backend.name}.")
            kind = "connect"
        except aiohttp.ConnectionTimeoutError:  # nothing was sent: as safe to retry as a refusal
            err = UpstreamTimeout(
                f"Could not connect to backend {backend.name} within "
                f"{transport.timeouts.connect_s:g}s."
            )
            kind = "connect_timeout"
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            err = UpstreamError(f"Backend {backend.name} closed the connection.")
            kind = "disconnect"
        except TimeoutError:
            pool.report_failure(backend, "timeout")
            raise UpstreamTimeout(
                f"Backend {backend.name} did not answer within {transport.timeouts.read_s:g}s."
            ) from None
        else:
            if resp.status not in RETRYABLE_STATUS or last_try:
                if resp.status < 500:
                    pool.report_success(backend)
                else:
                    pool.report_failure(backend, f"http_{resp.status}")
                return resp
            resp.release()
            err = UpstreamError(f"Backend {backend.name} answered {resp.status}.")
            kind = f"http_{resp.status}"
        pool.report_failure(backend, kind)
        if last_try:
            raise err
        metrics.retries.labels(backend.name, kind).inc()
        if on_retry is not None:
            on_retry(backend.name)
    raise AssertionError("unreachable")
