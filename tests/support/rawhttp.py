"""A raw HTTP/1.1 client for adversarial tests: it sends exactly the bytes it is given (no
client library would send a malformed request, a bad Content-Length or non-UTF-8 header
bytes, or keep ``..`` in a path) and parses what comes back without trusting it: status line,
headers, a body framed by Content-Length, chunked encoding or the server's close, all under
one deadline. Nothing it receives is interpreted beyond that."""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Part = bytes | float  # bytes to send, or seconds to wait before the next part


@dataclass
class RawResponse:
    status: int | None = None
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)  # names lower-cased
    body: bytes = b""  # de-chunked, still content-encoded
    complete: bool = False  # the body's framing ended properly (or no body was due)
    closed: bool = False  # the server closed the connection
    timed_out: bool = False  # the deadline passed before the response ended
    elapsed_s: float = 0.0
    error: str | None = None  # a connection error seen by the client

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def decoded_body(self) -> bytes:
        """The body with its Content-Encoding (gzip/deflate) removed; as is when unknown or
        corrupt (the checks then see the bytes the client would have had to parse)."""
        enc = (self.header("content-encoding") or "").strip().lower()
        if enc in ("gzip", "x-gzip", "deflate"):
            try:
                d = zlib.decompressobj(wbits=47 if enc != "deflate" else 15)
                return d.decompress(self.body) + d.flush()
            except zlib.error:
                return self.body
        return self.body


class _Reader:
    def __init__(self, reader: asyncio.StreamReader, deadline: float) -> None:
        self.r, self.deadline, self.buf = reader, deadline, b""

    async def _more(self) -> bool:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        data = await asyncio.wait_for(self.r.read(65536), left)
        self.buf += data
        return bool(data)

    async def until(self, marker: bytes, limit: int = 1 << 20) -> bytes | None:
        while (i := self.buf.find(marker)) < 0:
            if len(self.buf) > limit or not await self._more():
                return None
        out, self.buf = self.buf[:i], self.buf[i + len(marker) :]
        return out

    async def exactly(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not await self._more():
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    async def to_close(self, cap: int) -> bytes:
        while len(self.buf) < cap and await self._more():
            pass
        out, self.buf = self.buf, b""
        return out


def _parse_head(head: bytes, resp: RawResponse) -> None:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    resp.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    resp.reason = parts[2] if len(parts) > 2 else ""
    resp.headers = [
        (k.strip().lower(), v.strip()) for k, sep, v in (ln.partition(":") for ln in lines) if sep
    ]


async def _read_body(rd: _Reader, resp: RawResponse, head_only: bool, cap: int) -> None:
    te = (resp.header("transfer-encoding") or "").lower()
    cl = resp.header("content-length")
    if head_only or resp.status in (204, 304) or (resp.status or 0) < 200:
        resp.complete = True
    elif "chunked" in te:
        chunks = []
        while True:
            size_line = await rd.until(b"\r\n")
            if size_line is None:
                break
            try:
                size = int(size_line.split(b";")[0].strip() or b"x", 16)
            except ValueError:
                break
            if size == 0:
                resp.complete = await rd.until(b"\r\n") is not None  # (no trailers expected)
                break
            data = await rd.exactly(size + 2)
            if data is None:
                chunks.append(rd.buf)
                break
            chunks.append(data[:-2])
            if sum(map(len, chunks)) > cap:
                break
        resp.body = b"".join(chunks)
    elif cl is not None and cl.isdigit():
        data = await rd.exactly(int(cl))
        resp.complete = data is not None
        resp.body = data if data is not None else rd.buf
    else:
        resp.body = await rd.to_close(cap)
        resp.complete = True
        resp.closed = True


async def exchange(
    port: int,
    parts: bytes | Sequence[Part],
    *,
    timeout_s: float = 10.0,
    head_only: bool = False,
    body_cap: int = 64 << 20,
    host: str = "127.0.0.1",
    read: bool = True,
) -> RawResponse:
    """Send ``parts`` (bytes, with optional pauses between them) and read one response
    (``read=False``: close right after sending, as a client that gives up). Interim 1xx
    responses (``100 Continue``) are skipped. Never raises for what the server does: a
    reset, a close or the deadline is reported in the result."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    resp = RawResponse()
    if isinstance(parts, bytes):
        parts = [parts]
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        rd = _Reader(reader, deadline)
        for part in parts:
            if isinstance(part, bytes):
                writer.write(part)
                await writer.drain()
            else:
                await asyncio.sleep(part)
        while read:
            head = await rd.until(b"\r\n\r\n", limit=1 << 20)
            if head is None:
                resp.closed = True
                break
            _parse_head(head, resp)
            if resp.status is not None and 100 <= resp.status < 200:
                continue
            await _read_body(rd, resp, head_only, body_cap)
            break
    except TimeoutError:
        resp.timed_out = True
    except (ConnectionError, OSError) as exc:
        resp.error = type(exc).__name__
        resp.closed = True
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
    resp.elapsed_s = time.monotonic() - t0
    return resp


def request_bytes(
    method: str | bytes,
    path: str | bytes,
    *,
    headers: Sequence[tuple[str | bytes, str | bytes]] = (),
    body: bytes | None = None,
    content_length: bool = True,
    version: bytes = b"HTTP/1.1",
) -> bytes:
    """A request as bytes; str parts are UTF-8 encoded, bytes parts are sent as they are."""

    def b(x: str | bytes) -> bytes:
        return x if isinstance(x, bytes) else x.encode("utf-8", "surrogateescape")

    lines = [b(method) + b" " + b(path) + b" " + version]
    names = set()
    for k, v in headers:
        lines.append(b(k) + b": " + b(v))
        names.add(b(k).lower())
    if b"host" not in names:
        lines.append(b"Host: 127.0.0.1")
    framed = b"content-length" in names or b"transfer-encoding" in names
    if body is not None and content_length and not framed:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def sse_events(body: bytes) -> list[bytes]:
    """The events of an SSE body (any of the spec's line ends), empty ones dropped."""
    norm = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return [e for e in norm.split(b"\n\n") if e.strip()]


async def read_until(
    port: int, raw: bytes, done: Callable[[bytes], bool], *, timeout_s: float = 10.0,
    host: str = "127.0.0.1",
) -> tuple[bytes, str]:  # fmt: skip
    """Send ``raw`` and read the raw reply until ``done(received)`` holds, then close at
    once, as a client that stops reading. Returns (received, why it ended: ``done``,
    ``closed`` by the server, ``timeout`` or the connection error's name)."""
    got = b""
    writer = None
    deadline = time.monotonic() + timeout_s
    why = "timeout"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        writer.write(raw)
        await writer.drain()
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
            except TimeoutError:
                break
            if not chunk:
                why = "closed"
                break
            got += chunk
            if done(got):
                why = "done"
                break
    except TimeoutError:
        why = "timeout"
    except (ConnectionError, OSError) as exc:
        why = type(exc).__name__
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
    return got, why
