"""A fault injector in front of a real engine, for tests: forwards every request unchanged
(streams included) until told to fail, then answers ``/v1/*`` with an HTTP error or holds it
(a stall), while ``/health`` and ``/metrics`` keep being forwarded (the engine looks alive).

    python3 tests/support/fault_proxy.py --port P --upstream http://127.0.0.1:8000
    POST /_fault {"mode": "ok" | "error" | "stall", "status": 503}

Started as a process by ``start_fault_proxy`` (stopped by pid like every test process)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})


def build(upstream: str) -> web.Application:
    state = {"mode": "ok", "status": 503}
    app = web.Application()

    async def session_ctx(app: web.Application) -> object:
        app["session"] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await app["session"].close()

    app.cleanup_ctx.append(session_ctx)  # type: ignore[arg-type]

    async def fault(request: web.Request) -> web.Response:
        body = await request.json()
        state.update({k: body[k] for k in ("mode", "status") if k in body})
        return web.json_response(state)

    async def forward(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/v1/") and state["mode"] != "ok":
            if state["mode"] == "stall":
                await asyncio.sleep(3600)
            return web.json_response({"error": {"message": "injected fault", "type": "fault"}},
                                     status=int(state["status"]))  # fmt: skip
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with app["session"].request(request.method, upstream + request.path_qs,
                                          data=await request.read(), headers=headers) as r:  # fmt: skip
            out = web.StreamResponse(status=r.status, headers={
                k: v for k, v in r.headers.items() if k.lower() not in _HOP})  # fmt: skip
            await out.prepare(request)
            async for chunk in r.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app.router.add_post("/_fault", fault)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    args = p.parse_args()
    web.run_app(build(args.upstream.rstrip("/")), host="127.0.0.1", port=args.port,
                print=None, access_log=None)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    raise SystemExit(main())
