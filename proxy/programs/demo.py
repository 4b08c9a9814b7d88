"""``rightsizer demo``: the self-contained main job. Starts two emulated engines (Llama-3.1-8B
on the GPU ``DEMO_GPU``, timed by the estimator's own engine model) and the proxy on loopback
ports, sends a seeded traffic ramp through the proxy (streamed and not, chat and completions,
several tenants and priorities), shows progress, then prints on one screen what the proxy
measured and what the estimator projects from it, against the SLO (the proxy's default), and
stops everything cleanly.

One module past the house's 400 lines: the run and its one screen (intro, progress, the two
tables) change together.

Reproducible: the whole schedule (arrival times and request bodies) is drawn from ``--seed``
before the first request, and the final projection is taken at the schedule's end, not at
whatever second the drain finished. The estimator runs in a child process
(``ChildEstimator``): its simulations never share the interpreter with the engines and the
proxy whose timings it fits (a refresh in a thread of the same process stretched the very
gaps it was measuring).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import multiprocessing
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from estimator.catalog import GpuSpec, get_gpu, load_gpu_catalog
from estimator.engine import roofline_prior
from estimator.memory import plan_memory
from estimator.modelarch import load_model_arch
from estimator.records import (
    GAP_BINS,
    BackendSnapshot,
    Outcome,
    RequestRecord,
    add_gap_histogram,
    gap_quantiles,
)
from estimator.report import DeploymentReport, Report
from estimator.service import Estimator
from estimator.settings import EstimatorConfig, describe_slo, resolve_model_config
from proxy.app import Deps, build_app
from proxy.config import load_config
from proxy.estimation import InProcessEstimator
from proxy.programs.emulator import EmulatorConfig, EmulatorServer, TimingModel
from proxy.server import GuardedRunner

DEMO_GPU = "a100-40gb"
DEMO_MODEL = "demo-model"
DEMO_MODEL_CONFIG = "llama-3.1-8b"  # packaged (estimator/data/models)
DEMO_SEED = 7
RAMP_RPS = (4.0, 14.0)  # offered rate at the start and the end of the run


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


# ---- the schedule ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Planned:
    """One request of the schedule: when (seconds after the start) and what."""

    at_s: float
    path: str
    body: dict[str, Any]
    headers: dict[str, str]


def _request(i: int, rng: random.Random, model: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    tenant = rng.choice(["acme", "acme", "globex", "initech"])
    priority = rng.choice(["high", "normal", "normal", "low"])
    words = " ".join(f"w{rng.randrange(1000)}" for _ in range(rng.randint(20, 400)))
    max_tokens = rng.choice([16, 32, 64, 128])
    headers = {"x-tenant": tenant, "x-priority": priority}
    stream = i % 4 != 3  # three in four streamed: only streamed requests show TTFT and gaps
    if i % 3:
        body = {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": words},
            ],
            "max_tokens": max_tokens,
            "stream": stream,
        }
        return "/v1/chat/completions", body, headers
    return (
        "/v1/completions",
        {"model": model, "prompt": words, "max_tokens": max_tokens, "stream": stream},
        headers,
    )


def plan_traffic(
    seed: int, duration_s: float, max_requests: int, rate: Callable[[float], float],
    model: str = DEMO_MODEL,
) -> list[Planned]:  # fmt: skip
    """Open-loop Poisson arrivals at ``rate(t)`` requests/s, all drawn from ``seed`` up front."""
    rng = random.Random(seed)
    out: list[Planned] = []
    t = 0.0
    while t < duration_s and len(out) < max_requests:
        out.append(Planned(t, *_request(len(out), rng, model)))
        t += rng.expovariate(max(rate(t), 0.1))
    return out


def ramp(duration_s: float, lo: float = RAMP_RPS[0], hi: float = RAMP_RPS[1]) -> Callable[
    [float], float]:  # fmt: skip
    return lambda t: lo + (hi - lo) * min(1.0, t / max(duration_s, 1e-9))


@dataclass
class Traffic:
    sent: int = 0
    done: int = 0
    errors: int = 0
    records: list[RequestRecord] = field(default_factory=list)


async def _one(session: aiohttp.ClientSession, url: str, p: Planned, t: Traffic) -> None:
    t.sent += 1
    try:
        async with session.post(url + p.path, data=orjson.dumps(p.body), headers=p.headers) as r:
            async for _ in r.content.iter_any():
                pass
            t.errors += r.status != 200
    except aiohttp.ClientError:
        t.errors += 1
    t.done += 1


async def drive(url: str, plan: Sequence[Planned], t: Traffic,
                on_tick: Callable[[float], None] | None = None) -> None:  # fmt: skip
    """Send each planned request at its time (relative to now), then wait for all of them."""
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        for p in plan:
            delay = p.at_s - (time.monotonic() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_one(s, url, p, t))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if on_tick is not None:
                on_tick(time.monotonic() - start)
        while tasks:  # the drain: progress keeps moving until the last response
            await asyncio.wait(set(tasks), timeout=0.25)
            if on_tick is not None:
                on_tick(time.monotonic() - start)


# ---- the estimator, in its own process --------------------------------------------------------
_CHILD: Estimator | None = None


def _child_start(config: EstimatorConfig) -> None:
    global _CHILD
    # the lowest CPU priority: on a small machine the emulated engines and the proxy beside
    # it must keep their timing, or the estimator would fit its own interference
    os.nice(19)
    _CHILD = Estimator(config)


def _child_refresh(records: list[RequestRecord], snapshots: list[BackendSnapshot],
                   now: float | None) -> Report:  # fmt: skip
    assert _CHILD is not None
    for r in records:
        _CHILD.observe(r)
    for s in snapshots:
        _CHILD.observe_backend(s)
    return _CHILD.refresh(now)


class ChildEstimator:
    """The estimator behind a process boundary: ``observe*`` buffer (O(1), on the loop);
    ``refresh`` ships the buffer to an ``Estimator`` built in a child process from the
    picklable config and returns its ``Report``. Satisfies the app's ``EstimatorLike``."""

    def __init__(self, config: EstimatorConfig) -> None:
        self.config = config
        self._records: collections.deque[RequestRecord] = collections.deque()
        self._snapshots: collections.deque[BackendSnapshot] = collections.deque()
        self._pool = concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_start,
            initargs=(config,),
        )  # fmt: skip
        self._report: Report | None = None

    def observe(self, record: RequestRecord) -> None:
        self._records.append(record)

    def observe_backend(self, snapshot: BackendSnapshot) -> None:
        self._snapshots.append(snapshot)

    def refresh(self, now: float | None = None) -> Report:
        recs = [self._records.popleft() for _ in range(len(self._records))]
        snaps = [self._snapshots.popleft() for _ in range(len(self._snapshots))]
        self._report = self._pool.submit(_child_refresh, recs, snaps, now).result()
        return self._report

    def report(self) -> Report | None:
        return self._report

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


# ---- the engines and the estimator's settings -------------------------------------------------
def demo_engine(gpu_key: str = DEMO_GPU) -> tuple[EmulatorConfig, TimingModel]:
    """Llama-3.1-8B on one ``gpu_key``, emulated with the estimator's physical engine model."""
    arch = load_model_arch(resolve_model_config(DEMO_MODEL_CONFIG))
    gpu = get_gpu(load_gpu_catalog(), gpu_key)
    plan = plan_memory(arch, gpu, max_model_len=8192, max_num_seqs=64)
    cfg = EmulatorConfig(
        model=DEMO_MODEL, max_num_seqs=64, kv_capacity_tokens=plan.kv_capacity_tokens
    )
    return cfg, roofline_prior(arch, gpu)


def demo_config(gpu_key: str = DEMO_GPU) -> EstimatorConfig:
    """The estimator's settings: the defaults (the SLO included), the GPU and model the
    engines emulate, the engines' own limits (the emulator prefills every admitted prompt
    in one step: no chunking at vLLM's 2048 tokens of an A100-40GB)."""
    return EstimatorConfig(
        refresh_interval_s=5.0, gpu=gpu_key, model_configs={DEMO_MODEL: DEMO_MODEL_CONFIG},
        max_num_seqs=64, max_num_batched_tokens=8192, max_model_len=8192,
        forecast_horizon_s=600.0,
        advisor_gpus=("l4", "a10g", "l40s", "a100-40gb", "a100-80gb", "h100-sxm"),
    )  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoResult:
    """What one run produced (for the reproducibility test)."""

    records: list[RequestRecord]
    report: Report
    sent: int
    errors: int

    @property
    def deployment(self) -> DeploymentReport | None:
        return self.report.deployment(DEMO_MODEL)


async def run_demo(*, duration_s: float = 40.0, requests: int = 2000, seed: int = DEMO_SEED,
                   show: bool = True) -> int:  # fmt: skip
    result = await demo(duration_s=duration_s, requests=requests, seed=seed, show=show)
    lost = result.sent - len(result.records)
    return 0 if lost == 0 and result.records else 1


async def demo(*, duration_s: float, requests: int, seed: int, show: bool = True) -> DemoResult:
    """Run the demo; prints the screen when ``show``."""
    config = demo_config()
    catalog = load_gpu_catalog()
    plan = plan_traffic(seed, duration_s, requests, ramp(duration_s))
    runners: list[web.AppRunner] = []
    urls = []
    for _ in range(2):
        cfg, timing = demo_engine()
        runner, url = await start_site(EmulatorServer(cfg, timing).app())
        runners.append(runner)
        urls.append(url)
    t = Traffic()
    est = ChildEstimator(config)
    proxy_config = load_config(environ={}, overrides={
        "backends": [{"url": u, "name": f"engine-{i + 1}"} for i, u in enumerate(urls)],
        "health": {"interval_s": 1.0, "scrape_interval_s": 1.0},
        "estimator": {"refresh_interval_s": config.refresh_interval_s, "gpu": DEMO_GPU},
    })  # fmt: skip
    # the demo refreshes the estimator on its own clock: the app gets it without a timer
    deps = Deps(estimator=InProcessEstimator(est, None), subscribers=[("demo", t.records.append)])
    proxy_runner, proxy_url = await start_site(build_app(proxy_config, deps))
    runners.insert(0, proxy_runner)
    gpu: GpuSpec = catalog[DEMO_GPU]
    if show:
        print_intro(config, gpu, seed, duration_s, len(plan), urls, proxy_url)
    start_epoch = time.time()
    try:
        await drive_with_progress(proxy_url, plan, t, est, duration_s, show=show)
    finally:
        for r in runners:
            await r.cleanup()
    # the projection for the schedule's end: the same instant in every run of this seed
    end = start_epoch + (plan[-1].at_s if plan else 0.0) + 1.0
    try:
        report = await asyncio.to_thread(est.refresh, end)
    finally:
        est.close()
    if show:
        print_results(t, report, config, gpu)
    return DemoResult(records=t.records, report=report, sent=t.sent, errors=t.errors)


# ---- the screen -------------------------------------------------------------------------------
def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def print_intro(config: EstimatorConfig, gpu: GpuSpec, seed: int, duration_s: float,
                n: int, urls: Sequence[str], proxy_url: str) -> None:  # fmt: skip
    lo, hi = RAMP_RPS
    c = _console()
    c.print(f"[bold]rightsizer demo[/]: 2 emulated engines ({DEMO_MODEL_CONFIG} on one "
            f"{gpu.name} each, timed by the estimator's roofline engine model) at "
            f"{', '.join(urls)}; the proxy at {proxy_url}")  # fmt: skip
    c.print(f"traffic: {n} requests over {duration_s:g} s, ramping {lo:g} -> {hi:g} req/s "
            f"(seed {seed}: the same schedule every run)")  # fmt: skip
    c.print(f"SLO (the proxy's default): {describe_slo(config.slo)}")
    c.print(f"the estimator assumes {gpu.key} at ${gpu.price_per_hour:.2f}/GPU-hour "
            f"({gpu.price_source}, {gpu.price_date}) and fits its engine model on what the "
            "proxy measures\n")  # fmt: skip


def live_line(report: Report | None) -> str:
    """One line, under 80 columns: what the estimator says now."""
    d = report.deployment(DEMO_MODEL) if report is not None else None
    if d is None or d.status != "ok" or d.traffic is None:
        why = "" if d is None else f" ({d.requests_observed} requests)"
        return f"estimator: gathering data{why}"
    band = f" +-{d.capacity_band.rel_error:.0%}" if d.capacity_band else ""
    return (f"estimator: {d.traffic.rate_rps:.1f} req/s now, capacity "
            f"{_num(d.capacity_rps)}{band}, utilization {_pct(d.utilization)}")  # fmt: skip


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


async def drive_with_progress(url: str, plan: Sequence[Planned], t: Traffic,
                              est: ChildEstimator, duration_s: float, *,
                              show: bool = True) -> None:  # fmt: skip
    """The schedule, with a two-line progress display (each line fits 80 columns) that keeps
    moving while the last requests drain."""
    if not show:
        await drive(url, plan, t)
        return
    from rich.progress import Progress, TextColumn

    rate = ramp(duration_s)
    with Progress(TextColumn("{task.description}", markup=False), console=_console()) as progress:
        task = progress.add_task("", total=duration_s)

        def tick(elapsed: float) -> None:
            done = min(elapsed, duration_s) / max(duration_s, 1e-9)
            bar = "#" * round(20 * done) + "." * (20 - round(20 * done))
            head = (f"{min(elapsed, duration_s):3.0f}/{duration_s:g} s, "
                    f"{rate(elapsed):4.1f} req/s offered"
                    if elapsed < duration_s and t.sent < len(plan)
                    else f"draining: {t.sent - t.done} in flight")  # fmt: skip
            progress.update(task, completed=min(elapsed, duration_s),
                            description=f"[{bar}] {head}, {t.done}/{t.sent} done\n"
                            f"{live_line(est.report())}")  # fmt: skip

        await drive(url, plan, t, on_tick=tick)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    _console().print(table)


def print_results(t: Traffic, report: Report, config: EstimatorConfig, gpu: GpuSpec) -> None:
    """The one screen: what was measured, what is projected from it, against the SLO."""
    c = _console()
    lost = t.sent - len(t.records)
    ok = [r for r in t.records if r.outcome is Outcome.OK]
    print_table("Measured by the proxy, whole run (TTFT: streamed requests; ITL: every token "
                "gap, pooled)", SUMMARY_HEADER, summary_rows(t.records))  # fmt: skip
    c.print(f"tokens: {sum(r.prompt_tokens or 0 for r in ok)} prompt, "
            f"{sum(r.completion_tokens or 0 for r in ok)} output; sent {t.sent}, recorded "
            f"{len(t.records)}, errors {t.errors}, lost {lost}\n")  # fmt: skip
    d = report.deployment(DEMO_MODEL)
    if d is None:
        c.print("estimator: no report")
        return
    fit = d.fit
    window = f"last {d.observed_window_s:.0f} s" if d.observed_window_s else "-"
    print_table(f"Estimator, for the run's end: {d.replicas}x {gpu.key}, model "
                f"{fit.source} on {fit.samples} requests (p90 error {_pct(fit.rel_error_p90)})",
                ["", f"measured ({window})", "projected"], estimator_rows(d))  # fmt: skip
    for line in verdict_lines(d, config):
        c.print(line)
    scale = d.fit.scale_vs_prior
    if scale is not None and abs(scale - 1.0) > 0.1:  # the emulators run on this host's CPU
        c.print(f"note: the emulated engines decoded {scale:.2f}x as slowly as the {gpu.key} they "
                f"emulate (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs): the "
                "estimator fits what it measured, so a busy host moves these figures")  # fmt: skip
    for n in d.notes:
        c.print(f"  note: {n}")
    for r in d.recommendations:
        c.print(f"  [{r.severity}] {r.kind}: {r.message}", markup=False)
    alts = [[a.label() + (" (now)" if a.current else ""), a.verdict(),
             _num(a.capacity_rps) if a.meets_slo else "-",
             f"{a.usd_per_hour:.2f}" if a.meets_slo else "-",
             _money(a.usd_per_1m_output_tokens) if a.meets_slo else "-"]
            for a in d.alternatives[:6]]  # fmt: skip
    if alts:
        at = next((a.priced_at_rps for a in d.alternatives if a.priced_at_rps), None)
        print_table("\nAlternatives, each sized for the forecast peak with N+1 (req/s: without "
                    "the spare)", ["deployment", "verdict", "req/s", "$/h",
                                   f"$/1M out @ {_num(at)} req/s"], alts)  # fmt: skip


def _money(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def estimator_rows(d: DeploymentReport) -> list[list[str]]:
    """Measured beside projected at the same rate."""
    tr = d.traffic
    return [
        ["rate", f"{tr.rate_rps:.2f} req/s" if tr else "-", ""],
        ["TTFT p95", f"{_ms(d.observed_ttft_p95_s, 0)} ms ({d.observed_requests} req)",
         f"{_ms(d.projected_ttft_p95_s, 0)} ms"],
        ["ITL p95 (all gaps)", f"{_ms(d.observed_itl_p95_s)} ms ({d.observed_gaps} gaps)",
         f"{_ms(d.projected_itl_p95_s)} ms"],
    ]  # fmt: skip


def _met(ttft: float | None, itl: float | None, config: EstimatorConfig) -> str:
    if ttft is None or itl is None:
        return "unknown"
    slo = config.slo
    return "met" if ttft <= slo.ttft_p95_s and itl <= slo.itl_p95_s else "MISSED"


def verdict_lines(d: DeploymentReport, config: EstimatorConfig) -> list[str]:
    """The SLO verdicts, capacity, replicas and cost, each with what it stands on."""
    out = [f"SLO {describe_slo(config.slo)}: measured "
           f"{_met(d.observed_ttft_p95_s, d.observed_itl_p95_s, config)}, projected "
           f"{_met(d.projected_ttft_p95_s, d.projected_itl_p95_s, config)}"]  # fmt: skip
    band = d.capacity_band
    if d.capacity_rps is not None and d.traffic is not None:
        breach = ("now: the rate is above capacity" if d.seconds_to_breach == 0
                  else "not within the horizon" if d.seconds_to_breach is None
                  else f"in {d.seconds_to_breach:.0f} s")  # fmt: skip
        out.append(f"capacity at the SLO: {d.capacity_rps:.1f} req/s on {d.replicas} replicas"
                   + (f" +-{band.rel_error:.0%}" if band else "")
                   + f" (limited by {d.limiting}); utilization {_pct(d.utilization)}; "
                   f"SLO breach {breach}")  # fmt: skip
        peak = max(d.traffic.forecast_peak_rps, d.traffic.rate_rps)
        rec = ("too uncertain to size (see advice)" if d.recommended_replicas is None
               else f"{d.recommended_replicas} (now {d.replicas})")  # fmt: skip
        out.append(f"replicas for the forecast peak {peak:.2f} req/s with "
                   f"{config.spare_replicas} spare: {rec}")  # fmt: skip
    c, cc = d.cost, d.cost_at_capacity
    if c is not None:
        prices = [f"${f.usd_per_1m_output_tokens:.2f} {f.label()}" for f in (c, cc)
                  if f is not None and f.usd_per_1m_output_tokens is not None]  # fmt: skip
        out.append(f"cost: ${c.usd_per_hour:.2f}/h; per 1M output tokens: "
                   + (", ".join(prices) or "-"))  # fmt: skip
    return out


# ---- what the proxy measured ------------------------------------------------------------------
def _ms(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{1000 * x:.{digits}f}"


def _quantiles(values: list[float], qs: Sequence[float]) -> list[float | None]:
    if not values:
        return [None for _ in qs]
    s = sorted(values)
    return [s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))] for q in qs]


def summary_rows(records: list[RequestRecord]) -> list[list[str]]:
    """Per backend and in all: TTFT percentiles over streamed OK requests, ITL percentiles over
    all their token gaps (the records' gap histograms summed: the SLO's definition)."""
    rows = []
    by_backend: dict[str, list[RequestRecord]] = {}
    for r in records:
        by_backend.setdefault(r.backend or "none", []).append(r)
    for name, recs in [*sorted(by_backend.items()), ("all", records)]:
        ok = [r for r in recs if r.outcome is Outcome.OK]
        ttft = _quantiles([r.ttft_s for r in ok if r.streamed and r.ttft_s is not None],
                          (0.5, 0.95, 0.99))  # fmt: skip
        dense = [0] * GAP_BINS
        gaps = sum(add_gap_histogram(dense, r.itl) for r in ok)
        itl = gap_quantiles(dense, (0.5, 0.95))
        rows.append([name, str(len(recs)), str(len(ok)), *(_ms(x, 0) for x in ttft),
                     *(_ms(x) for x in itl), str(gaps)])  # fmt: skip
    return rows


SUMMARY_HEADER = ["backend", "req", "ok", "TTFT p50", "p95", "p99 ms", "ITL p50", "p95 ms", "gaps"]
