"""A fault-injecting OpenAI-compatible backend, run as its own process by the adversarial tests.

    python3 tests/support/faulty_backend.py --port 8123 --models faulty[,other] [--journal F]

Every model it announces on ``/v1/models`` behaves the same; what a request gets is chosen
per request by the body's ``"fault"`` field (the proxy forwards unknown body fields today) or
the ``x-fault`` header (once the proxy forwards end-to-end headers). Knobs, in the body:
``fault_itl`` (seconds between events / dripped bytes), ``fault_bytes`` (size of an
unterminated event), ``fault_pad`` (bytes of padding in each content event), ``max_tokens``
(events in a stream, capped at 2000).

Faults (``ok`` when absent or unknown):

========================  =================================================================
``ok``                    a normal chat/completions answer, streamed or not, usage chunk
                          when ``stream_options.include_usage``; compact JSON like vLLM
``spaced``                the same with ``json.dumps``'s spaces (``"choices": []``)
``crlf``                  a stream whose events end with ``\\r\\n\\r\\n`` (valid SSE)
``gzip``                  gzip JSON / gzip SSE with ``Content-Encoding: gzip``, when the
                          request's ``Accept-Encoding`` allows gzip (else identity)
``gzip-always``           gzip whatever the request accepts (a misconfigured gateway)
``stall-headers``         never answers (sleeps until the process ends)
``stall-mid``             stream: two events, then silence; plain: headers, half a body, silence
``drip``                  plain: the body one byte per ``fault_itl`` (0.1 s); stream: events
                          every ``fault_itl`` (0.3 s), ``max_tokens`` of them
``nosep``                 stream: one event of ``fault_bytes`` (40 MiB) with no separator,
                          then ``\\n\\ndata: [DONE]\\n\\n``
``abort``                 stream: two events, then the connection is cut; plain: headers
                          with ``Content-Length: 1000``, 10 bytes, cut
``linger``                a normal stream whose response ends ``fault_linger`` (0.5 s) after
                          ``data: [DONE]`` (the window a client closes in)
``status-NNN``            status NNN with an OpenAI-shaped error body
``echo``                  200 JSON describing what arrived: method, path, query, headers
                          (``authorization`` values replaced by their SHA-256)
========================  =================================================================

Requests to a path outside ``/v1/`` (``/admin/estimator``, ``/metrics``, ``/x``, ...) other
than ``/health`` and ``GET /v1/models``, read as leniently as any server might
(``normalised``: decoded up to three times, ``\\`` as ``/``, ``;params`` dropped), answer 200
with ``FAULTY-BACKEND-PRIVATE`` in the body: a proxy that lets a client reach them leaks
that marker. ``--journal`` appends one JSON
line per request received (method, raw path, headers with hashed credentials, fault), so
tests can check what the proxy forwarded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import json
import posixpath
import re
import time
import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
from aiohttp import web

PRIVATE_MARKER = "FAULTY-BACKEND-PRIVATE"
_STALL_S = 3600.0
_MAX_EVENTS = 2000


def normalised(path: str | bytes) -> str:
    """The most lenient reading of a path any server might make: percent-decoded up to three
    times, backslashes as slashes, ``;params`` dropped, slashes merged, NULs dropped, dot
    segments resolved. A proxy must forward only paths that stay under /v1/ even read so."""
    raw = path if isinstance(path, bytes) else path.encode("utf-8", "surrogateescape")
    raw = raw.split(b"?", 1)[0].split(b"#", 1)[0]
    for _ in range(3):
        raw = unquote_to_bytes(raw)
    text = raw.decode("latin-1").replace("\\", "/")
    text = re.sub(r";[^/]*", "", text)
    text = re.sub(r"/+", "/", text).replace("\x00", "")
    if not text.startswith("/"):
        text = "/" + text
    norm = posixpath.normpath(text)
    return norm + "/" if text.endswith("/") and norm != "/" else norm


def escapes_v1(path: str | bytes) -> bool:
    return not normalised(path).startswith("/v1/")


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()


def describe(request: web.Request) -> dict[str, Any]:
    """What arrived, with credentials replaced by their digests (never echoed raw)."""
    headers: dict[str, list[str]] = {}
    for k, v in request.headers.items():
        name = k.lower()
        value = _digest(v) if name in ("authorization", "api-key", "x-api-key") else v
        headers.setdefault(name, []).append(value)
    return {
        "method": request.method,
        "path": request.raw_path.split("?", 1)[0],
        "raw_path": request.raw_path,
        "query": request.query_string,
        "headers": headers,
    }


def error_body(status: int, message: str) -> bytes:
    err = {"message": message, "type": "backend_error", "param": None, "code": str(status)}
    return orjson.dumps({"error": err})


class Faulty:
    def __init__(self, models: list[str], journal: str | None) -> None:
        self.models = models
        self.journal = open(journal, "ab", buffering=0) if journal else None  # noqa: SIM115
        self.n = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def _log(self, info: dict[str, Any]) -> None:
        if self.journal is not None:
            self.journal.write(orjson.dumps(info) + b"\n")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body: Any = None
        with contextlib.suppress(orjson.JSONDecodeError):
            body = orjson.loads(raw) if raw else None
        if not isinstance(body, dict):
            body = {}
        info = describe(request)
        path = info["path"]
        fault = body.get("fault") or request.headers.get("x-fault") or "ok"
        if not isinstance(fault, str):
            fault = "ok"
        if path == "/health":
            return web.Response(text="ok")
        if path == "/v1/models" and request.method == "GET":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "faulty"}
                    for m in self.models]  # fmt: skip
            return web.json_response({"object": "list", "data": data})
        self._log({**info, "fault": fault, "t": time.time()})
        if escapes_v1(request.raw_path):  # what a lenient server would serve outside /v1
            return web.Response(text=f"{PRIVATE_MARKER} {request.method} {normalised(path)}\n")
        if fault == "echo" or path not in ("/v1/chat/completions", "/v1/completions"):
            return web.json_response({"object": "echo", **info, "body_len": len(raw)})
        return await self.generate(request, body, fault, chat=path.endswith("chat/completions"))

    async def generate(
        self, request: web.Request, body: dict[str, Any], fault: str, *, chat: bool
    ) -> web.StreamResponse:
        if fault.startswith("status-"):
            status = int(fault[7:]) if fault[7:].isdigit() else 500
            return web.Response(
                status=status, body=error_body(status, f"backend says {status}"),
                content_type="application/json",
            )  # fmt: skip
        if fault == "stall-headers":
            await asyncio.sleep(_STALL_S)
        stream = body.get("stream") is True
        n = body.get("max_tokens") or body.get("max_completion_tokens") or 4
        n = max(1, min(n if isinstance(n, int) else 4, _MAX_EVENTS))
        itl = body.get("fault_itl")
        itl = float(itl) if isinstance(itl, int | float) else 0.0
        if stream:
            return await self.stream(request, body, fault, chat=chat, n=n, itl=itl)
        return await self.whole(request, body, fault, chat=chat, n=n, itl=itl)

    def _dumps(self, fault: str) -> Callable[[Any], bytes]:
        if fault == "spaced":
            return lambda o: json.dumps(o).encode()
        return orjson.dumps

    def _gzip(self, request: web.Request, fault: str) -> bool:
        accepts = "gzip" in request.headers.get("Accept-Encoding", "").lower()
        return fault == "gzip-always" or (fault == "gzip" and accepts)

    async def whole(
        self, request: web.Request, body: dict[str, Any], fault: str, *, chat: bool, n: int,
        itl: float,
    ) -> web.StreamResponse:  # fmt: skip
        self.n += 1
        text = "".join(f"tok{i} " for i in range(1, n + 1))
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
            if chat
            else {"index": 0, "text": text, "finish_reason": "length"}
        )  # fmt: skip
        obj = {
            "id": f"faulty-{self.n}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": body.get("model"), "choices": [choice],
            "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n},
        }  # fmt: skip
        payload = self._dumps(fault)(obj)
        headers = {"Content-Type": "application/json"}
        if self._gzip(request, fault):
            payload = gzip.compress(payload)
            headers["Content-Encoding"] = "gzip"
        if fault in ("stall-mid", "drip", "abort"):
            resp = web.StreamResponse(headers=headers)
            resp.content_length = 1000 if fault == "abort" else len(payload)
            await resp.prepare(request)
            if fault == "abort":
                await resp.write(payload[:10])
                await asyncio.sleep(0.05)
                _cut(request)
                return resp
            if fault == "stall-mid":
                await resp.write(payload[: len(payload) // 2])
                await asyncio.sleep(_STALL_S)
            for i in range(len(payload)):
                await resp.write(payload[i : i + 1])
                await asyncio.sleep(itl or 0.1)
            await resp.write_eof()
            return resp
        return web.Response(body=payload, headers=headers)

    async def stream(
        self, request: web.Request, body: dict[str, Any], fault: str, *, chat: bool, n: int,
        itl: float,
    ) -> web.StreamResponse:  # fmt: skip
        self.n += 1
        dumps = self._dumps(fault)
        sep = b"\r\n\r\n" if fault == "crlf" else b"\n\n"
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        zipper = None
        if self._gzip(request, fault):
            headers["Content-Encoding"] = "gzip"
            zipper = zlib.compressobj(wbits=31)
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)

        async def send(data: bytes) -> None:
            if zipper is not None:
                data = zipper.compress(data) + zipper.flush(zlib.Z_SYNC_FLUSH)
            await resp.write(data)

        base = {"id": f"faulty-{self.n}", "created": int(time.time()), "model": body.get("model"),
                "object": "chat.completion.chunk" if chat else "text_completion"}  # fmt: skip
        if fault == "nosep":
            size = body.get("fault_bytes")
            size = size if isinstance(size, int) and size > 0 else 40 * 1024 * 1024
            await send(b'data: {"choices": [{"index": 0, "text": "')
            block = b"a" * 65536
            for _ in range(size // len(block)):
                await send(block)
            await send(b'"}]}' + sep + b"data: [DONE]" + sep)
            await resp.write_eof()
            return resp
        if fault == "drip":
            itl = itl or 0.3
        pad = body.get("fault_pad")
        pad = "p" * pad if isinstance(pad, int) and 0 < pad <= 1 << 24 else ""
        for i in range(1, n + 1):
            piece = f"tok{i} {pad}"
            choice: dict[str, Any] = (
                {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            )
            choice["finish_reason"] = "length" if i == n else None
            await send(b"data: " + dumps({**base, "choices": [choice]}) + sep)
            if fault in ("stall-mid", "abort") and i == 2:
                if fault == "abort":
                    await asyncio.sleep(0.05)
                    _cut(request)
                    return resp
                await asyncio.sleep(_STALL_S)
            if itl:
                await asyncio.sleep(itl)
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
            await send(b"data: " + dumps({**base, "choices": [], "usage": usage}) + sep)
        await send(b"data: [DONE]" + sep)
        if fault == "linger":  # the engine finishes its response a moment after [DONE]
            linger = body.get("fault_linger")
            await asyncio.sleep(float(linger) if isinstance(linger, int | float) else 0.5)
        if zipper is not None:
            await resp.write(zipper.flush())
        await resp.write_eof()
        return resp


def _cut(request: web.Request) -> None:
    """Break the connection without finishing the response (no chunked terminator)."""
    if request.transport is not None:
        request.transport.abort()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--models", default="faulty", help="comma-separated model ids to announce")
    p.add_argument("--journal", help="append one JSON line per request received here")
    args = p.parse_args()
    faulty = Faulty([m for m in args.models.split(",") if m], args.journal)
    web.run_app(
        faulty.app(), host=args.host, port=args.port, print=None, access_log=None,
        shutdown_timeout=0.5,  # stalled handlers must not hold a test's teardown
    )  # fmt: skip


if __name__ == "__main__":
    main()
