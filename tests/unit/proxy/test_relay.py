"""The streaming relay against an in-process upstream that fragments its SSE bytes in awkward
ways (events split mid-way, many events per write): the client must get the same events,
minus only the usage chunk the proxy asked for, and the record must count exactly."""

from __future__ import annotations

import asyncio
import gzip
import json

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from estimator.records import RequestRecord
from proxy.app import Deps, build_app
from proxy.config import load_config
from proxy.programs.demo import start_site


def chunk(i: int) -> bytes:
    obj = {"id": "c", "object": "chat.completion.chunk", "model": "m",
           "choices": [{"index": 0, "delta": {"content": f"t{i}"}, "finish_reason": None}]}  # fmt: skip
    return b"data: " + orjson.dumps(obj) + b"\n\n"


ROLE = b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
FINISH = b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":20,"total_tokens":31,"prompt_tokens_details":{"cached_tokens":4}}}\n\n'
DONE = b"data: [DONE]\n\n"


def stream_bytes(with_usage: bool) -> bytes:
    return (
        ROLE
        + b"".join(chunk(i) for i in range(20))
        + FINISH
        + (USAGE if with_usage else b"")
        + DONE
    )


def fragments(data: bytes, sizes: list[int]) -> list[bytes]:
    out, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        out.append(data[i : i + n])
        i, k = i + n, k + 1
    return out


def spaced(data: bytes) -> bytes:
    """The same events as Python's json.dumps writes them (spaces after ':' and ',')."""
    out = []
    for ev in data.split(b"\n\n")[:-1]:
        payload = ev[len(b"data: ") :]
        out.append(b"data: " + (payload if payload == b"[DONE]" else
                                json.dumps(orjson.loads(payload)).encode()))  # fmt: skip
    return b"".join(e + b"\n\n" for e in out)


VARIANTS = {
    "plain": lambda b: b,
    "spaced-json": spaced,
    "crlf": lambda b: b.replace(b"\n\n", b"\r\n\r\n"),
}


def upstream_app(
    sizes: list[int], honour_usage: bool = True, variant: str = "plain", gzip_it: bool = False
) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        with_usage = honour_usage and bool((body.get("stream_options") or {}).get("include_usage"))
        headers = {"Content-Type": "text/event-stream"}
        data = VARIANTS[variant](stream_bytes(with_usage))
        if gzip_it:
            headers["Content-Encoding"] = "gzip"
            data = gzip.compress(data)
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        for piece in fragments(data, sizes):
            await resp.write(piece)
            await asyncio.sleep(0.001)
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app


async def run(
    sizes: list[int], client_usage: bool, honour_usage: bool = True, **variant: object
) -> tuple[bytes, RequestRecord]:
    up_runner, up_url = await start_site(upstream_app(sizes, honour_usage, **variant))  # type: ignore[arg-type]
    records: list[RequestRecord] = []
    cfg = load_config(environ={}, overrides={"backends": [{"url": up_url}],
                                             "health": {"scrape_interval_s": 0}})  # fmt: skip
    deps = Deps(registry=CollectorRegistry(), subscribers=[("t", records.append)])
    runner, url = await start_site(build_app(cfg, deps))
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "stream": True}
    if client_usage:
        body["stream_options"] = {"include_usage": True}
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(url + "/v1/chat/completions", json=body) as r,
        ):
            assert r.status == 200
            got = await r.read()
    finally:
        await runner.cleanup()
        await up_runner.cleanup()
    return got, records[0]


SIZES = {"whole-events": [10_000], "tiny": [7], "odd": [1, 50, 333, 2], "split-separator": [161, 1]}


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
async def test_usage_stripped_when_client_did_not_ask(sizes: list[int]) -> None:
    got, rec = await run(sizes, client_usage=False)
    assert got == stream_bytes(with_usage=False)
    assert (rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens) == (11, 20, 4)
    assert rec.finish_reason == "stop" and not rec.tokens_estimated
    assert rec.itl.count == 20  # 20 content events after the first; the finish chunk counts too
    assert rec.ttft_s is not None and rec.e2e_s is not None and rec.ttft_s <= rec.e2e_s


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
async def test_usage_passed_through_when_client_asked(sizes: list[int]) -> None:
    got, rec = await run(sizes, client_usage=True)
    assert got == stream_bytes(with_usage=True)
    assert rec.completion_tokens == 20


@pytest.mark.parametrize("variant", ["spaced-json", "crlf"])
@pytest.mark.parametrize("sizes", [[10_000], [7]], ids=["whole", "tiny"])
async def test_events_are_recognised_whatever_their_spelling(
    variant: str, sizes: list[int]
) -> None:
    """JSON with spaces (Python's json.dumps, some gateways) and CRLF event separators: the
    injected usage chunk still never reaches a client that did not ask, and is still read."""
    got, rec = await run(sizes, client_usage=False, variant=variant)
    assert got == VARIANTS[variant](stream_bytes(with_usage=False))
    assert (rec.prompt_tokens, rec.completion_tokens) == (11, 20) and not rec.tokens_estimated
    assert rec.finish_reason == "stop" and rec.itl.count == 20


async def test_gzip_stream_from_a_backend_that_ignores_identity_is_decoded() -> None:
    got, rec = await run([50, 3, 400], client_usage=False, gzip_it=True)
    assert got == stream_bytes(with_usage=False)
    assert rec.completion_tokens == 20 and rec.outcome.value == "ok"


async def test_backend_ignoring_include_usage_falls_back_to_counting() -> None:
    got, rec = await run([10_000], client_usage=False, honour_usage=False)
    assert got == stream_bytes(with_usage=False)
    assert rec.tokens_estimated is True
    assert rec.completion_tokens == 21  # 20 content chunks + the finish chunk, counted
    assert rec.prompt_tokens == 10  # 40 characters / 4


async def _closing_backend() -> tuple[asyncio.Server, str]:
    """A raw HTTP/1.1 backend that keeps connections alive but, like a server whose idle
    timeout fires just as the proxy reuses a pooled connection, closes any connection on its
    second POST without answering."""

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        posts = 0
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                lines = head.decode().split("\r\n")
                length = next(
                    (int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length")),
                    0,
                )
                await reader.readexactly(length)
                if lines[0].startswith("POST"):
                    posts += 1
                    if posts > 1:
                        break
                    body = b'{"id":"c","object":"text_completion","model":"m","choices":[{"index":0,"text":"ok","finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
                elif "/v1/models" in lines[0]:
                    body = b'{"data":[{"id":"m"}]}'
                else:
                    body = b"ok"
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def test_stale_pooled_connections_are_retried_on_a_fresh_one() -> None:
    """Several pooled connections going stale together (a burst after an idle spell) must not
    fail requests: the retry takes a new connection, never another pooled one."""
    server, up_url = await _closing_backend()
    registry = CollectorRegistry()
    cfg = load_config(environ={}, overrides={"backends": [{"url": up_url}],
                                             "health": {"scrape_interval_s": 0}})  # fmt: skip
    runner, url = await start_site(build_app(cfg, Deps(registry=registry)))
    body = {"model": "m", "prompt": "x", "max_tokens": 1}
    try:
        async with aiohttp.ClientSession() as s:

            async def one() -> int:
                async with s.post(url + "/v1/completions", json=body) as r:
                    await r.read()
                    return r.status

            assert await asyncio.gather(*(one() for _ in range(6))) == [200] * 6
            for _ in range(4):  # every pooled connection has now served a POST: all stale
                assert await one() == 200
    finally:
        await runner.cleanup()
        server.close()
        await server.wait_closed()
    stale = registry.get_sample_value(
        "rightsizer_upstream_retries_total",
        {"backend": up_url.split("//")[1], "reason": "stale_connection"},
    )
    assert stale is not None and stale >= 4


def _endless_app(size: int) -> web.Application:
    """A backend whose stream never sends an event separator."""

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(ROLE)
        await resp.write(b"data: ")
        for _ in range(size // 65536):
            await resp.write(b"x" * 65536)
        return resp

    app = upstream_app([10_000])
    app.router.add_post("/v1/completions", chat)
    return app


async def test_an_unterminated_event_is_capped_and_the_stream_ends_with_an_error() -> None:
    up_runner, up_url = await start_site(_endless_app(8 * 1024 * 1024))
    records: list[RequestRecord] = []
    cfg = load_config(environ={}, overrides={"backends": [{"url": up_url}],
                                             "health": {"scrape_interval_s": 0},
                                             "relay": {"max_event_bytes": 1024 * 1024}})  # fmt: skip
    runner, url = await start_site(build_app(cfg, Deps(subscribers=[("t", records.append)])))
    body = {"model": "m", "prompt": "hi", "stream": True}
    try:
        async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", json=body) as r:
            got = await r.read()
    finally:
        await runner.cleanup()
        await up_runner.cleanup()
    last = got.rstrip().rsplit(b"\n\n", 1)[-1]
    err = orjson.loads(last[len(b"data: ") :])["error"]
    assert "relay.max_event_bytes" in err["message"] and len(got) < 64 * 1024
    assert records[0].outcome.value == "upstream_error"


async def test_gzip_json_answer_is_decoded_and_counted() -> None:
    answer = {"id": "c", "object": "chat.completion", "choices": [{"index": 0, "finish_reason":
              "stop", "message": {"role": "assistant", "content": "hi"}}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}  # fmt: skip

    async def chat(request: web.Request) -> web.Response:
        assert request.headers["Accept-Encoding"] == "identity"
        return web.Response(body=gzip.compress(orjson.dumps(answer)), headers={
            "Content-Type": "application/json", "Content-Encoding": "gzip"})  # fmt: skip

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    up_runner, up_url = await start_site(app)
    records: list[RequestRecord] = []
    cfg = load_config(environ={}, overrides={"backends": [{"url": up_url}],
                                             "health": {"scrape_interval_s": 0}})  # fmt: skip
    runner, url = await start_site(build_app(cfg, Deps(subscribers=[("t", records.append)])))
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    try:
        async with (
            aiohttp.ClientSession(auto_decompress=False) as s,
            s.post(url + "/v1/chat/completions", json=body) as r,
        ):
            assert "Content-Encoding" not in r.headers
            assert orjson.loads(await r.read()) == answer
    finally:
        await runner.cleanup()
        await up_runner.cleanup()
    assert (records[0].prompt_tokens, records[0].completion_tokens) == (3, 1)
