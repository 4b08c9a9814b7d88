"""Overload: 2x the engines' capacity, mixed priorities, without and with the proxy's
scheduling (priority queue, deadlines, shedding).

    python3 bench/overload.py              # full run, about 4 minutes
    python3 bench/overload.py --quick      # about 60 s
    python3 bench/overload.py --json out.json --load 2.0 --duration 60

Setup: two emulated engines (``rightsizer emulate``: continuous batching, ``--max-num-seqs
8``, prefill step 50 ms, decode step 20 ms; every request asks 32 tokens with
``ignore_eos``), one proxy in front (``estimator`` off, metrics scraped every second).
Capacity is measured first: a closed loop of 32 workers straight at the two engines for a
few seconds (saturated, so completions/s = capacity). Then an open-loop Poisson stream at
``--load`` x capacity (default 2x) for ``--duration`` seconds, priorities drawn 10% critical,
20% high, 40% normal, 20% low, 10% sheddable (tenant = class, header ``x-priority``), each
request carrying ``x-request-deadline-ms`` = its class's TTFT SLO (so the proxy knows how
long it may wait; the no-scheduling proxy ignores it). Same seed, same arrivals in both runs:
``scheduling.enabled: false`` (plain pass-through: the engines' own FCFS queues absorb the
overload) vs the default scheduling. After the arrival window, requests still in flight get
up to 150 s to finish (client timeout 150 s per request).

SLO (TTFT, client-measured send -> first content event): critical 1 s, high 1 s, normal 3 s,
low 5 s, sheddable 5 s. Goodput = requests that completed and met their class's SLO, per
second of the arrival window.

Checks: nothing silently lost (every request completed 200 or got an explicit 429/503, no
transport errors or timeouts); every 429/503 carries ``Retry-After`` (and the shed reason
header); with scheduling, critical and high p99 TTFT within their SLO; goodput with
scheduling >= 1.5x the no-scheduling run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from typing import Any

from common import (
    Check,
    Result,
    Sampler,
    add_common_args,
    by_label,
    client_session,
    pct,
    report_checks,
    run_main,
    samples,
    scrape,
    stream_chat,
    table,
    write_json,
)

MODEL = "emu"
CLASSES = ("critical", "high", "normal", "low", "sheddable")
MIX = (0.10, 0.20, 0.40, 0.20, 0.10)
SLO_S = {"critical": 1.0, "high": 1.0, "normal": 3.0, "low": 5.0, "sheddable": 5.0}
MAX_TOKENS = 32
PROMPT = "Summarise the quarterly report for the operations team in three bullet points. " * 4


def request_body() -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
    }


async def measure_capacity(urls: list[str], seconds: float, workers: int = 32) -> float:
    done = 0
    async with client_session() as http:
        stop_at = time.perf_counter() + seconds
        t0 = time.perf_counter()
        first_done: list[float] = []

        async def worker(i: int) -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                r = await stream_chat(http, urls[i % len(urls)], request_body())
                if r.ok:
                    done += 1
                    if not first_done:
                        first_done.append(time.perf_counter())

        await asyncio.gather(*(worker(i) for i in range(workers)))
        # Count from the first completion (the pipeline is full) to the end of the window.
        return done / max(1e-9, time.perf_counter() - (first_done[0] if first_done else t0))


def arrivals(seed: int, rate: float, duration: float) -> list[tuple[float, str]]:
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append((t, rng.choices(CLASSES, MIX)[0]))


async def open_loop(
    url: str, plan: list[tuple[float, str]], deadlines: bool
) -> tuple[list[Result], dict[str, float]]:
    """The results and the largest in-flight count per backend the proxy reported."""
    results: list[Result] = []
    async with client_session() as http:
        sampler = Sampler(url, 0.5)
        sampler.start(http)
        t0 = time.perf_counter()

        async def one(klass: str) -> None:
            hdr = {"x-priority": klass, "x-tenant": klass}
            if deadlines:
                hdr["x-request-deadline-ms"] = str(int(SLO_S[klass] * 1000))
            r = await stream_chat(http, url, request_body(), hdr, timeout_s=150.0)
            r.tags = {"class": klass}
            results.append(r)

        tasks = []
        for at, klass in plan:
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(klass)))
        await asyncio.gather(*tasks)
        await sampler.stop()
    return results, {b: max(v) for b, v in sampler.inflight.items() if v}


def summarize(results: list[Result], window: float) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for klass in (*CLASSES, "all"):
        rs = [r for r in results if klass == "all" or r.tags["class"] == klass]
        ok = [r for r in rs if r.ok]
        ttft = [r.ttft for r in ok if r.ttft is not None]
        shed = [r for r in rs if r.shed]
        good = [r for r in ok if r.ttft is not None and r.ttft <= SLO_S[r.tags["class"]]]
        reasons: dict[str, int] = {}
        for r in shed:
            reasons[r.shed_reason or "?"] = reasons.get(r.shed_reason or "?", 0) + 1
        per[klass] = {
            "sent": len(rs),
            "completed": len(ok),
            "shed": len(shed),
            "shed_reasons": reasons,
            "shed_without_retry_after": sum(1 for r in shed if not r.retry_after),
            "shed_without_reason_header": sum(1 for r in shed if not r.shed_reason),
            "errors": len(rs) - len(ok) - len(shed),
            "error_samples": sorted(
                {f"{r.status} {r.error}" for r in rs if not r.ok and not r.shed}
            )[:5],
            "ttft_p50_s": pct(ttft, 50),
            "ttft_p99_s": pct(ttft, 99),
            "met_slo": len(good),
            "goodput_rps": len(good) / window,
        }
    return per


def body(stack: contextlib.ExitStack, args: argparse.Namespace) -> int:
    from tests.support.procs import start_emulator, start_proxy

    quick = args.quick
    duration = args.duration or (15.0 if quick else 60.0)
    t_start = time.perf_counter()
    engines = []
    for _ in range(2):
        e = start_emulator(MODEL, ttft=args.ttft, itl=args.itl, max_num_seqs=args.max_num_seqs)
        stack.callback(e.stop)
        engines.append(e)
    urls = [e.url for e in engines]
    capacity = asyncio.run(measure_capacity(urls, 4.0 if quick else 8.0))
    rate = args.load * capacity
    plan = arrivals(args.seed, rate, duration)
    print(
        f"capacity {capacity:.1f} req/s (2 engines x max_num_seqs {args.max_num_seqs}, "
        f"prefill step {args.ttft * 1000:.0f} ms, decode step {args.itl * 1000:.0f} ms, "
        f"{MAX_TOKENS} tokens); offering {rate:.1f} req/s ({args.load:g}x) for {duration:.0f} s: "
        f"{len(plan)} requests",
        flush=True,
    )

    runs: dict[str, Any] = {}
    variants = {
        "no_scheduling": (False, None),
        "scheduling": (True, None),
        f"scheduling+max_inflight={args.max_num_seqs}": (True, args.max_num_seqs),
    }
    for name, (enabled, max_inflight) in variants.items():
        cfg: dict[str, Any] = {
            "scheduling": {"enabled": enabled},
            "health": {"scrape_interval_s": 1.0},
            "estimator": {"enabled": False},
            "timeouts": {"read_s": 300.0},
            "backends": [{"url": u, "max_inflight": max_inflight} for u in urls],
        }
        proxy = start_proxy([], config=cfg)
        try:
            t0 = time.perf_counter()
            results, peak = asyncio.run(open_loop(proxy.url, plan, not args.no_deadline_headers))
            elapsed = time.perf_counter() - t0
            text = scrape(proxy.url)
        finally:
            proxy.stop()
        per = summarize(results, duration)
        per["all"]["elapsed_s"] = elapsed
        per["all"]["proxy_shed_total"] = {
            f"{lab['priority']}:{lab['reason']}": v
            for lab, v in samples(text, "rightsizer_shed_total")
            if v
        }
        per["all"]["peak_inflight"] = peak
        per["all"]["routed"] = by_label(text, "rightsizer_routing_decisions_total", "backend")
        runs[name] = per
        a = per["all"]
        print(
            f"{name}: {a['completed']} completed, {a['shed']} shed, {a['errors']} errors, "
            f"goodput {a['goodput_rps']:.2f} req/s, finished in {elapsed:.0f} s, "
            f"peak in-flight per backend (proxy) {peak}",
            flush=True,
        )

    print()
    print(
        f"overload: {args.load:g}x capacity ({rate:.1f} req/s offered vs {capacity:.1f} served), "
        f"open-loop Poisson, {duration:.0f} s, {len(plan)} requests per run"
    )
    rows = []
    for name, per in runs.items():
        for klass in (*CLASSES, "all"):
            s = per[klass]
            rows.append([
                name, klass, f"{SLO_S.get(klass, float('nan')):g}" if klass != "all" else "-",
                s["sent"], s["completed"], s["shed"], s["errors"], s["ttft_p50_s"],
                s["ttft_p99_s"], s["met_slo"], s["goodput_rps"],
            ])  # fmt: skip
    print(table(
        ["run", "class", "SLO s", "sent", "completed", "shed", "errors", "TTFT p50 s",
         "TTFT p99 s", "met SLO", "goodput req/s"],
        rows,
    ))  # fmt: skip
    for name, per in runs.items():
        if per["all"]["shed_reasons"]:
            print(f"  {name} shed reasons (client headers): {per['all']['shed_reasons']}")

    checks: list[Check] = []
    for name, per in runs.items():
        a = per["all"]
        checks.append(Check(
            f"{name}: nothing silently lost",
            a["completed"] + a["shed"] == a["sent"] and a["errors"] == 0,
            f"{a['sent']} sent = {a['completed']} completed + {a['shed']} shed"
            f" + {a['errors']} errors"
            + (f" {a['error_samples']}" if a["errors"] else ""),
        ))  # fmt: skip
        checks.append(Check(
            f"{name}: every 429/503 has Retry-After and x-rightsizer-shed-reason",
            a["shed_without_retry_after"] == 0 and a["shed_without_reason_header"] == 0,
            f"{a['shed']} shed, {a['shed_without_retry_after']} without Retry-After, "
            f"{a['shed_without_reason_header']} without reason",
        ))  # fmt: skip
    base = runs["no_scheduling"]
    for name, sch in runs.items():
        if name == "no_scheduling":
            continue
        for klass in ("critical", "high"):
            checks.append(Check(
                f"{name}: {klass} p99 TTFT within SLO ({SLO_S[klass]:g} s)",
                sch[klass]["ttft_p99_s"] <= SLO_S[klass],
                f"p99 {sch[klass]['ttft_p99_s']:.3f} s ({sch[klass]['completed']} completed, "
                f"{sch[klass]['shed']} shed)",
            ))  # fmt: skip
        g1, g0 = sch["all"]["goodput_rps"], base["all"]["goodput_rps"]
        checks.append(Check(
            f"{name}: goodput >= 1.5x no_scheduling",
            g1 >= 1.5 * g0,
            f"{g1:.2f} vs {g0:.2f} req/s = {g1 / g0 if g0 else float('inf'):.2f}x",
        ))  # fmt: skip
    print()
    report_checks(checks)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    write_json(
        args.json,
        {
            "benchmark": "overload",
            "capacity_rps": capacity,
            "offered_rps": rate,
            "load": args.load,
            "duration_s": duration,
            "requests": len(plan),
            "slo_s": SLO_S,
            "mix": dict(zip(CLASSES, MIX, strict=True)),
            "engine": {"max_num_seqs": args.max_num_seqs, "ttft_s": args.ttft, "itl_s": args.itl},
            "runs": runs,
        },
        checks,
    )
    return 0 if all(c.ok for c in checks) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--load", type=float, default=2.0, help="offered load / capacity")
    p.add_argument("--duration", type=float, default=None, help="arrival window, seconds")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--ttft", type=float, default=0.05, help="emulator prefill step, s")
    p.add_argument("--itl", type=float, default=0.02, help="emulator decode step, s")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--no-deadline-headers",
        action="store_true",
        help="don't send x-request-deadline-ms (the proxy then uses its class defaults)",
    )
    return run_main(body, p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
