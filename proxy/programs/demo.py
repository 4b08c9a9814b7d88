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
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
from aiohttp import web

import estimator
from estimator.catalog import get_gpu, load_gpu_catalog
from estimator.engine import roofline_prior
from estimator.memory import plan_memory
from estimator.modelarch import load_model_arch
from estimator.records import Outcome, RequestRecord
from estimator.report import Report
from estimator.service import Estimator, EstimatorConfig
from proxy.app import Deps, build_app
from proxy.config import load_config
from proxy.estimation import InProcessEstimator
from proxy.programs.emulator import EmulatorConfig, EmulatorServer, TimingModel
from proxy.server import GuardedRunner


def _bound_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


async def start_site(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = GuardedRunner(app, handler_cancellation=True, access_log=None)
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


DEMO_GPU = "a10g"
DEMO_MODEL = "demo-model"


def demo_model_config() -> str:
    return str(Path(estimator.__file__).parent / "data" / "models" / "llama-3.1-8b.json")


def demo_engine() -> tuple[EmulatorConfig, TimingModel]:
    """Llama-3.1-8B on an A10G, emulated with the estimator's physical engine model."""
    arch = load_model_arch(demo_model_config())
    gpu = get_gpu(load_gpu_catalog(), DEMO_GPU)
    plan = plan_memory(arch, gpu, max_model_len=8192, max_num_seqs=64)
    cfg = EmulatorConfig(
        model=DEMO_MODEL, max_num_seqs=64, kv_capacity_tokens=plan.kv_capacity_tokens
    )
    return cfg, roofline_prior(arch, gpu)


def demo_estimator() -> Estimator:
    return Estimator(EstimatorConfig(
        slo_ttft_p95_s=1.0, slo_itl_p95_s=0.1, gpu=DEMO_GPU,
        model_configs={DEMO_MODEL: demo_model_config()}, min_records=40,
        advisor_interval_s=10.0, advisor_gpus=("l4", "a10g", "l40s", "a100-80gb", "h100-sxm"),
        max_num_seqs=64, max_model_len=8192, forecast_horizon_s=600.0,
    ))  # fmt: skip


async def run_demo(*, duration_s: float = 30.0, requests: int = 2000) -> int:
    runners: list[web.AppRunner] = []
    urls = []
    for _ in range(2):
        cfg, timing = demo_engine()
        runner, url = await start_site(EmulatorServer(cfg, timing).app())
        runners.append(runner)
        urls.append(url)
    t = Traffic()
    est = demo_estimator()
    config = load_config(environ={}, overrides={
        "backends": [{"url": u} for u in urls],
        "health": {"interval_s": 1.0, "scrape_interval_s": 1.0},
        "estimator": {"gpu": DEMO_GPU},
    })  # fmt: skip
    deps = Deps(
        estimator=InProcessEstimator(est, est.config.refresh_interval_s),
        subscribers=[("demo", t.records.append)],
    )
    proxy_runner, proxy_url = await start_site(build_app(config, deps))
    runners.insert(0, proxy_runner)
    print(f"2 emulated engines (Llama-3.1-8B on {DEMO_GPU}, roofline engine model): "
          f"{', '.join(urls)}; proxy: {proxy_url}")  # fmt: skip
    try:
        await _drive_with_progress(proxy_url, duration_s, requests, t, est)
    finally:
        for r in runners:
            await r.cleanup()
    print_table("What the proxy measured", SUMMARY_HEADER, summary_rows(t.records))
    lost = t.sent - len(t.records)
    print(f"sent {t.sent}, recorded {len(t.records)}, errors {t.errors}, lost {lost}")
    report = await asyncio.to_thread(est.refresh)
    print_report(report)
    return 0 if lost == 0 and t.records else 1


def _fmt(v: float | None, unit: str = "", scale: float = 1.0, digits: int = 2) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}{unit}"


def live_line(report: Report | None) -> str:
    d = report.deployment(DEMO_MODEL) if report is not None else None
    if d is None or d.status != "ok":
        return "estimator: gathering data"
    rate = d.traffic.rate_1m_rps if d.traffic is not None else None
    breach = "never" if d.seconds_to_breach is None else f"{d.seconds_to_breach:.0f}s"
    return (f"rate {_fmt(rate)}/s, capacity {_fmt(d.capacity_rps)}/s, "
            f"util {_fmt(d.utilization, '%', 100, 0)}, breach in {breach}")  # fmt: skip


def print_report(report: Report) -> None:
    for d in report.deployments:
        rate = d.traffic.rate_1m_rps if d.traffic is not None else None
        rows = [
            ["status", d.status], ["replicas now", str(d.replicas)],
            ["current rate (req/s)", _fmt(rate)], ["capacity at SLO (req/s)", _fmt(d.capacity_rps)],
            ["utilization", _fmt(d.utilization, "%", 100, 0)],
            ["projected p95 TTFT / ITL (ms)", f"{_fmt(d.projected_ttft_p95_s, '', 1000, 0)} / "
                                              f"{_fmt(d.projected_itl_p95_s, '', 1000, 1)}"],
            ["observed p95 TTFT / ITL (ms)", f"{_fmt(d.observed_ttft_p95_s, '', 1000, 0)} / "
                                             f"{_fmt(d.observed_itl_p95_s, '', 1000, 1)}"],
            ["seconds to SLO breach", _fmt(d.seconds_to_breach, "", 1, 0).replace("-", "never")],
            ["recommended replicas (N+1)", str(d.recommended_replicas)],
            ["$ per hour", _fmt(d.cost.usd_per_hour if d.cost else None)],
            ["$ per 1M output tokens", _fmt(d.cost.usd_per_1m_output_tokens if d.cost else None)],
            ["fit error (p90 relative)", f"{_fmt(d.fit.rel_error_p90)} ({d.fit.source})"],
        ]  # fmt: skip
        print_table(f"Estimator: {d.model}", ["", "value"], rows)
        for n in d.notes:
            print(f"  note: {n}")
        for r in d.recommendations:
            print(f"  [{r.severity}] {r.kind}: {r.message}")
        alts = [[a.label(), _fmt(a.capacity_rps), "yes" if a.meets_slo else "no",
                 _fmt(a.usd_per_hour), _fmt(a.usd_per_1m_tokens), a.oom_risk]
                for a in d.alternatives[:6]]  # fmt: skip
        if alts:
            header = ["deployment", "capacity req/s", "meets SLO", "$/h", "$/1M tok", "OOM risk"]
            print_table("Right-sizing alternatives (cheapest meeting the SLO first)", header, alts)


async def _drive_with_progress(
    url: str, duration_s: float, requests: int, t: Traffic, est: Estimator
) -> None:
    """The traffic ramp, with the estimator refreshed (in a thread) every 3 s for the display."""

    def rate(elapsed: float) -> float:  # a ramp from 2 to 14 requests/s
        return 2.0 + 12.0 * min(1.0, elapsed / max(duration_s, 1e-9))

    async def refresher() -> None:
        while True:
            await asyncio.sleep(3.0)
            await asyncio.to_thread(est.refresh)

    from rich.progress import Progress

    task_r = asyncio.create_task(refresher())
    try:
        with Progress() as progress:
            task = progress.add_task("traffic", total=duration_s)

            def tick(elapsed: float) -> None:
                label = f"{rate(elapsed):4.1f} req/s offered, {t.done}/{t.sent} done"
                label += f" | {live_line(est.report())}"
                progress.update(task, completed=elapsed, description=label)

            await drive(
                url, DEMO_MODEL, duration_s=duration_s, max_requests=requests, rate=rate, t=t,
                on_tick=tick,
            )  # fmt: skip
            progress.update(task, completed=duration_s)
    finally:
        task_r.cancel()
