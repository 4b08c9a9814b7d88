"""Shared helpers for the scheduling/routing benchmarks (routing_quality, overload,
shared_state_overhead): process lifetimes, a streaming client that measures TTFT and keeps
shed headers, a /metrics sampler, percentiles, plain-text tables, PASS/FAIL lines and JSON.

Processes come from ``tests/integration/procs.py`` (proxy, emulator) and
``tests/integration/real_backends.py`` (vLLM CPU); everything is registered on a
``contextlib.ExitStack`` that :func:`run_main` closes on success, on errors and on
Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT),):
    if _p not in sys.path:
        sys.path.insert(0, _p)


# --- process lifetimes -------------------------------------------------------------------


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_main(body: Callable[[contextlib.ExitStack, argparse.Namespace], int], args: Any) -> int:
    """Run ``body(stack, args)``; whatever it registered on ``stack`` is stopped afterwards,
    also on errors, Ctrl-C and SIGTERM."""
    signal.signal(signal.SIGTERM, _sigterm)
    with contextlib.ExitStack() as stack:
        try:
            return body(stack, args)
        except KeyboardInterrupt:
            print("interrupted: stopping everything started", file=sys.stderr)
            return 130


def http_post(url: str, timeout: float = 10.0) -> int:
    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return int(r.status)


def scrape(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=timeout) as r:
        return r.read().decode()


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample named ``name`` (labels, value) in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out.append((dict(s.labels), float(s.value)))
    return out


def by_label(text: str, name: str, label: str) -> dict[str, float]:
    """Sum of ``name`` samples grouped by one label's value."""
    out: dict[str, float] = {}
    for labels, v in samples(text, name):
        key = labels.get(label, "")
        out[key] = out.get(key, 0.0) + v
    return out


# --- the client ----------------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    """One request as the client saw it."""

    status: int = 0
    ttft: float | None = None  # send -> first content-bearing event
    e2e: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    retry_after: str | None = None
    shed_reason: str | None = None
    error: str | None = None  # transport error, or an SSE error event after 200
    tags: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.ttft is not None

    @property
    def shed(self) -> bool:
        return self.status in (429, 503)


_CONTENT_MARKS = (b'"content":"', b'"text":"')


def _has_content(event: bytes) -> bool:
    for mark in _CONTENT_MARKS:
        i = event.find(mark)
        if i >= 0 and event[i + len(mark) : i + len(mark) + 1] != b'"':
            return True
    return False


async def stream_chat(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    timeout_s: float = 120.0,
) -> Result:
    """POST a streamed chat completion; TTFT is the time to the first event that carries
    content. Usage (prompt / completion tokens) comes from the final usage chunk."""
    res = Result()
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(
                url + "/v1/chat/completions", data=orjson.dumps(body), headers=headers
            ) as r:
                res.status = r.status
                res.retry_after = r.headers.get("Retry-After")
                res.shed_reason = r.headers.get("x-rightsizer-shed-reason")
                if r.status != 200:
                    res.error = (await r.read())[:300].decode(errors="replace")
                    res.e2e = time.perf_counter() - t0
                    return res
                buf = b""
                async for chunk in r.content.iter_any():
                    buf += chunk
                    *events, buf = buf.split(b"\n\n")
                    for ev in events:
                        if res.ttft is None and _has_content(ev):
                            res.ttft = time.perf_counter() - t0
                        if b'"usage":{' in ev:
                            with contextlib.suppress(ValueError, IndexError, KeyError, TypeError):
                                data = orjson.loads(ev.split(b"data:", 1)[1])
                                if data.get("usage"):
                                    res.completion_tokens = data["usage"]["completion_tokens"]
                                    res.prompt_tokens = data["usage"]["prompt_tokens"]
                        if ev.startswith(b"event: error") or b'"error":{' in ev:
                            res.error = "sse error: " + ev[:200].decode(errors="replace")
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        res.error = f"{type(e).__name__}: {e}"
    res.e2e = time.perf_counter() - t0
    return res


def client_session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None),
    )


class Sampler:
    """Samples a proxy's /metrics every ``interval_s`` while running: the time average of
    ``rightsizer_backend_inflight_requests`` per backend (and of the proxy queue depth)."""

    def __init__(self, url: str, interval_s: float = 0.25) -> None:
        self.url, self.interval_s = url, interval_s
        self.inflight: dict[str, list[float]] = {}
        self.queue: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self, session: aiohttp.ClientSession) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with session.get(self.url + "/metrics") as r:
                    text = await r.text()
                for b, v in by_label(
                    text, "rightsizer_backend_inflight_requests", "backend"
                ).items():
                    self.inflight.setdefault(b, []).append(v)
                self.queue.append(sum(v for _, v in samples(text, "rightsizer_queue_depth")))
            await asyncio.sleep(self.interval_s)

    def start(self, session: aiohttp.ClientSession) -> None:
        self._task = asyncio.create_task(self._run(session))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def mean_inflight(self) -> dict[str, float]:
        return {b: sum(v) / len(v) for b, v in self.inflight.items() if v}


# --- statistics and output -------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def ratio(values: Sequence[float]) -> float:
    """max / min (inf when the min is 0 and the max is not)."""
    if not values:
        return math.nan
    lo, hi = min(values), max(values)
    if lo <= 0:
        return math.inf if hi > 0 else 1.0
    return hi / lo


def fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[fmt(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def report_checks(checks: Sequence[Check]) -> None:
    for c in checks:
        print(f"{'PASS' if c.ok else 'FAIL'}  {c.name}: {c.detail}")


def write_json(path: str | None, payload: dict[str, Any], checks: Sequence[Check]) -> None:
    if not path:
        return
    payload = {
        **payload,
        "checks": [asdict(c) for c in checks],
        "host": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(path).write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="short run for development")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
