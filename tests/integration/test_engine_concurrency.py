"""A drop-in must never lower the engine's throughput (issue 13): in front of a real vLLM CPU
server started with ``max_num_seqs`` above the proxy's starting limit (64), with no limit
configured, the proxy learns the engine's concurrency from its own /metrics and keeps the
engine's batch full.

Judged on the engine's running count (sampled every 0.2 s from its /metrics) in passes that
alternate direct and proxied (D P D): through the proxy, its peak must reach 0.9 x
``max_num_seqs`` (a proxy stuck at its starting limit never does) and its mean at least 0.7 of
the direct passes'. The proxy leaves the engine a small queue (``engine_waiting_high``) where
128 direct clients leave it 32, so when a wave of equal-length requests ends together the
engine runs lighter until the replacements arrive: the ratio measured 0.37-0.94 over 15
triples here, median about 0.8. Throughput follows from the batch; it is printed, not gated
on: on this 2-core host the same direct pass ran at 1,192 to 5,276 tokens/s within one run.
A triple that misses is repeated (up to four). Every answer through the proxy must be a 200;
a connection the engine's own server closes on a direct pass is retried (not under test).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.support.procs import metric_value, running, start_proxy
from tests.support.real_backends import RunningServer, require, start_vllm, vllm_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.real_backend,
    pytest.mark.slow,
    pytest.mark.timeout(900),
]

ENGINE_SEQS = 96
CLIENTS = 128
TOKENS = 48


@pytest.fixture(scope="module")
def vllm96() -> RunningServer:
    require(vllm_available(), "vLLM")
    server = start_vllm(served_name="tiny-96", max_num_seqs=ENGINE_SEQS)
    yield server  # type: ignore[misc]
    server.stop()


async def _pass(
    url: str, seconds: float, engine: str, failures: list[str]
) -> tuple[float, float, float]:
    """Closed loop of CLIENTS streams for ``seconds``: (completion tokens/s, the engine's
    highest and mean running count, sampled every 0.2 s). Failed answers go to ``failures``."""
    body = {"model": "tiny-96", "prompt": "The weather in the mountains is", "max_tokens": TOKENS,
            "ignore_eos": True, "stream": False}  # fmt: skip
    done_tokens = 0
    stop = time.monotonic() + seconds

    async def client(s: aiohttp.ClientSession) -> None:
        nonlocal done_tokens
        while time.monotonic() < stop:
            sent = time.monotonic()
            try:
                async with s.post(url + "/v1/completions", json=body) as r:
                    data = await r.json()
            except aiohttp.ServerDisconnectedError:
                if url == engine:
                    continue  # the engine's own server closed a connection: not under test
                failures.append(f"{url}: disconnected after {time.monotonic() - sent:.1f}s")
                continue
            if r.status != 200:
                failures.append(f"{url}: {r.status} after {time.monotonic() - sent:.1f}s "
                                f"{data} (x-request-id {r.headers.get('x-request-id')})")  # fmt: skip
            elif time.monotonic() < stop:
                done_tokens += data["usage"]["completion_tokens"]

    running: list[float] = []

    async def sample(s: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop:
            async with s.get(engine + "/metrics") as r:
                running.append(metric_value(await r.text(), "vllm:num_requests_running"))
            await asyncio.sleep(0.2)

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        started = time.monotonic()
        await asyncio.gather(sample(s), *(client(s) for _ in range(CLIENTS)))
        rate = done_tokens / (time.monotonic() - started)
        return rate, max(running, default=0.0), sum(running) / max(len(running), 1)


def test_proxy_learns_the_engines_concurrency_and_keeps_its_batch_full(
    vllm96: RunningServer,
) -> None:
    config = {"health": {"scrape_interval_s": 1.0}, "estimator": {"enabled": False}}
    proxy = start_proxy([vllm96.url], config=config)
    failures: list[str] = []
    with running(proxy):
        # warm: the proxy starts at 64 in flight and learns from the engine's queue (two
        # queueing scrapes in a row; on a slow host a 12 s pass may not hold them)
        for _ in range(3):
            asyncio.run(_pass(proxy.url, 12.0, vllm96.url, failures))
            limits = metric_value(proxy.metrics_text(), "rightsizer_backend_inflight_limit")
            if limits >= ENGINE_SEQS:
                break
        assert limits >= ENGINE_SEQS, f"the learned limit is {limits} after three warm passes"
        rows, met = [], False
        for attempt in range(4):
            d1, peak_d1, mean_d1 = asyncio.run(_pass(vllm96.url, 10.0, vllm96.url, failures))
            p, peak, mean = asyncio.run(_pass(proxy.url, 10.0, vllm96.url, failures))
            d2, peak_d2, mean_d2 = asyncio.run(_pass(vllm96.url, 10.0, vllm96.url, failures))
            direct_peak, direct_mean = max(peak_d1, peak_d2), (mean_d1 + mean_d2) / 2
            limit = metric_value(proxy.metrics_text(), "rightsizer_backend_inflight_limit")
            rows.append(f"attempt {attempt}: engine running mean/peak direct {mean_d1:.1f}/"
                        f"{peak_d1:.0f}, {mean_d2:.1f}/{peak_d2:.0f}; through the proxy "
                        f"{mean:.1f}/{peak:.0f} (learned limit {limit:.0f}); tokens/s direct "
                        f"{d1:.0f}, {d2:.0f}, through the proxy {p:.0f}")  # fmt: skip
            if peak >= min(0.9 * ENGINE_SEQS, 0.9 * direct_peak) and mean >= 0.7 * direct_mean:
                met = True
                break
        report = "\n".join(rows)
        print(report)
        logs = f"proxy log:\n{proxy.log_tail(30)}\nengine log:\n{vllm96.log_tail(30)}"
        assert not failures, f"{len(failures)} failed: {failures[:5]}\n{logs}"
        assert met, f"the engine was not kept full through the proxy in any attempt:\n{report}"
