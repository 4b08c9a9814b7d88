"""Shared-state overhead: one proxy replica with in-memory state vs the same proxy with
``--redis-url`` (state synced through a local redis-server), in front of a fast emulator.

    python3 bench/shared_state_overhead.py              # full run, about 2 minutes
    python3 bench/shared_state_overhead.py --quick      # about 40 s
    python3 bench/shared_state_overhead.py --json out.json --concurrency 32 --passes 5

Setup: one emulated engine (``rightsizer emulate --ttft 0 --itl 0 --max-num-seqs 256``: as
fast as it can go), a ``redis-server`` of our own (``--port P --save '' --appendonly no``,
killed at the end) and two proxies running side by side, both default config (prefix
routing, scheduling on, estimator off): ``mem`` (local state) and ``redis``
(``--redis-url redis://127.0.0.1:P/0``; checked to be connected: ``rightsizer_shared_state_up``
1 and its keys present in Redis). Load: a closed loop of ``--concurrency`` streamed chat
requests (16 tokens, a 1,000-character prompt so prefix blocks are hashed and shared),
one pass at a time, alternating mem / redis (mem redis mem redis ...) after a warm-up pass
of each; per pass requests/s, the client-measured end-to-end latency p50/p99 and the proxy's
CPU per request (utime + stime from ``/proc/<pid>/stat`` over the pass). Reported:
the median over passes of each, and the ratios redis / mem (throughput, latency) plus the
added latency (median of per-pair differences).

Everything it starts is stopped at the end, on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    Check,
    add_common_args,
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
PROMPT = ("Explain how the shared state keeps replicas consistent under load. " * 15)[:1000]


def cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def closed_pass(
    url: str, concurrency: int, seconds: float, tokens: int, pid: int | None = None
) -> dict[str, Any]:
    lat: list[float] = []
    cpu0 = cpu_s(pid) if pid else 0.0
    errors = 0
    async with client_session() as http:
        stop_at = time.perf_counter() + seconds
        t0 = time.perf_counter()

        async def worker(i: int) -> None:
            nonlocal errors
            n = 0
            while time.perf_counter() < stop_at:
                body = {
                    "model": MODEL,
                    # a shared prefix plus a per-request tail: hashed, routed, indexed, synced
                    "messages": [{"role": "user", "content": f"{PROMPT} worker {i} request {n}"}],
                    "max_tokens": tokens,
                    "ignore_eos": True,
                }
                n += 1
                r = await stream_chat(http, url, body, {"x-tenant": f"t{i % 4}"})
                if r.ok:
                    lat.append(r.e2e)
                else:
                    errors += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        span = time.perf_counter() - t0
    cpu = (cpu_s(pid) - cpu0) if pid else 0.0
    return {
        "proxy_cpu_ms_per_req": 1000 * cpu / max(1, len(lat)),
        "requests": len(lat),
        "errors": errors,
        "rps": len(lat) / span,
        "p50_s": pct(lat, 50),
        "p99_s": pct(lat, 99),
    }


def start_redis(stack: contextlib.ExitStack) -> int:
    from tests.support.procs import free_port

    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found on PATH")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="rightsizer-bench-redis-")
    log = Path(workdir) / "redis.log"
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir, "--logfile", str(log)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip

    def stop() -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    stack.callback(stop)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        with contextlib.suppress(redis.exceptions.ConnectionError):
            if client.ping():
                return port
        time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not answer; log {log}")


def body(stack: contextlib.ExitStack, args: argparse.Namespace) -> int:
    import redis

    from tests.support.procs import start_emulator, start_proxy

    quick = args.quick
    passes = args.passes or (3 if quick else 7)
    seconds = args.seconds or (4.0 if quick else 8.0)
    t_start = time.perf_counter()
    emu = start_emulator(MODEL, ttft=0.0, itl=0.0, max_num_seqs=256)
    stack.callback(emu.stop)
    port = start_redis(stack)
    cfg = {"estimator": {"enabled": False}}
    mem = start_proxy([emu.url], config=cfg)
    stack.callback(mem.stop)
    rds = start_proxy([emu.url], config=cfg, extra=["--redis-url", f"redis://127.0.0.1:{port}/0"])
    stack.callback(rds.stop)
    proxies = {"mem": mem, "redis": rds}

    for p in proxies.values():  # a warm-up pass each (connections, caches)
        asyncio.run(closed_pass(p.url, args.concurrency, 2.0, args.tokens))
    up = sum(v for _, v in samples(scrape(rds.url), "rightsizer_shared_state_up"))
    keys = sorted(k.decode() for k in redis.Redis(port=port).keys("*"))
    print(f"redis proxy: rightsizer_shared_state_up={up:g}, redis keys: {keys[:8]}", flush=True)

    results: dict[str, list[dict[str, Any]]] = {"mem": [], "redis": []}
    for i in range(passes):
        for name in ("mem", "redis"):
            p = proxies[name]
            r = asyncio.run(closed_pass(p.url, args.concurrency, seconds, args.tokens, p.proc.pid))
            results[name].append(r)
            print(
                f"pass {i + 1}/{passes} {name}: {r['rps']:.0f} req/s, "
                f"p50 {r['p50_s'] * 1000:.1f} ms, "
                f"p99 {r['p99_s'] * 1000:.1f} ms, "
                f"proxy CPU {r['proxy_cpu_ms_per_req']:.3f} ms/req, "
                f"errors {r['errors']}",
                flush=True,
            )
    stream_len = redis.Redis(port=port).xlen("rightsizer:records") if up else 0

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    summary = {
        n: {k: med(n, k) for k in ("rps", "p50_s", "p99_s", "proxy_cpu_ms_per_req")}
        for n in results
    }
    added = {
        k: statistics.median(
            b[k] - a[k] for a, b in zip(results["mem"], results["redis"], strict=True)
        )
        for k in ("p50_s", "p99_s")
    }
    errors = sum(r["errors"] for rs in results.values() for r in rs)
    print()
    print(
        f"shared state overhead: 1 proxy replica, emulator ttft 0 / itl 0, closed loop "
        f"{args.concurrency} streams x {args.tokens} tokens, {passes} alternating passes of "
        f"{seconds:g} s each, medians"
    )
    m, r = summary["mem"], summary["redis"]
    print(table(
        ["state", "req/s", "latency p50 ms", "latency p99 ms", "proxy CPU ms/req"],
        [["in-memory", m["rps"], m["p50_s"] * 1000, m["p99_s"] * 1000, m["proxy_cpu_ms_per_req"]],
         ["redis", r["rps"], r["p50_s"] * 1000, r["p99_s"] * 1000, r["proxy_cpu_ms_per_req"]],
         ["redis / in-memory", r["rps"] / m["rps"], r["p50_s"] / m["p50_s"],
          r["p99_s"] / m["p99_s"], r["proxy_cpu_ms_per_req"] / m["proxy_cpu_ms_per_req"]],
         ["added (median of pair diffs)", "-", added["p50_s"] * 1000, added["p99_s"] * 1000,
          "-"]],
    ))  # fmt: skip
    print(f"records stream length after the run: {stream_len}")
    checks = [
        Check(
            "redis replica connected", up == 1 and bool(keys), f"state_up={up:g}, {len(keys)} keys"
        ),
        Check("no errors", errors == 0, f"{errors} errors"),
        Check(
            "redis throughput >= 90% of in-memory",
            r["rps"] >= 0.9 * m["rps"],
            f"{r['rps'] / m['rps']:.3f}",
        ),
        Check(
            "redis added p50 latency <= 10% of in-memory p50",
            added["p50_s"] <= 0.1 * m["p50_s"],
            f"{added['p50_s'] * 1000:+.2f} ms on {m['p50_s'] * 1000:.2f} ms",
        ),
    ]
    print()
    report_checks(checks)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    write_json(
        args.json,
        {
            "benchmark": "shared_state_overhead",
            "concurrency": args.concurrency,
            "tokens": args.tokens,
            "passes": passes,
            "pass_s": seconds,
            "summary": summary,
            "added_latency_s": added,
            "records_stream_len": stream_len,
            "passes_raw": results,
        },
        checks,
    )
    return 0 if all(c.ok for c in checks) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--passes", type=int, default=None, help="pairs of passes (mem, redis)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per pass")
    return run_main(body, p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
