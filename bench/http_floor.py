"""The HTTP framework's own floor: what aiohttp costs per request, before the proxy does
anything, beside bare asyncio protocols in the same run.

Everything runs in one process on one core (pinned with ``--core``), over loopback, with
uvloop; CPU time (user + system, ``time.process_time``) is divided by the work done. Each
figure includes both ends and the kernel's loopback work, so only the differences between
rows mean something:

- ``bare``: a bare-protocol client against a bare-protocol server (the loop and kernel floor);
- ``aiohttp server``: the same bare client against an ``aiohttp.web`` app whose handler reads
  the body and answers (what the proxy's listening side costs at least);
- ``aiohttp client``: ``ClientSession.request`` + ``read`` against the bare server (what each
  upstream request costs at least).

    python3 bench/http_floor.py            # about 10 s
    python3 bench/http_floor.py --n 40000  # steadier

The proxy's per-request cost (``bench/proxy_overhead.py``, scenario C) sits on top of
``aiohttp server`` + ``aiohttp client`` minus one ``bare``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import aiohttp
import uvloop
from aiohttp import web
from yarl import URL

BODY = b'{"model":"m","messages":[{"role":"user","content":"hello"}],"max_tokens":16}'
REQ = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(BODY), BODY)
)
ANSWER = b'{"id":"x","choices":[{"text":"hi"}],"usage":{"prompt_tokens":5,"completion_tokens":1}}'
RESP = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
    len(ANSWER),
    ANSWER,
)
CONC = 64


class _Answer(asyncio.Protocol):
    """A bare server: one fixed answer per request head (bodies are small and arrive whole)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.t.write(RESP * data.count(b"HTTP/1.1\r\n"))


class _Client(asyncio.Protocol):
    """A bare client: one request at a time, done when a whole answer (by length) arrived."""

    def __init__(self) -> None:
        self.buf = b""
        self.fut: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        head = self.buf.find(b"\r\n\r\n")
        if head < 0:
            return
        at = self.buf.lower().find(b"content-length:", 0, head)
        n = int(self.buf[at + 15 : self.buf.find(b"\r\n", at)])
        if len(self.buf) - head - 4 < n:
            return
        self.buf = self.buf[head + 4 + n :]
        if self.fut is not None:
            self.fut.set_result(None)


async def _cpu_per(n: int, work: Callable[[int], Awaitable[object]]) -> float:
    """Microseconds of CPU per unit: a warm-up, then ``n`` units over ``CONC`` workers."""
    await asyncio.gather(*(work(max(1, n // CONC // 10)) for _ in range(CONC)))
    t0 = time.process_time()
    await asyncio.gather(*(work(n // CONC) for _ in range(CONC)))
    return (time.process_time() - t0) / (n // CONC * CONC) * 1e6


async def _raw_clients(port: int, n: int) -> float:
    """CPU per request of ``n`` requests over CONC bare-protocol client connections."""
    loop = asyncio.get_running_loop()
    conns = [(await loop.create_connection(_Client, "127.0.0.1", port))[1] for _ in range(CONC)]
    free = list(conns)

    async def work(k: int) -> None:
        c = free.pop()
        for _ in range(k):
            c.fut = loop.create_future()
            c.t.write(REQ)
            await c.fut
        free.append(c)

    try:
        return await _cpu_per(n, work)
    finally:
        for c in conns:
            c.t.close()


async def bare(n: int) -> float:
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(_Answer, "127.0.0.1", 0)
    try:
        return await _raw_clients(srv.sockets[0].getsockname()[1], n)
    finally:
        srv.close()


async def aiohttp_server(n: int) -> float:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        return await _raw_clients(runner.addresses[0][1], n)
    finally:
        await runner.cleanup()


async def aiohttp_client(n: int) -> float:
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(_Answer, "127.0.0.1", 0)
    url = URL(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/v1/chat/completions")
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    headers = {"Content-Type": "application/json"}

    async def work(k: int) -> None:
        for _ in range(k):
            resp = await session.post(url, data=BODY, headers=headers)
            await resp.read()
            resp.release()

    try:
        return await _cpu_per(n, work)
    finally:
        await session.close()
        srv.close()


async def main(args: argparse.Namespace) -> None:
    rows: list[tuple[str, str, float]] = []
    for _ in range(args.repeat):
        rows.append(("request", "bare", await bare(args.n)))
        rows.append(("request", "aiohttp server", await aiohttp_server(args.n)))
        rows.append(("request", "aiohttp client", await aiohttp_client(args.n)))
    best: dict[str, tuple[str, float]] = {}
    for unit, name, v in rows:
        if name not in best or v < best[name][1]:
            best[name] = (unit, v)
    floor = best["bare"][1]
    print(f"aiohttp {aiohttp.__version__}, uvloop {uvloop.__version__}; one core, both ends and")
    print(f"the kernel in each figure; best of {args.repeat}")
    print(f"{'row':24} {'CPU':>12}   vs bare")
    for name, (unit, v) in best.items():
        print(f"{name:24} {v:8.1f} µs/{unit:7} x{v / floor:4.2f}")
    extra = best["aiohttp server"][1] + best["aiohttp client"][1] - floor
    print(f"a proxy's framework floor per request (server + client - bare): {extra:.0f} µs")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20000, help="requests per request row")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--core", type=int, default=None, help="pin to this core (default: the last)")
    a = p.parse_args()
    core = a.core if a.core is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    uvloop.run(main(a))
