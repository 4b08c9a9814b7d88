"""Routing quality: prefix-aware routing vs round robin and least loaded, on two real vLLM
CPU servers with prefix caching.

    python3 bench/routing_quality.py              # full run, about 5 minutes
    python3 bench/routing_quality.py --quick      # about 90 s (round_robin and prefix only)
    python3 bench/routing_quality.py --json out.json --concurrency 12 --duration 60

Setup: two vLLM CPU servers (``small84m``, 84M-parameter random Llama, prefix caching on,
block size 128 tokens, ``--max-num-seqs 8``, 1 GiB KV cache each), started once. Before each
policy both engines' prefix caches are emptied (vLLM's ``POST /reset_prefix_cache``,
dev-mode endpoint) and a fresh proxy is started (``--routing POLICY``, default scheduling,
metrics scraped every second), so every policy starts cold and routes with an empty index.

Workload (deterministic, ``--seed``): 4 system prompts of about 1,500 characters
(about 580 tokens), 6 tenants, multi-turn chat sessions of 3-6 turns; each turn sends the
whole conversation so far (system, then user / assistant pairs of about 200 characters each)
plus a new user message, streamed, ``max_tokens`` 16 with ``ignore_eos``. A closed loop of
``--concurrency`` workers (default 12, below the 16 engine slots so the router has a choice;
at 16 or more the proxy's queue hands each freed slot to the next waiter and every policy
degenerates to "wherever a slot is free") each take the next session from the same list and
run its turns back to back (``--think-s``: a pause of 0.5-1.5x that between turns), for
``--duration`` seconds; then in-flight requests finish.

Measured per policy: engine prefix-cache hit rate (delta of ``vllm:prefix_cache_hits_total``
/ ``vllm:prefix_cache_queries_total``, tokens, both engines), client TTFT p50/p99 (send to
first content event through the proxy), throughput (requests/s and completion tokens/s in
the window), requests routed per backend (``rightsizer_routing_decisions_total``) and the
time-averaged in-flight per backend (``rightsizer_backend_inflight_requests`` sampled every
0.25 s); max/min ratios of both. Upper bound: the same loop sent straight to one engine
(hit rate only; a proxy with only that backend, half the duration).

Targets: prefix hit rate within 10% of the upper bound (relative); prefix max/min in-flight
ratio < 1.5; prefix TTFT p50 at least 2x better than round_robin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from common import (
    Check,
    Result,
    Sampler,
    add_common_args,
    by_label,
    client_session,
    http_post,
    pct,
    ratio,
    report_checks,
    run_main,
    scrape,
    stream_chat,
    table,
    write_json,
)

MODEL = "small84m"
WORDS = (  # noqa: SIM905
    "invoice refund account billing policy customer order shipment warranty return "
    "credit payment subscription renewal plan upgrade discount tax region currency "
    "support escalation ticket priority response summary detail record history "
    "balance statement period contract clause notice compliance audit export report "
    "schedule"
).split()


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    tenant: str
    system: str
    turns: tuple[tuple[str, str], ...]  # (user, assistant) per turn


def _text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    n = 0
    while n < chars:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:chars]


def make_sessions(seed: int, n: int, n_systems: int = 4, n_tenants: int = 6) -> list[Session]:
    rng = random.Random(seed)
    systems = [
        f"System prompt {k}: you are assistant number {k}. " + _text(rng, 1500)
        for k in range(n_systems)
    ]
    sessions = []
    for i in range(n):
        turns = tuple(
            (f"[{i}.{t}] " + _text(rng, 200), "Answer: " + _text(rng, 200))
            for t in range(rng.randint(3, 6))
        )
        sessions.append(
            Session(
                f"s{seed}-{i}", f"tenant-{rng.randrange(n_tenants)}", rng.choice(systems), turns
            )
        )
    return sessions


def messages(s: Session, turn: int) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": s.system}]
    for user, assistant in s.turns[:turn]:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    msgs.append({"role": "user", "content": s.turns[turn][0]})
    return msgs


async def closed_loop(
    url: str,
    sessions: list[Session],
    concurrency: int,
    duration_s: float,
    max_tokens: int,
    sampler_url: str | None = None,
    think_s: float = 0.0,
) -> tuple[list[Result], float, dict[str, float], list[float]]:
    """Returns the results, the window length, the mean in-flight per backend and the queue
    depth samples (the last two empty without a sampler)."""
    queue = list(reversed(sessions))
    results: list[Result] = []
    async with client_session() as http:
        sampler = Sampler(sampler_url) if sampler_url else None
        if sampler:
            sampler.start(http)
        t0 = time.perf_counter()
        stop_at = t0 + duration_s

        async def worker() -> None:
            while queue and time.perf_counter() < stop_at:
                s = queue.pop()
                for turn in range(len(s.turns)):
                    if time.perf_counter() >= stop_at:
                        return
                    body = {
                        "model": MODEL,
                        "messages": messages(s, turn),
                        "max_tokens": max_tokens,
                        "ignore_eos": True,
                        "temperature": 0,
                    }
                    hdr = {"x-tenant": s.tenant, "x-session-id": s.sid}
                    r = await stream_chat(http, url, body, hdr)
                    r.tags = {"turn": turn, "end": time.perf_counter() - t0}
                    results.append(r)
                    if think_s > 0:  # a user reading the answer: 0.5x-1.5x think_s
                        await asyncio.sleep(think_s * (0.5 + ((len(results) * 7919) % 1000) / 1000))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        window = time.perf_counter() - t0
        if sampler:
            await sampler.stop()
            return results, window, sampler.mean_inflight(), sampler.queue
        return results, window, {}, []


def engine_counters(urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for u in urls:
        text = scrape(u)
        hits += sum(by_label(text, "vllm:prefix_cache_hits_total", "engine").values())
        queries += sum(by_label(text, "vllm:prefix_cache_queries_total", "engine").values())
    return hits, queries


def reset_caches(urls: list[str]) -> None:
    for u in urls:
        for _ in range(20):  # refused while requests are still running
            with contextlib.suppress(OSError):
                if http_post(u + "/reset_prefix_cache") == 200:
                    break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"could not reset the prefix cache of {u}")


def summarize(results: list[Result], window: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "error_samples": sorted({f"{r.status} {r.error}" for r in results if not r.ok})[:5],
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "req_per_s": len(ok) / window,
        "completion_tok_per_s": sum(r.completion_tokens for r in ok) / window,
        "prompt_tokens_mean": sum(r.prompt_tokens for r in ok) / max(1, len(ok)),
        "window_s": window,
    }


def body(stack: contextlib.ExitStack, args: argparse.Namespace) -> int:
    from tests.support.procs import start_proxy
    from tests.support.real_backends import start_vllm, vllm_available

    if reason := vllm_available(MODEL):
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    quick = args.quick
    duration = args.duration or (10.0 if quick else 60.0)
    policies = (
        args.policies.split(",")
        if args.policies
        else (["round_robin", "prefix"] if quick else ["round_robin", "least_loaded", "prefix"])
    )
    sessions = make_sessions(args.seed, 2000)
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # enables POST /reset_prefix_cache
    t_start = time.perf_counter()
    print(f"starting 2 vLLM servers ({MODEL}, max_num_seqs {args.max_num_seqs}) ...", flush=True)
    with ThreadPoolExecutor(2) as pool:
        futs = [
            pool.submit(start_vllm, MODEL, MODEL, max_num_seqs=args.max_num_seqs) for _ in range(2)
        ]
        engines = []
        for f in futs:
            with contextlib.suppress(Exception):
                engines.append(f.result())
        for e in engines:
            stack.callback(e.stop)
        for f in futs:
            f.result()  # re-raise a start failure
    urls = [e.url for e in engines]
    print(f"engines ready in {time.perf_counter() - t_start:.0f} s: {urls}", flush=True)

    runs: dict[str, dict[str, Any]] = {}
    for policy in policies:
        reset_caches(urls)
        h0, q0 = engine_counters(urls)
        proxy = start_proxy(
            urls,
            config={"health": {"scrape_interval_s": 1.0}, "estimator": {"enabled": False}},
            extra=["--routing", policy],
        )
        try:
            results, window, inflight, qdepth = asyncio.run(
                closed_loop(
                    proxy.url,
                    sessions,
                    args.concurrency,
                    duration,
                    args.max_tokens,
                    proxy.url,
                    args.think_s,
                )
            )
            text = scrape(proxy.url)
        finally:
            proxy.stop()
        h1, q1 = engine_counters(urls)
        routed_by = by_label(text, "rightsizer_routing_decisions_total", "backend")
        reasons: dict[str, float] = {}
        from common import samples

        for labels, v in samples(text, "rightsizer_routing_decisions_total"):
            key = f"{labels.get('backend')}:{labels.get('reason')}"
            reasons[key] = reasons.get(key, 0.0) + v
        s = summarize(results, window)
        s.update(
            hit_rate=(h1 - h0) / max(1.0, q1 - q0),
            prefix_queries_tokens=q1 - q0,
            routed=routed_by,
            routed_ratio=ratio(list(routed_by.values()) + [0.0] * (2 - len(routed_by))),
            inflight_mean=inflight,
            inflight_ratio=ratio(list(inflight.values())),
            queue_depth_mean=sum(qdepth) / max(1, len(qdepth)),
            routing_reasons=reasons,
            loadavg_1m=os.getloadavg()[0],
        )
        runs[policy] = s
        print(
            f"{policy}: {s['ok']} ok / {s['requests']} in {window:.0f} s, hit {s['hit_rate']:.3f}, "
            f"ttft p50 {s['ttft_p50_s']:.3f} s, routed {routed_by}, inflight {inflight}, "
            f"machine load average {s['loadavg_1m']:.1f}",
            flush=True,
        )

    # Upper bound: everything on one engine (a proxy with that one backend, same path).
    reset_caches(urls)
    h0, q0 = engine_counters(urls[:1])
    proxy = start_proxy(
        urls[:1],
        config={"health": {"scrape_interval_s": 1.0}, "estimator": {"enabled": False}},
    )
    try:
        results, window, _, _ = asyncio.run(
            closed_loop(
                proxy.url,
                sessions,
                args.concurrency,
                duration / 2,
                args.max_tokens,
                None,
                args.think_s,
            )
        )
    finally:
        proxy.stop()
    h1, q1 = engine_counters(urls[:1])
    upper = summarize(results, window)
    upper["hit_rate"] = (h1 - h0) / max(1.0, q1 - q0)
    runs["all_on_one"] = upper

    rows = []
    for name, s in runs.items():
        rows.append([
            name, s["requests"], s["errors"], s["hit_rate"], s["ttft_p50_s"], s["ttft_p99_s"],
            s["req_per_s"], s["completion_tok_per_s"],
            "/".join(f"{v:.0f}" for v in s.get("routed", {}).values()) or "-",
            s.get("routed_ratio", float("nan")),
            "/".join(f"{v:.2f}" for v in s.get("inflight_mean", {}).values()) or "-",
            s.get("inflight_ratio", float("nan")),
        ])  # fmt: skip
    print()
    print(
        f"routing quality: 2 x vLLM CPU {MODEL} (max_num_seqs {args.max_num_seqs}), closed loop, "
        f"concurrency {args.concurrency}, think {args.think_s:g} s, {duration:.0f} s per policy, "
        f"max_tokens {args.max_tokens}"
    )
    print(table(
        ["policy", "requests", "errors", "hit rate", "TTFT p50 s", "TTFT p99 s", "req/s",
         "tok/s", "routed", "routed max/min", "in-flight mean", "in-flight max/min"],
        rows,
    ))  # fmt: skip
    for name, s in runs.items():
        if s.get("routing_reasons"):
            print(f"  {name} routing decisions (backend:reason): {s['routing_reasons']}")

    checks: list[Check] = []
    if "prefix" in runs:
        p, ub = runs["prefix"], runs["all_on_one"]
        checks.append(Check(
            "prefix hit rate within 10% of all-on-one upper bound",
            p["hit_rate"] >= 0.9 * ub["hit_rate"],
            f"prefix {p['hit_rate']:.3f} vs upper bound {ub['hit_rate']:.3f}"
            f" (>= {0.9 * ub['hit_rate']:.3f} needed)",
        ))  # fmt: skip
        checks.append(Check(
            "prefix max/min time-averaged in-flight < 1.5",
            p["inflight_ratio"] < 1.5,
            f"{p['inflight_ratio']:.2f} (means {p['inflight_mean']}; routed {p['routed']})",
        ))  # fmt: skip
        if "round_robin" in runs:
            rr = runs["round_robin"]
            checks.append(Check(
                "prefix TTFT p50 >= 2x better than round_robin",
                rr["ttft_p50_s"] >= 2 * p["ttft_p50_s"],
                f"round_robin {rr['ttft_p50_s']:.3f} s / prefix {p['ttft_p50_s']:.3f} s"
                f" = {rr['ttft_p50_s'] / p['ttft_p50_s']:.2f}x",
            ))  # fmt: skip
    print()
    report_checks(checks)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    write_json(
        args.json,
        {
            "benchmark": "routing_quality",
            "model": MODEL,
            "max_num_seqs": args.max_num_seqs,
            "concurrency": args.concurrency,
            "duration_s": duration,
            "max_tokens": args.max_tokens,
            "think_s": args.think_s,
            "runs": runs,
        },
        checks,
    )
    return 0 if all(c.ok for c in checks) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--duration", type=float, default=None, help="seconds per policy")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--think-s",
        type=float,
        default=0.0,
        help="pause between a session's turns (0.5x-1.5x this), default 0: back to back",
    )
    p.add_argument("--policies", default=None, help="comma list (default: all three)")
    return run_main(body, p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
