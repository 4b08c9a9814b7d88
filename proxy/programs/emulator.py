"""An emulated OpenAI-compatible engine, for trying the proxy without a GPU.

A continuous-batching step loop like vLLM's: requests wait in a FCFS queue, are admitted while
``running < max_num_seqs`` and the KV cache has room, each step prefills newly admitted prompts
and decodes one token for every running sequence, and the step's duration comes from a timing
model with ``step_time(prefill_tokens, decode_seqs, context_tokens)``. ``FixedPace`` gives a
configurable TTFT and per-token pace; the estimator's calibrated ``StepModel`` plugs in the
same way, and its per-request API cost is emulated too: ``api_service_s`` in one FIFO stage
(one request at a time, like vLLM's single API process tokenising) and the rest of
``request_overhead_s`` in parallel, before the request joins the engine's queue (without
them the emulated engine answered 30 ms faster than the profile it emulates, and the
estimator's calibrator, which takes that cost from the profile, could not fit it). When
the KV cache overflows, the newest running sequence is preempted (recompute, as vLLM does).
A chained-block prefix cache reports cached prompt tokens.

Serves ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` (stream or not, usage
chunk with ``stream_options.include_usage``), ``/health`` and vLLM-named ``/metrics``.
Token counts are approximate (4 characters per token); output is ``tokN`` words.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import math
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CHARS_PER_TOKEN = 4
PREFIX_BLOCK_CHARS = 64


class TimingModel(Protocol):
    def step_time(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class FixedPace:
    """A step with prefill work takes ``ttft_s``; a decode-only step takes ``itl_s``."""

    ttft_s: float = 0.05
    itl_s: float = 0.01

    def step_time(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        return self.ttft_s if prefill_tokens else self.itl_s

    def describe(self) -> str:
        return f"fixed pace (prefill step {self.ttft_s:g} s, decode step {self.itl_s:g} s)"


@dataclass(frozen=True, slots=True, kw_only=True)
class EmulatorConfig:
    model: str = "emulated"
    max_num_seqs: int = 32
    kv_capacity_tokens: int = 262_144
    block_size: int = 16
    default_max_tokens: int = 64
    max_model_len: int = 8192
    prefix_cache_blocks: int = 16_384
    time_scale: float = 1.0  # >1 runs the engine faster than the model says (demos)
    expose_max_num_seqs: bool = True  # False: like vLLM, whose /metrics does not show it


class Seq:
    __slots__ = ("cached", "done", "generated", "max_tokens", "out", "prefilled", "prompt")

    def __init__(self, prompt: int, cached: int, max_tokens: int) -> None:
        self.prompt, self.cached, self.max_tokens = prompt, cached, max_tokens
        self.generated = 0
        self.prefilled = False
        self.done = False
        self.out: asyncio.Queue[int | None] = asyncio.Queue()

    def blocks(self, block_size: int) -> int:
        return math.ceil((self.prompt + self.generated + 1) / block_size)


class PrefixCache:
    """LRU of chained block hashes; returns how many prompt characters were already cached."""

    def __init__(self, capacity: int) -> None:
        self._lru: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._capacity = capacity

    def match_and_insert(self, text: str) -> int:
        h = hashlib.blake2b(digest_size=8)
        matched, still = 0, True
        for start in range(0, len(text) - PREFIX_BLOCK_CHARS + 1, PREFIX_BLOCK_CHARS):
            h.update(text[start : start + PREFIX_BLOCK_CHARS].encode())
            key = h.digest()
            if still and key in self._lru:
                matched += PREFIX_BLOCK_CHARS
                self._lru.move_to_end(key)
                continue
            still = False
            self._lru[key] = None
            if len(self._lru) > self._capacity:
                self._lru.popitem(last=False)
        return matched


class Engine:
    def __init__(self, cfg: EmulatorConfig, timing: TimingModel) -> None:
        self.cfg, self.timing = cfg, timing
        self.waiting: collections.deque[Seq] = collections.deque()
        self.running: list[Seq] = []
        self.prefix = PrefixCache(cfg.prefix_cache_blocks)
        self._wake = asyncio.Event()
        self.counters = collections.Counter[str]()
        self.ttfts: list[float] = []
        self.peak = 0  # most requests it ever held at once (running + waiting)
        scale = cfg.time_scale
        overhead = float(getattr(timing, "request_overhead_s", 0.0)) / scale
        self.api_service_s = min(float(getattr(timing, "api_service_s", 0.0)) / scale, overhead)
        self.api_parallel_s = overhead - self.api_service_s
        self._api = asyncio.Lock()  # FIFO: the API server's serial stage

    async def front(self) -> None:
        """The API server's per-request cost before the engine sees the request."""
        if self.api_service_s > 0.0:
            async with self._api:
                await asyncio.sleep(self.api_service_s)
        if self.api_parallel_s > 0.0:
            await asyncio.sleep(self.api_parallel_s)

    @property
    def total_blocks(self) -> int:
        return self.cfg.kv_capacity_tokens // self.cfg.block_size

    def used_blocks(self) -> int:
        return sum(s.blocks(self.cfg.block_size) for s in self.running)

    def submit(self, prompt_text: str, prompt_tokens: int, max_tokens: int) -> Seq:
        cached = min(
            prompt_tokens - 1, self.prefix.match_and_insert(prompt_text) // CHARS_PER_TOKEN
        )
        seq = Seq(prompt_tokens, max(cached, 0), max_tokens)
        self.counters["prefix_queries"] += prompt_tokens
        self.counters["prefix_hits"] += seq.cached
        self.waiting.append(seq)
        self.peak = max(self.peak, len(self.running) + len(self.waiting))
        self._wake.set()
        return seq

    def cancel(self, seq: Seq) -> None:
        seq.done = True
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _admit(self) -> None:
        free = self.total_blocks - self.used_blocks()
        while self.waiting and len(self.running) < self.cfg.max_num_seqs:
            need = self.waiting[0].blocks(self.cfg.block_size)
            if need > free:
                break
            free -= need
            self.running.append(self.waiting.popleft())

    def _preempt_if_full(self) -> None:
        while self.used_blocks() > self.total_blocks and len(self.running) > 1:
            victim = self.running.pop()  # newest first, like vLLM
            victim.prefilled = False  # recompute: prompt and generated tokens prefilled again
            victim.cached = 0
            self.waiting.appendleft(victim)
            self.counters["preemptions"] += 1

    async def run(self) -> None:
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
            self._admit()
            if not self.running:  # the head of the queue does not fit yet
                await asyncio.sleep(0.001)
                continue
            prefill = sum(
                s.prompt + s.generated - s.cached for s in self.running if not s.prefilled
            )
            decode = [s for s in self.running if s.prefilled]
            ctx = sum(s.prompt + s.generated for s in decode)
            dt = self.timing.step_time(prefill, len(decode), ctx) / self.cfg.time_scale
            await asyncio.sleep(dt)
            self._emit(prefill)
            self._preempt_if_full()

    def _emit(self, prefill: int) -> None:
        self.counters["prompt_tokens"] += prefill
        for s in list(self.running):
            if s.done:
                continue
            s.prefilled = True
            s.generated += 1
            self.counters["generation_tokens"] += 1
            s.out.put_nowait(s.generated)
            if s.generated >= s.max_tokens:
                s.done = True
                s.out.put_nowait(None)
                self.running.remove(s)
                self.counters["requests"] += 1


class EngineCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.e = engine

    def collect(self) -> Iterable[Any]:
        e, labels = self.e, ["model_name", "engine"]
        values = [e.cfg.model, "0"]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, v)
            return g

        def counter(name: str, doc: str, key: str) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, float(e.counters[key]))
            return c

        yield gauge("vllm:num_requests_running", "Running sequences.", len(e.running))
        yield gauge("vllm:num_requests_waiting", "Waiting sequences.", len(e.waiting))
        yield gauge(
            "vllm:kv_cache_usage_perc", "KV usage 0..1.", e.used_blocks() / max(1, e.total_blocks)
        )
        yield counter("vllm:prompt_tokens", "Prefilled prompt tokens.", "prompt_tokens")
        yield counter("vllm:generation_tokens", "Generated tokens.", "generation_tokens")
        yield counter("vllm:prefix_cache_queries", "Prefix cache queried tokens.", "prefix_queries")
        yield counter("vllm:prefix_cache_hits", "Prefix cache hit tokens.", "prefix_hits")
        yield counter("vllm:num_preemptions", "Preemptions.", "preemptions")
        yield counter("vllm:request_success", "Finished requests.", "requests")
        yield gauge("emulator:peak_requests", "Most requests held at once.", e.peak)
        names = ["block_size", "num_gpu_blocks"]
        shown = [str(e.cfg.block_size), str(e.total_blocks)]
        if e.cfg.expose_max_num_seqs:
            names.append("max_num_seqs")
            shown.append(str(e.cfg.max_num_seqs))
        info = GaugeMetricFamily("vllm:cache_config_info", "Cache config.", labels=names)
        info.add_metric(shown, 1.0)
        yield info


def _prompt_text(body: dict[str, Any], chat: bool) -> str:
    if chat:
        parts = []
        for m in body.get("messages") or ():
            c = m.get("content") if isinstance(m, dict) else None
            parts.append(f"{m.get('role', '')}:{c if isinstance(c, str) else ''}\n")
        return "".join(parts)
    p = body.get("prompt", "")
    return p if isinstance(p, str) else orjson.dumps(p).decode()


def _error(status: int, message: str) -> web.Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    }
    return web.json_response(body, status=status)


class EmulatorServer:
    def __init__(self, cfg: EmulatorConfig, timing: TimingModel) -> None:
        self.cfg = cfg
        self.timing_name = getattr(timing, "describe", lambda: type(timing).__name__)()
        self.engine = Engine(cfg, timing)
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(self.engine))
        self._ids = itertools.count()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.cleanup_ctx.append(self._lifetime)
        return app

    async def _lifetime(self, app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(self.engine.run())
        yield
        task.cancel()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {
                "id": self.cfg.model,
                "object": "model",
                "created": 0,
                "owned_by": "emulator",
                "max_model_len": self.cfg.max_model_len,
            }
        ]
        return web.json_response({"object": "list", "data": data})

    def describe(self) -> str:
        """One line saying what is emulated, for the start-up log."""
        c = self.cfg
        return (
            f"model id '{c.model}', max_num_seqs {c.max_num_seqs}, KV cache "
            f"{c.kv_capacity_tokens} tokens, max_model_len {c.max_model_len}, "
            f"default max_tokens {c.default_max_tokens}, timing {self.timing_name}"
        )

    async def metrics(self, request: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(self.registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        """A deterministic 8-dimensional embedding per input (no engine time)."""
        body = orjson.loads(await request.read())
        inputs = body.get("input", "")
        texts = [inputs] if isinstance(inputs, str) else [str(x) for x in inputs]
        data = [
            {"object": "embedding", "index": i,
             "embedding": [b / 255 for b in hashlib.blake2b(t.encode(), digest_size=8).digest()]}
            for i, t in enumerate(texts)
        ]  # fmt: skip
        tokens = sum(max(1, len(t) // CHARS_PER_TOKEN) for t in texts)
        usage: dict[str, int] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return web.json_response(
            {"object": "list", "data": data, "model": self.cfg.model, "usage": usage}
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "invalid JSON")
        if not isinstance(body, dict) or body.get("model") != self.cfg.model:
            model = body.get("model") if isinstance(body, dict) else None
            return _error(404, f"The model `{model}` does not exist.")
        text = _prompt_text(body, chat)
        prompt = max(1, len(text) // CHARS_PER_TOKEN)
        max_tokens = (
            body.get("max_completion_tokens")
            or body.get("max_tokens")
            or self.cfg.default_max_tokens
        )
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return _error(400, "max_tokens must be a positive integer")
        if prompt + max_tokens > self.cfg.max_model_len:
            return _error(
                400, f"This model's maximum context length is {self.cfg.max_model_len} tokens."
            )
        await self.engine.front()
        seq = self.engine.submit(text, prompt, max_tokens)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-emu{next(self._ids)}"
        try:
            if body.get("stream"):
                return await self._stream(request, body, seq, rid, chat)
            return await self._whole(body, seq, rid, chat)
        finally:
            self.engine.cancel(seq)

    def _usage(self, seq: Seq) -> dict[str, Any]:
        return {
            "prompt_tokens": seq.prompt,
            "completion_tokens": seq.generated,
            "total_tokens": seq.prompt + seq.generated,
            "prompt_tokens_details": {"cached_tokens": seq.cached},
        }

    async def _whole(self, body: dict[str, Any], seq: Seq, rid: str, chat: bool) -> web.Response:
        while await seq.out.get() is not None:
            pass
        text = "".join(f"tok{i} " for i in range(1, seq.generated + 1))
        finish = "length"
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            if chat
            else {"index": 0, "text": text, "finish_reason": finish}
        )
        obj = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.cfg.model,
            "choices": [choice],
            "usage": self._usage(seq),
        }
        return web.Response(body=orjson.dumps(obj), content_type="application/json")

    async def _stream(
        self, request: web.Request, body: dict[str, Any], seq: Seq, rid: str, chat: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.cfg.model,
        }
        if chat:
            first = {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
            }
            await resp.write(b"data: " + orjson.dumps(first) + b"\n\n")
        while (i := await seq.out.get()) is not None:
            last = i >= seq.max_tokens
            piece = f"tok{i} "
            choice = (
                {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            )
            choice["finish_reason"] = "length" if last else None
            await resp.write(b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n")
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            usage: dict[str, Any] = {**base, "choices": [], "usage": self._usage(seq)}
            await resp.write(b"data: " + orjson.dumps(usage) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
