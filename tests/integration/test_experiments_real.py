"""Experiments on real engines (issue 15, "Prove it on real engines"): a real vLLM CPU server
and a real llama-server serving the same tiny model (as ``tiny``) as two groups behind the
proxy.

* canary: the measured split matches the weight within a binomial bound;
* shadow: in one run, blocks with shadow copies on and off alternate; in the "off" blocks the
  test itself sends the same copies to the candidate at the same moments, so the candidate
  engine works alike in both arms (on this VM one engine's work slows the other down through
  the shared host: with the candidate on its own vCPU, in the idle class, the baseline's TTFT
  still doubled while it computed, and the proxy's own CPU grew by 2% of a core), and what
  differs is the proxy mirroring them; the client-visible TTFT with shadow on is not worse
  than with it off, no client ever gets a shadow answer (each
  client saw vLLM's token counts, never llama-server's, which count the same chat
  differently), and every copy is accounted for (answered or counted as dropped);
* rollback: the candidate starts answering 503 (a fault injector in front of llama-server); it
  is rolled back within the window while every client request succeeds (the failed attempts
  are retried on the baseline before their first byte);
* drift: the two servers put in one group announce different versions of ``tiny``.

The engines get a core each (vLLM's worker on core 0, llama-server with one thread on core 1,
at the lowest priority: on its own hardware a candidate would not take CPU from the baseline's
API server, the proxy or the client, which share the machine here).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from estimator.abtest import compare_quantiles
from tests.support import openloop as ol
from tests.support.procs import (
    Proc,
    http_get,
    metric_value,
    read_records,
    set_fault,
    start_fault_proxy,
    start_proxy,
    wait_for,
)
from tests.support.real_backends import (
    RunningServer,
    llama_available,
    pin,
    require,
    start_llama_server,
    start_vllm,
    vllm_available,
)

pytestmark = [pytest.mark.integration, pytest.mark.real_backend]
MODEL = "tiny"


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[RunningServer, RunningServer]]:
    require(vllm_available(), "a real backend is missing")
    require(llama_available(), "a real backend is missing")
    cores = sorted(os.sched_getaffinity(0))
    bind = {"VLLM_CPU_OMP_THREADS_BIND": str(cores[0])}
    with (
        start_vllm(served_name=MODEL, env=bind) as v,
        start_llama_server(served_name=MODEL, threads=1) as llama,
    ):
        # the candidate gets only what the baseline's processes leave: on its own hardware
        # it would not slow the baseline's API server, the proxy or the client down
        pin(llama.pid, {cores[-1]}, idle=True)
        yield v, llama


def config(base: str, cand: str, **experiment: Any) -> dict[str, Any]:
    return {
        "backends": [{"url": base, "name": "vllm"}, {"url": cand, "name": "llama"}],
        "groups": [{"name": "vllm", "backends": ["vllm"], "engine": "vllm", "gpu": "cpu"},
                   {"name": "llamacpp", "backends": ["llama"], "engine": "llamacpp",
                    "gpu": "cpu"}],
        "experiments": [{"name": "engines", "baseline": "vllm", "candidate": "llamacpp",
                         **experiment}],
        "health": {"interval_s": 1.0, "scrape_interval_s": 2.0},
        "estimator": {"enabled": False},
    }  # fmt: skip


def run(proxy: Proc, n: int, rate: float, seed: int, copies_to: str | None = None,
        **kw: Any) -> list[ol.Sent]:  # fmt: skip
    """``n`` chat requests through the proxy; with ``copies_to``, the same requests sent to that
    engine too, at the same moments (the test's own stand-in for shadow copies)."""
    bodies = ol.chat_requests(n, np.random.default_rng(seed), words=(8, 30), output=(8, 16))

    async def both() -> list[ol.Sent]:
        main = ol.run_poisson(proxy.url, MODEL, bodies, rate, np.random.default_rng(seed), **kw)
        if copies_to is None:
            return await main
        copies = ol.run_poisson(copies_to, MODEL, bodies, rate, np.random.default_rng(seed))
        sent, _ = await asyncio.gather(main, copies)
        return sent

    return asyncio.run(both())


def experiment(proxy: Proc) -> dict[str, Any]:
    status, body = http_get(proxy.url + "/admin/experiments")
    assert status == 200, body
    return orjson.loads(body)["experiments"][0]  # type: ignore[no-any-return]


def set_shadow(proxy: Proc, share: float) -> None:
    import urllib.request

    req = urllib.request.Request(proxy.url + "/admin/experiments/engines",
                                 data=orjson.dumps({"shadow": share}), method="POST")  # fmt: skip
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200


def test_canary_split_matches_the_weight(
    engines: tuple[RunningServer, RunningServer], tmp_path: Path
) -> None:
    vllm, llama = engines
    log = tmp_path / "requests.jsonl"
    weight, n = 0.25, 240
    proxy = start_proxy([], config=config(vllm.url, llama.url, weight=weight), request_log=log)
    try:
        sent = run(proxy, n, 12.0, seed=1)
        assert all(r.ok for r in sent), [r.error for r in sent if not r.ok][:3]
        wait_for(lambda: len(read_records(log)) >= n, 10)
        groups = [r["group"] for r in read_records(log)]
        to_cand = groups.count("llamacpp")
        sd = math.sqrt(n * weight * (1 - weight))
        print(f"canary split: {to_cand}/{n} = {to_cand / n:.3f} to the candidate at weight "
              f"{weight} (expected {n * weight:.0f} +- {sd:.1f}, z = "
              f"{(to_cand - n * weight) / sd:+.2f})")  # fmt: skip
        assert abs(to_cand - n * weight) <= 3.29 * sd  # two-sided 99.9%
        assert groups.count("vllm") == n - to_cand
    finally:
        proxy.stop()


def test_shadow_adds_no_client_latency_and_never_reaches_a_client(
    engines: tuple[RunningServer, RunningServer], tmp_path: Path
) -> None:
    vllm, llama = engines
    log = tmp_path / "requests.jsonl"
    proxy = start_proxy([], config=config(vllm.url, llama.url, weight=0.0,
                                          shadow={"share": 0.0}), request_log=log)  # fmt: skip
    try:
        run(proxy, 20, 10.0, seed=2)  # warm both paths
        blocks: dict[bool, list[ol.Sent]] = {False: [], True: []}
        for i in range(12):  # off, on, off, on, ... in 2.5 s blocks: drift hits both
            on = i % 2 == 1
            set_shadow(proxy, 1.0 if on else 0.0)
            # off: this client sends the same copies to the candidate at the same moments, so
            # the candidate engine works alike in both arms (on this VM its work slows the
            # baseline engine down through the shared host); what differs is the proxy
            blocks[on] += run(proxy, 20, 8.0, seed=10 + i, copies_to=None if on else llama.url)
        set_shadow(proxy, 0.0)
        sent = blocks[False] + blocks[True]
        assert all(r.ok for r in sent), [r.error for r in sent if not r.ok][:3]
        ttft = {on: [r.ttft for r in blocks[on] if r.ttft is not None] for on in blocks}
        p50, p95 = compare_quantiles(ttft[False], ttft[True], (0.5, 0.95))
        print(f"client TTFT with shadow off / on: p50 {p50.baseline * 1e3:.1f} / "  # type: ignore[operator]
              f"{p50.candidate * 1e3:.1f} ms (difference 95% CI {p50.difference_low * 1e3:+.1f} "  # type: ignore[operator]
              f"to {p50.difference_high * 1e3:+.1f} ms), p95 {p95.baseline * 1e3:.1f} / "  # type: ignore[operator]
              f"{p95.candidate * 1e3:.1f} ms (CI {p95.difference_low * 1e3:+.1f} to "  # type: ignore[operator]
              f"{p95.difference_high * 1e3:+.1f} ms); {len(ttft[False])} / {len(ttft[True])} "  # type: ignore[operator]
              "requests")  # fmt: skip
        _where_the_time_went(log, blocks)
        # not worse: no evidence (95% bootstrap CI) of a p50 more than 10% + 2 ms worse, or of
        # a p95 more than 25% + 5 ms worse, with shadow copies on
        assert p50.difference_low <= 0.10 * p50.baseline + 0.002  # type: ignore[operator]
        assert p95.difference_low <= 0.25 * p95.baseline + 0.005  # type: ignore[operator]
        # every copy answered or counted as dropped; no client saw a shadow answer
        exp = experiment(proxy)
        wait_for(lambda: sum(experiment(proxy)["shadow"].values()) >= len(blocks[True]), 20)
        exp = experiment(proxy)
        assert sum(exp["shadow"].values()) == len(blocks[True]), exp["shadow"]
        wait_for(lambda: sum(r["shadow"] for r in read_records(log)) >= exp["shadow"]["ok"], 10)
        recs = read_records(log)
        live = {r["request_id"]: r for r in recs if not r["shadow"]}
        shadow = {r["request_id"]: r for r in recs if r["shadow"]}
        assert len(shadow) == exp["shadow"].get("ok", 0) + exp["shadow"].get("error", 0)
        assert len(shadow) >= 0.9 * len(blocks[True]), exp["shadow"]
        differ = 0
        for r in blocks[True]:
            rec, copy = live[str(r.request_id)], shadow.get(str(r.request_id))
            assert rec["group"] == "vllm" and r.prompt_tokens == rec["prompt_tokens"]
            if copy is not None and copy["prompt_tokens"] != rec["prompt_tokens"]:
                differ += 1
                assert r.prompt_tokens != copy["prompt_tokens"], "a client got a shadow answer"
        assert differ > 0, "the engines counted alike: the check above proves nothing"
        text = proxy.metrics_text()
        assert metric_value(text, "rightsizer_requests_total") == len(sent) + 20
    finally:
        proxy.stop()


def _where_the_time_went(log: Path, blocks: dict[bool, list[ol.Sent]]) -> None:
    n = sum(map(len, blocks.values()))
    wait_for(lambda: sum(not r["shadow"] for r in read_records(log)) >= n, 10)
    live = {r["request_id"]: r for r in read_records(log) if not r["shadow"]}
    for on, sent in blocks.items():
        recs = [live[str(s.request_id)] for s in sent]
        engine = np.median([r["first_token_s"] - r["dispatch_s"] for r in recs])
        queue = np.median([r["dispatch_s"] - r["arrival_s"] for r in recs])
        proxy_ttft = np.median([r["first_token_s"] - r["arrival_s"] for r in recs])
        print(
            f"shadow {'on ' if on else 'off'}: proxy TTFT p50 {proxy_ttft * 1e3:.1f} ms "
            f"(queue {queue * 1e3:.2f}, engine {engine * 1e3:.1f})"
        )


def test_failing_candidate_is_rolled_back_and_no_request_is_lost(
    engines: tuple[RunningServer, RunningServer], tmp_path: Path
) -> None:
    vllm, llama = engines
    fault = start_fault_proxy(llama.url)
    log = tmp_path / "requests.jsonl"
    window = 20.0
    proxy = start_proxy([], config=config(vllm.url, fault.url, weight=0.5, rollback={
        "window_s": window, "min_samples": 5, "interval_s": 0.5}), request_log=log)  # fmt: skip
    try:
        healthy = run(proxy, 60, 10.0, seed=3)
        set_fault(fault, mode="error", status=503)
        t_fault = time.monotonic()
        failing = run(proxy, 150, 10.0, seed=4)
        wait_for(lambda: experiment(proxy)["state"] == "rolled_back", window)
        exp = experiment(proxy)
        took = exp["rolled_back"]["at_epoch"] - (time.time() - (time.monotonic() - t_fault))
        print(f"rollback {took:.1f} s after the candidate began failing (window {window:g} s), "
              f"reason {exp['rolled_back']['reason']}: {exp['rolled_back']['numbers']}")  # fmt: skip
        assert 0 < took <= window
        after = run(proxy, 40, 10.0, seed=5)
        lost = [r for r in healthy + failing + after if not r.ok]
        assert not lost, [r.error for r in lost][:3]
        recs = read_records(log)
        late = [r for r in recs if r["group"] == "llamacpp"
                and r["arrival_epoch"] > exp["rolled_back"]["at_epoch"] + 1.0]  # fmt: skip
        assert not late, "the candidate still got traffic after the rollback"
        retried = sum(1 for r in recs if r["attempts"] == 2 and r["group"] == "vllm")
        print(f"{len(healthy + failing + after)} client requests, none lost; {retried} retried "
              "from the failing candidate onto the baseline")  # fmt: skip
        assert metric_value(proxy.metrics_text(), "rightsizer_experiment_rollbacks_total") == 1
    finally:
        proxy.stop()
        fault.stop()


def test_two_engines_in_one_group_are_version_drift(
    engines: tuple[RunningServer, RunningServer],
) -> None:
    vllm, llama = engines
    cfg = {"backends": [{"url": vllm.url, "name": "vllm"}, {"url": llama.url, "name": "llama"}],
           "groups": [{"name": "fleet", "backends": ["vllm", "llama"]}],
           "estimator": {"enabled": False}}  # fmt: skip
    proxy = start_proxy([], config=cfg)
    try:
        wait_for(lambda: metric_value(proxy.metrics_text(), "rightsizer_model_version_drift",
                                      group="fleet", model=MODEL) == 1, 10)  # fmt: skip
    finally:
        proxy.stop()
