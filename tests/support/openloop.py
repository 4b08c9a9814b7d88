"""Open-loop traffic for tests against real engines: Poisson arrivals at a set rate, each
request timed by the client (TTFT to the first generated token, every per-token gap), and the
SLO crossing of a rate ramp (the rate where ``max(p95 TTFT / target, p95 ITL / target)``
first exceeds 1, interpolated on the isotonic fit of the steps, as bench/estimator_accuracy.py
measures it).

Requests are ``/v1/completions`` with prompts of random token ids (no shared prefix) and exact
output lengths (``ignore_eos``), or ``/v1/chat/completions`` with text (any engine). The client
asks for ``continuous_usage_stats`` where the engine has it (vLLM), so a read that brings k
tokens after a gap g counts k gaps of g/k; elsewhere a chunk counts as one token.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import orjson

VOCAB, FIRST_ID = 4096, 3  # the tiny models' vocabulary; ids 0-2: unk, bos, eos
WARMUP_FRACTION = 0.1


@dataclass
class Sent:
    """One request as the client saw it (perf_counter seconds)."""

    arrival: float
    headers: Mapping[str, str] = field(default_factory=dict)
    status: int | None = None
    error: str | None = None
    first: float | None = None
    end: float | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    request_id: str | None = None
    gap_t: list[float] = field(default_factory=list)
    gap_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.first is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.arrival


def token_requests(
    n: int, rng: np.random.Generator, *, prompt: tuple[int, int], output: tuple[int, int]
) -> list[dict[str, Any]]:
    """Completion bodies: random token-id prompts, exact output lengths (uniform ranges)."""
    lens = rng.integers(prompt[0], prompt[1] + 1, n)
    outs = rng.integers(output[0], output[1] + 1, n)
    return [
        {"prompt": rng.integers(FIRST_ID, VOCAB, int(p)).tolist(), "max_tokens": int(o),
         "min_tokens": int(o), "ignore_eos": True, "temperature": 1.0}
        for p, o in zip(lens, outs, strict=True)
    ]  # fmt: skip


def chat_requests(n: int, rng: np.random.Generator, *, words: tuple[int, int],
                  output: tuple[int, int]) -> list[dict[str, Any]]:  # fmt: skip
    """Chat bodies any engine takes: text prompts of random words, exact output lengths."""
    vocab = ("queue", "token", "batch", "cache", "prefix", "latency", "engine", "replica",
             "shadow", "canary", "budget", "signal", "metric", "window", "ramp")  # fmt: skip
    out = []
    for _ in range(n):
        k = int(rng.integers(words[0], words[1] + 1))
        text = " ".join(vocab[i] for i in rng.integers(0, len(vocab), k))
        o = int(rng.integers(output[0], output[1] + 1))
        out.append({"messages": [{"role": "user", "content": text}], "max_tokens": o,
                    "ignore_eos": True, "temperature": 1.0})  # fmt: skip
    return out


async def send(session: aiohttp.ClientSession, url: str, model: str, body: Mapping[str, Any],
               rec: Sent) -> None:  # fmt: skip
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    payload = {**body, "model": model, "stream": True,
               "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    last_tokens, last_t = 0, 0.0
    try:
        async with session.post(url + path, data=orjson.dumps(payload),
                                headers={"content-type": "application/json", **rec.headers}) as r:  # fmt: skip
            rec.status = r.status
            rec.request_id = r.headers.get("x-request-id")
            if r.status != 200:
                rec.error = (await r.read())[:300].decode(errors="replace")
                return
            buf = b""
            async for data in r.content.iter_any():
                now = time.perf_counter()
                buf += data
                *events, buf = buf.replace(b"\r\n", b"\n").split(b"\n\n")
                tokens = last_tokens
                for ev in events:
                    if not ev.startswith(b"data: {"):
                        continue
                    obj = orjson.loads(ev[6:])
                    if "error" in obj:
                        rec.error = str(obj["error"])[:300]
                        continue
                    usage = obj.get("usage")
                    if usage and obj.get("choices"):  # cumulative (continuous usage stats)
                        tokens = max(tokens, int(usage.get("completion_tokens") or 0))
                    elif usage:  # the final usage chunk
                        rec.completion_tokens = usage.get("completion_tokens")
                        rec.prompt_tokens = usage.get("prompt_tokens")
                    elif _generated(obj):  # no continuous usage: a chunk is a token
                        tokens += 1
                if tokens <= last_tokens:
                    continue
                if rec.first is None:
                    rec.first = now
                else:
                    k = tokens - last_tokens
                    rec.gap_t.extend([now] * k)
                    rec.gap_s.extend([(now - last_t) / k] * k)
                last_t, last_tokens = now, tokens
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    finally:
        rec.end = time.perf_counter()


def _generated(obj: Mapping[str, Any]) -> bool:
    """Does a chunk carry generated text (not the role-only first chunk of a chat stream)?"""
    for ch in obj.get("choices") or ():
        if "text" in ch or (ch.get("delta") or {}).get("content") is not None:
            return True
    return False


async def run_poisson(
    url: str,
    model: str,
    bodies: Sequence[Mapping[str, Any]],
    rate: float | Sequence[float],
    rng: np.random.Generator,
    headers: Sequence[Mapping[str, str]] | Mapping[str, str] | None = None,
) -> list[Sent]:
    """Open loop: request i is sent at the i-th arrival whatever is in flight. ``rate`` is one
    value or one per request (a run of equal rates is one step); within a step the gaps are
    exponential, rescaled so that their mean is exactly ``1 / rate``."""
    n = len(bodies)
    rates = np.broadcast_to(np.asarray(rate, dtype=float), (n,))
    hdrs = [headers or {}] * n if not isinstance(headers, Sequence) else list(headers)
    gaps = rng.exponential(1.0, n)
    for lo, hi in runs(rates):
        gaps[lo:hi] *= (hi - lo) / gaps[lo:hi].sum() / rates[lo]
    gaps[0] = 0.0
    times = time.perf_counter() + 0.05 + np.cumsum(gaps)
    out = [Sent(arrival=float(t), headers=h) for t, h in zip(times, hdrs, strict=True)]
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:  # fmt: skip
        tasks = []
        for body, rec in zip(bodies, out, strict=True):
            delay = rec.arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            rec.arrival = time.perf_counter()
            tasks.append(asyncio.create_task(send(session, url, model, body, rec)))
        await asyncio.gather(*tasks)
    return out


def runs(values: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) index ranges of equal consecutive values."""
    out, lo = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[lo]:
            out.append((lo, i))
            lo = i
    return out


def quantile(x: Sequence[float] | np.ndarray, q: float) -> float:
    a = np.asarray(x, dtype=float)
    return float(np.quantile(a, q, method="inverted_cdf")) if a.size else math.nan


@dataclass(frozen=True, slots=True)
class Step:
    rate_rps: float
    n: int
    n_ok: int
    ttft_p95_s: float
    itl_p95_s: float
    slo_ratio: float


def summarise(sent: Sequence[Sent], lo: int, hi: int, rate: float, slo: tuple[float, float],
              window_end: float = math.inf) -> Step:  # fmt: skip
    """Requests ``sent[lo:hi]`` as one step: TTFT of all but the first 10% (a failed request
    counts as infinitely slow), the per-token gaps of every request that ended between the
    first counted arrival and ``window_end``."""
    step = sent[lo:hi]
    w0 = min(int(len(step) * WARMUP_FRACTION), len(step) - 1)
    ttft = [r.ttft if r.ok and r.ttft is not None else math.inf for r in step[w0:]]
    since = step[w0].arrival
    gaps = [g for r in sent if r.ok for t, g in zip(r.gap_t, r.gap_s, strict=True)
            if since <= t < window_end]  # fmt: skip
    t95, i95 = quantile(ttft, 0.95), quantile(gaps, 0.95)
    return Step(rate, len(step), sum(r.ok for r in step), t95, i95,
                max(t95 / slo[0], i95 / slo[1]))  # fmt: skip


def crossing(steps: Sequence[Step]) -> float | None:
    """Rate where the SLO ratio crosses 1 going up the ramp: linear between the last passing
    and the first failing step of the isotonic (non-decreasing) fit of the ratios; None when
    not bracketed."""
    ordered = sorted(steps, key=lambda s: s.rate_rps)
    iso = isotonic([min(s.slo_ratio, 1e6) for s in ordered], [float(s.n) for s in ordered])
    for i, st in enumerate(ordered):
        if iso[i] > 1.0:
            if i == 0:
                return None
            lo = ordered[i - 1]
            f = (1.0 - iso[i - 1]) / (iso[i] - iso[i - 1])
            return lo.rate_rps + f * (st.rate_rps - lo.rate_rps)
    return None


def isotonic(y: Sequence[float], w: Sequence[float]) -> list[float]:
    """Weighted least-squares non-decreasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for yi, wi in zip(y, w, strict=True):
        blocks.append([yi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return [m for m, _, c in blocks for _ in range(int(c))]
