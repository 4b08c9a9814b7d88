"""Closed-loop load generator for the proxy-overhead benchmark; one JSON object on stdout.

N workers each keep one request in flight: send, read to the end, send the next. Worker starts
are spread evenly over ``--stagger`` seconds (default: one request's expected duration) so
arrivals are not synchronised. After ``--warmup`` seconds a measurement window of
``--duration`` seconds opens: counters (content chunks, finished requests), this process's
CPU and the CPU of the ``--cpu-pid`` processes (``/proc/<pid>/stat`` utime+stime) are read at
both ends of the window, and so is the time they waited for a CPU (schedstat run delay: on a
shared machine, how much other work got in the way). TTFT is kept for requests sent inside
the window: the time from sending the request to the read that brings its first
content-bearing data event (a chat ``delta.content`` or completions ``text`` that is not
empty); for non-streamed requests, the time to the whole response. After the window no new
requests start; in-flight ones get ``--tail`` seconds to deliver their first token, then
everything is cancelled.

Content events are counted per read with ``bytes.count`` on whole events (an incomplete trailing
event is carried to the next read), so the client's per-chunk cost stays small.

    python3 bench/loadgen.py --url http://127.0.0.1:8080 --concurrency 64 --tokens 64 \\
        --duration 3 --cpu-pid proxy=1234
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

_SEP = b"\n\n"
_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in seconds; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def proc_wait_s(pid: int) -> float | None:
    """Time the process's threads spent runnable but waiting for a CPU (schedstat run delay)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def percentiles(xs: list[float]) -> dict[str, float | int | None]:
    if not xs:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    s = sorted(xs)

    def q(p: float) -> float:  # linear interpolation, as numpy's default
        k = (len(s) - 1) * p
        lo = int(k)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {"n": len(s), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
            "mean": sum(s) / len(s), "max": s[-1]}  # fmt: skip


@dataclass
class State:
    chunks: int = 0  # content events received
    done: int = 0  # requests finished completely and correctly
    errors: int = 0
    short: int = 0  # streams that ended with fewer content events than asked for
    stop: bool = False
    window: tuple[float, float] | None = None  # (start, end) once known
    window_start: float = float("inf")
    ttft: list[float] = field(default_factory=list)
    sent_in_window: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.st = State()
        chat = args.endpoint == "chat"
        self.url = args.url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")
        body: dict[str, Any] = {"model": args.model, "max_tokens": args.tokens,
                                "stream": args.stream}  # fmt: skip
        prompt = "Benchmark prompt: say something about proxies. " * 2
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if args.stream and args.include_usage:
            body["stream_options"] = {"include_usage": True}
        stub = {"ttft_ms": args.ttft_ms, "itl_ms": args.itl_ms, "tokens": args.tokens}
        body["stub_options"] = {k: v for k, v in stub.items() if v is not None}
        self.body = orjson.dumps(body)
        self.headers = {"Content-Type": "application/json"}
        key = b'"content":"' if chat else b'"text":"'
        self.marker, self.empty = key, key + b'"'

    async def one(self, session: aiohttp.ClientSession) -> None:
        st, a = self.st, self.a
        t0 = time.perf_counter()
        in_window = t0 >= st.window_start
        if in_window:
            st.sent_in_window += 1
        async with session.post(self.url, data=self.body, headers=self.headers) as resp:
            if resp.status != 200:
                st.error(f"http {resp.status}: {(await resp.read())[:200]!r}")
                return
            if not a.stream:
                body = await resp.read()
                if in_window:
                    st.ttft.append(time.perf_counter() - t0)
                if b'"choices"' not in body:
                    st.error(f"bad body: {body[:200]!r}")
                    return
                st.chunks += 1
                st.done += 1
                return
            await self._read_stream(resp, t0, in_window)

    async def _read_stream(self, resp: aiohttp.ClientResponse, t0: float, in_window: bool) -> None:
        st, marker, empty = self.st, self.marker, self.empty
        reader = resp.content
        perf = time.perf_counter
        carry = b""
        got = 0
        last = b""
        while True:
            data = await reader.readany()
            if not data:
                break
            buf = carry + data if carry else data
            end = buf.rfind(_SEP)
            if end < 0:
                carry = buf
                continue
            end += 2
            block, carry = (buf, b"") if end == len(buf) else (buf[:end], buf[end:])
            n = block.count(marker) - block.count(empty)
            if n:
                if got == 0 and in_window:
                    st.ttft.append(perf() - t0)
                got += n
                st.chunks += n
            last = block
        if b"[DONE]" not in last[-20:] or b'"error"' in last:
            st.error(f"stream ended without [DONE]: {last[-200:]!r}")
        elif got < self.a.tokens:
            st.short += 1
        else:
            st.done += 1

    async def worker(self, session: aiohttp.ClientSession, delay: float) -> None:
        await asyncio.sleep(delay)
        st, limit = self.st, self.a.max_requests
        sent = 0
        while not st.stop and sent < limit:
            sent += 1
            try:
                await self.one(session)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                st.error(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.01)

    def snapshot(self, pids: dict[str, int]) -> dict[str, Any]:
        return {"t": time.perf_counter(), "chunks": self.st.chunks, "done": self.st.done,
                "cpu": {"loadgen": self_cpu_s(), **{k: proc_cpu_s(p) for k, p in pids.items()}},
                "wait": {"loadgen": proc_wait_s(os.getpid()),
                         **{k: proc_wait_s(p) for k, p in pids.items()}}}  # fmt: skip

    async def run(self) -> dict[str, Any]:
        a, st = self.a, self.st
        pids = dict(_parse_pid(x) for x in a.cpu_pid)
        stagger = a.stagger
        if stagger is None:
            stagger = max(0.1, ((a.ttft_ms or 0) + (a.itl_ms or 0) * a.tokens) / 1e3)
        warmup = max(a.warmup, stagger)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=a.timeout)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:
            n = a.concurrency
            tasks = [asyncio.create_task(self.worker(session, stagger * i / n)) for i in range(n)]
            await asyncio.sleep(warmup)
            st.window_start = time.perf_counter()
            s0 = self.snapshot(pids)
            st.window_start = s0["t"]
            await asyncio.sleep(a.duration)
            s1 = self.snapshot(pids)
            st.stop = True
            window_end = s1["t"]
            missing = await self._tail(window_end)
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        span = s1["t"] - s0["t"]
        chunks, done = s1["chunks"] - s0["chunks"], s1["done"] - s0["done"]
        cpu, wait = (
            {k: (None if s0[key][k] is None or v is None else v - s0[key][k])
             for k, v in s1[key].items()}
            for key in ("cpu", "wait")
        )  # fmt: skip
        return {
            "url": self.url, "stream": a.stream, "concurrency": a.concurrency,
            "tokens": a.tokens, "window_s": span, "warmup_s": warmup,
            "chunks": chunks, "chunks_per_s": chunks / span, "requests": done,
            "requests_per_s": done / span, "errors": st.errors, "short_streams": st.short,
            "error_samples": st.error_samples, "ttft_s": percentiles(st.ttft),
            "sent_in_window": st.sent_in_window, "ttft_missing": missing, "cpu_s": cpu,
            "cpu_wait_s": wait,
        }  # fmt: skip

    async def _tail(self, window_end: float) -> int:
        """Give requests sent in the window up to ``--tail`` s to get their first token."""
        st = self.st
        deadline = window_end + self.a.tail
        while time.perf_counter() < deadline:
            if len(st.ttft) >= st.sent_in_window:
                break
            await asyncio.sleep(0.01)
        return st.sent_in_window - len(st.ttft)


def _parse_pid(raw: str) -> tuple[str, int]:
    name, _, pid = raw.rpartition("=")
    return (name or f"pid{pid}"), int(pid)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", required=True, help="base URL (the stub or the proxy)")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--model", default="bench-model")
    p.add_argument("--concurrency", type=int, default=64, help="requests kept in flight")
    p.add_argument("--tokens", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="non-streamed")
    p.add_argument("--include-usage", action="store_true", help="ask for the usage chunk")
    p.add_argument("--ttft-ms", type=float, help="stub TTFT (sent as body stub_options)")
    p.add_argument("--itl-ms", type=float, help="stub ITL (sent as body stub_options)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before the window")
    p.add_argument("--duration", type=float, default=3.0, help="measurement window, seconds")
    p.add_argument("--tail", type=float, default=0.5, help="seconds for late first tokens")
    p.add_argument("--stagger", type=float, help="spread worker starts over this many seconds")
    p.add_argument("--max-requests", type=int, default=100_000, help="per worker, a bound")
    p.add_argument("--timeout", type=float, default=30.0, help="socket read timeout, seconds")
    p.add_argument("--cpu-pid", action="append", default=[], metavar="NAME=PID",
                   help="also measure this process's CPU over the window (repeatable)")  # fmt: skip
    p.add_argument("--core", type=int, help="pin this process to one CPU core")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        result = asyncio.run(Load(args).run())
    else:
        result = uvloop.run(Load(args).run())
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
