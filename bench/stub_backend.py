"""A fast, vLLM-shaped OpenAI-compatible stub engine for the proxy-overhead benchmark.

Does as little per token as possible so that the proxy, not the stub, is what gets measured:
every chunk's bytes are built once per (endpoint, token count) and reused, and each token is
one ``write``. Streams look like vLLM's: a role chunk (``"content":""``) sent together with the
first token, one chunk per token, a finish chunk, the usage chunk when the request asks for
``stream_options.include_usage`` (``"choices":[]``), then ``data: [DONE]``.

Timing per request, first match wins:
- headers ``x-stub-ttft-ms``, ``x-stub-itl-ms``, ``x-stub-tokens``;
- body field ``stub_options: {"ttft_ms", "itl_ms", "tokens"}`` (travels through proxies that
  forward only a few headers; vLLM itself ignores unknown fields);
- tokens: the body's ``max_completion_tokens`` / ``max_tokens``;
- the flags ``--ttft-ms``, ``--itl-ms``, ``--tokens``.
With ITL 0 the stub still yields to the event loop between tokens, so that concurrent streams
interleave one token at a time, as an engine's decode steps do.

Endpoints: ``/v1/models``, ``/health``, ``/metrics`` (small static vLLM-style text),
``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed or not.

    python3 bench/stub_backend.py --port 8100 --ttft-ms 20 --itl-ms 20 --tokens 64 --core 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

CREATED = 1_700_000_000
TOKEN_TEXT = " tok"

METRICS_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="{m}"}} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="{m}"}} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="{m}"}} 0.0
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{engine="0",model_name="{m}"}} 0.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{{engine="0",model_name="{m}"}} 0.0
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{{engine="0",model_name="{m}"}} 0.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{{block_size="16",engine="0",num_gpu_blocks="65536"}} 1.0
"""


@dataclass(frozen=True, slots=True)
class Timing:
    ttft_s: float
    itl_s: float
    tokens: int


@dataclass(frozen=True, slots=True)
class Chunks:
    """The precomputed bytes of one stream shape."""

    head: bytes  # role chunk + first content chunk
    token: bytes  # one content chunk
    tail: bytes  # finish chunk
    usage: bytes  # usage chunk (only when include_usage)
    done: bytes
    body: bytes  # the whole non-streamed response


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _usage(prompt: int, tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "total_tokens": prompt + tokens, "completion_tokens": tokens}


def build_chunks(model: str, chat: bool, tokens: int, prompt: int) -> Chunks:
    kind = "chat.completion.chunk" if chat else "text_completion"
    base = {"id": "chatcmpl-stub" if chat else "cmpl-stub", "object": kind, "created": CREATED,
            "model": model}  # fmt: skip

    def choice(text: str, finish: str | None, role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {
                "content": text}  # fmt: skip
            c: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None}
        else:
            c = {"index": 0, "text": text, "logprobs": None}
        c["finish_reason"] = finish
        if finish is not None:
            c["stop_reason"] = None
        return c

    token = _sse({**base, "choices": [choice(TOKEN_TEXT, None)]})
    head = (_sse({**base, "choices": [choice("", None, role=True)]}) if chat else b"") + token
    tail = _sse({**base, "choices": [choice("", "length")]})
    usage = _sse({**base, "choices": [], "usage": _usage(prompt, tokens)})
    text = TOKEN_TEXT * tokens
    if chat:
        full_choice = {"index": 0, "message": {"role": "assistant", "content": text,
                       "tool_calls": []}, "logprobs": None, "finish_reason": "length",
                       "stop_reason": None}  # fmt: skip
        obj = "chat.completion"
    else:
        full_choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                       "stop_reason": None}  # fmt: skip
        obj = "text_completion"
    body = orjson.dumps({**base, "object": obj, "choices": [full_choice],
                         "usage": _usage(prompt, tokens), "prompt_logprobs": None})  # fmt: skip
    return Chunks(head, token, tail, usage, b"data: [DONE]\n\n", body)


class Stub:
    def __init__(self, model: str, default: Timing) -> None:
        self.model = model
        self.default = default
        self._cache: dict[tuple[bool, int, int], Chunks] = {}
        self.models_body = orjson.dumps({"object": "list", "data": [{
            "id": model, "object": "model", "created": CREATED, "owned_by": "vllm",
            "root": model, "parent": None, "max_model_len": 8192, "permission": []}]})  # fmt: skip
        self.metrics_body = METRICS_TEXT.format(m=model).encode()

    def chunks(self, chat: bool, tokens: int, prompt: int) -> Chunks:
        key = (chat, tokens, prompt)
        c = self._cache.get(key)
        if c is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            c = self._cache[key] = build_chunks(self.model, chat, tokens, prompt)
        return c

    def timing(self, request: web.Request, body: dict[str, Any]) -> Timing:
        d = self.default
        opts = body.get("stub_options")
        opts = opts if isinstance(opts, dict) else {}
        h = request.headers

        def pick(header: str, key: str, fallback: float) -> float:
            raw = h.get(header)
            if raw is not None:
                return float(raw)
            v = opts.get(key)
            return float(v) if isinstance(v, int | float) else fallback

        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or d.tokens
        tokens = int(pick("x-stub-tokens", "tokens", max_tokens))
        return Timing(
            pick("x-stub-ttft-ms", "ttft_ms", d.ttft_s * 1e3) / 1e3,
            pick("x-stub-itl-ms", "itl_ms", d.itl_s * 1e3) / 1e3,
            max(1, tokens),
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
            t = self.timing(request, body)
        except ValueError as exc:
            err = {"error": {"message": f"bad request: {exc}", "type": "BadRequestError",
                             "param": None, "code": 400}}  # fmt: skip
            return web.json_response(err, status=400)
        chat = request.path.endswith("/chat/completions")
        c = self.chunks(chat, t.tokens, max(1, len(raw) // 4))
        if not body.get("stream"):
            await asyncio.sleep(t.ttft_s + t.itl_s * (t.tokens - 1))
            return web.Response(body=c.body, content_type="application/json")
        opts = body.get("stream_options")
        usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        with contextlib.suppress(ConnectionError):  # the client went away: nothing to do
            await resp.prepare(request)
            await self._stream(resp, c, t, usage)
        return resp

    @staticmethod
    async def _stream(resp: web.StreamResponse, c: Chunks, t: Timing, usage: bool) -> None:
        start = time.perf_counter()
        sleep = asyncio.sleep
        if t.ttft_s > 0:
            await sleep(t.ttft_s)
        end = c.tail + (c.usage if usage else b"") + c.done
        if t.tokens == 1:
            await resp.write(c.head + end)
            return
        await resp.write(c.head)
        token, itl, due0 = c.token, t.itl_s, start + t.ttft_s
        for i in range(1, t.tokens - 1):
            if itl > 0:
                await sleep(max(0.0, due0 + i * itl - time.perf_counter()))
            else:
                await sleep(0)  # one token per stream per loop turn, like a decode step
            await resp.write(token)
        if itl > 0:
            await sleep(max(0.0, due0 + (t.tokens - 1) * itl - time.perf_counter()))
        else:
            await sleep(0)
        await resp.write(token + end)

    async def models(self, request: web.Request) -> web.Response:
        return web.Response(body=self.models_body, content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics_body, content_type="text/plain", charset="utf-8")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_post("/v1/completions", self.completions)
        return app


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--model", default="bench-model", help="model id it serves")
    p.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token (default 0)")
    p.add_argument("--itl-ms", type=float, default=0.0, help="inter-token latency (default 0)")
    p.add_argument("--tokens", type=int, default=16, help="output tokens when max_tokens unset")
    p.add_argument("--core", type=int, help="pin this process to one CPU core")
    args = p.parse_args(argv)
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    stub = Stub(args.model, Timing(args.ttft_ms / 1e3, args.itl_ms / 1e3, args.tokens))
    sock = socket.create_server((args.host, args.port), backlog=1024, reuse_port=False)
    web.run_app(
        stub.app(), sock=sock, print=None, access_log=None, handler_cancellation=True,
        shutdown_timeout=1.0, loop=_new_loop(),
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
