"""The HTTP transport to the backends: one shared ``ClientSession``, one narrow method.

``send`` makes one upstream request and returns the response as soon as its headers arrive.
The only retry here is a transport detail: a pooled keep-alive connection that the server had
just closed (idle timeout, or llama-server's 100 requests per connection) fails before
anything was processed, so the request is sent once more on a fresh connection. Retrying on
another backend, passive health and admission are above this layer (``proxy.dispatch``).

Upstream compression is refused (``accept-encoding: identity`` is set by
``proxy.validate.upstream_headers``), so the relay can read usage and event boundaries in the
bytes it forwards; the session does not decode (``auto_decompress=False``), and the relay
decodes gzip/deflate itself from a server that compresses anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import aiohttp
from yarl import URL

from ..config import TimeoutConfig
from .backends import Backend


class Transport:
    def __init__(
        self, timeouts: TimeoutConfig, *, on_stale: Callable[[str], None] | None = None
    ) -> None:
        self.timeouts = timeouts
        self.on_stale = on_stale
        self.client_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts.connect_s, sock_read=timeouts.read_s
        )
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the shared session (it needs a running loop)."""
        connector = aiohttp.TCPConnector(
            limit=0, ttl_dns_cache=300, keepalive_timeout=self.timeouts.keepalive_s
        )
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Transport.start() first"
        return self._session

    def _fresh_session(self) -> aiohttp.ClientSession:
        """A session that never reuses a connection, for the retry after a stale one: under
        load many pooled connections go stale together, and the pool could hand out another."""
        if self._fresh is None or self._fresh.closed:
            self._fresh = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                auto_decompress=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent"),
            )
        return self._fresh

    async def close(self) -> None:
        for s in (self._fresh, self._session):
            if s is not None:
                await s.close()

    async def send(
        self,
        backend: Backend,
        method: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        client_auth: str | None = None,
    ) -> aiohttp.ClientResponse:
        """One request to ``backend``; raises aiohttp's connection errors and TimeoutError."""
        hdrs = {**headers, **backend.auth_headers(client_auth)}
        url = URL(backend.url + path, encoded=True)  # as the client sent it, never re-encoded
        data = body if body or method not in ("GET", "HEAD") else None
        try:
            return await self.session.request(
                method, url, data=data, headers=hdrs, timeout=self.client_timeout
            )
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                raise
            if self.on_stale is not None:
                self.on_stale(backend.name)
            return await self._fresh_session().request(
                method, url, data=data, headers=hdrs, timeout=self.client_timeout
            )
