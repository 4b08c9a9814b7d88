"""``rightsizer demo``: the self-contained main job. Starts two emulated engines and the proxy
on loopback ports, sends a short mixed traffic ramp through the proxy (streamed and not, chat
and completions, several tenants and priorities), shows progress, prints what the proxy
measured per backend, then stops everything cleanly."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import orjson
from aiohttp import web

from estimator.records import Outcome, RequestRecord

from .app import Deps, build_app
from .config import load_config
from .emulate import EmulatorConfig, EmulatorServer, FixedPace, TimingModel


def _bound_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


async def start_site(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    sock = _bound_socket()
    await web.SockSite(runner, sock).start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}"


@dataclass
class Traffic:
    sent: int = 0
    done: int = 0
    errors: int = 0
    records: list[RequestRecord] = field(default_factory=list)


def _request(i: int, rng: random.Random, model: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    tenant = rng.choice(["acme", "acme", "globex", "initech"])
    priority = rng.choice(["high", "normal", "normal", "low"])
    words = " ".join(f"w{rng.randrange(1000)}" for _ in range(rng.randint(20, 400)))
    max_tokens = rng.choice([16, 32, 64, 128])
    headers = {"x-tenant": tenant, "x-priority": priority}
    if i % 3:
        body = {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": words},
            ],
            "max_tokens": max_tokens,
            "stream": i % 3 == 1,
        }
        return "/v1/chat/completions", body, headers
    return (
        "/v1/completions",
        {"model": model, "prompt": words, "max_tokens": max_tokens, "stream": i % 2 == 0},
        headers,
    )


async def _one(
    session: aiohttp.ClientSession, url: str, i: int, rng: random.Random, model: str, t: Traffic
) -> None:
    path, body, headers = _request(i, rng, model)
    t.sent += 1
    try:
        async with session.post(url + path, data=orjson.dumps(body), headers=headers) as r:
            async for _ in r.content.iter_any():
                pass
            t.errors += r.status != 200
    except aiohttp.ClientError:
        t.errors += 1
    t.done += 1


async def drive(
    url: str,
    model: str,
    *,
    duration_s: float,
    max_requests: int,
    rate: Callable[[float], float],
    t: Traffic,
    on_tick: Callable[[float], None] | None = None,
) -> None:
    """Open-loop Poisson arrivals at ``rate(elapsed)`` requests/s."""
    rng = random.Random(7)
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        i = 0
        while (now := time.monotonic() - start) < duration_s and i < max_requests:
            task = asyncio.create_task(_one(s, url, i, rng, model, t))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            if on_tick is not None:
                on_tick(now)
            await asyncio.sleep(rng.expovariate(max(rate(now), 0.1)))
        if tasks:
            await asyncio.wait(tasks, timeout=60)


def _pct(values: list[float], q: float) -> str:
    return f"{1000 * float(np.percentile(values, q)):.1f}" if values else "-"


def summary_rows(records: list[RequestRecord]) -> list[list[str]]:
    rows = []
    by_backend: dict[str, list[RequestRecord]] = {}
    for r in records:
        by_backend.setdefault(r.backend or "none", []).append(r)
    for name, recs in [*sorted(by_backend.items()), ("ALL", records)]:
        ok = [r for r in recs if r.outcome is Outcome.OK]
        ttft = [r.ttft_s for r in ok if r.streamed and r.ttft_s is not None]
        itl = [r.itl.p50 for r in ok if r.itl.p50 is not None]
        rows.append(
            [
                name,
                str(len(recs)),
                str(len(ok)),
                _pct(ttft, 50),
                _pct(ttft, 95),
                _pct(ttft, 99),
                _pct(itl, 50),
                _pct(itl, 95),
                str(sum(r.prompt_tokens or 0 for r in ok)),
                str(sum(r.completion_tokens or 0 for r in ok)),
            ]
        )
    return rows


SUMMARY_HEADER = [
    "backend",
    "requests",
    "ok",
    "TTFT p50 ms",
    "p95",
    "p99",
    "ITL p50 ms",
    "p95",
    "prompt tok",
    "output tok",
]


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for row in [header, *rows]:
            print("  ".join(f"{c:>12}" for c in row))
        return
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=140).print(table)


def demo_engine(port_name: str) -> tuple[EmulatorConfig, TimingModel]:
    return EmulatorConfig(model="demo-model", max_num_seqs=24), FixedPace(ttft_s=0.04, itl_s=0.008)


async def run_demo(*, duration_s: float = 20.0, requests: int = 400) -> int:
    runners: list[web.AppRunner] = []
    urls = []
    for name in ("engine-a", "engine-b"):
        cfg, timing = demo_engine(name)
        runner, url = await start_site(EmulatorServer(cfg, timing).app())
        runners.append(runner)
        urls.append(url)
    t = Traffic()
    config = load_config(
        overrides={
            "backends": [{"url": u} for u in urls],
            "health": {"interval_s": 1.0, "scrape_interval_s": 1.0},
        }
    )
    deps = Deps(subscribers=[("demo", t.records.append)])
    proxy_runner, proxy_url = await start_site(build_app(config, deps))
    runners.insert(0, proxy_runner)
    print(f"engines: {', '.join(urls)}; proxy: {proxy_url}")
    try:
        await _drive_with_progress(proxy_url, duration_s, requests, t)
    finally:
        for r in runners:
            await r.cleanup()
    print_table("What the proxy measured", SUMMARY_HEADER, summary_rows(t.records))
    lost = t.sent - len(t.records)
    print(f"sent {t.sent}, recorded {len(t.records)}, errors {t.errors}, lost {lost}")
    return 0 if lost == 0 and t.records else 1


async def _drive_with_progress(url: str, duration_s: float, requests: int, t: Traffic) -> None:
    def rate(elapsed: float) -> float:  # a ramp from 5 to 40 requests/s
        return 5.0 + 35.0 * min(1.0, elapsed / max(duration_s, 1e-9))

    try:
        from rich.progress import Progress
    except ImportError:
        await drive(url, "demo-model", duration_s=duration_s, max_requests=requests, rate=rate, t=t)
        return
    with Progress() as progress:
        task = progress.add_task("traffic", total=duration_s)

        def tick(elapsed: float) -> None:
            label = f"traffic {rate(elapsed):4.1f} req/s, done {t.done}/{t.sent}"
            progress.update(task, completed=elapsed, description=label)

        await drive(
            url,
            "demo-model",
            duration_s=duration_s,
            max_requests=requests,
            rate=rate,
            t=t,
            on_tick=tick,
        )
        progress.update(task, completed=duration_s)
