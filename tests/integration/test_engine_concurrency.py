"""A drop-in must never lower the engine's throughput (issue 13): in front of a real vLLM CPU
server started with ``max_num_seqs`` above the proxy's starting limit (64), with no limit
configured, the proxy learns the engine's concurrency from its own /metrics, so the engine's
running count reaches its limit, and throughput through the proxy matches direct.

Throughput is compared on passes that alternate direct and proxied (D P D), each proxied pass
against the mean of the direct passes around it: the host's speed drifts, and a pass whose
direct neighbours differ by more than 25% is repeated (the machine, not the proxy).
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


async def _pass(url: str, seconds: float, engine: str) -> tuple[float, float]:
    """Closed loop of CLIENTS streams for ``seconds``: (completion tokens/s, the engine's
    highest running count seen, sampled every 0.2 s)."""
    body = {"model": "tiny-96", "prompt": "The weather in the mountains is", "max_tokens": TOKENS,
            "ignore_eos": True, "stream": False}  # fmt: skip
    done_tokens = 0
    peak = 0.0
    stop = time.monotonic() + seconds

    async def client(s: aiohttp.ClientSession) -> None:
        nonlocal done_tokens
        while time.monotonic() < stop:
            async with s.post(url + "/v1/completions", json=body) as r:
                data = await r.json()
                assert r.status == 200, data
                if time.monotonic() < stop:
                    done_tokens += data["usage"]["completion_tokens"]

    async def sample(s: aiohttp.ClientSession) -> None:
        nonlocal peak
        while time.monotonic() < stop:
            async with s.get(engine + "/metrics") as r:
                peak = max(peak, metric_value(await r.text(), "vllm:num_requests_running"))
            await asyncio.sleep(0.2)

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        started = time.monotonic()
        await asyncio.gather(sample(s), *(client(s) for _ in range(CLIENTS)))
        return done_tokens / (time.monotonic() - started), peak


def test_proxy_learns_the_engines_concurrency_and_keeps_its_throughput(
    vllm96: RunningServer,
) -> None:
    config = {"health": {"scrape_interval_s": 1.0}, "estimator": {"enabled": False}}
    proxy = start_proxy([vllm96.url], config=config)
    with running(proxy):
        # warm: the proxy starts at 64 in flight and learns from the engine's queue
        asyncio.run(_pass(proxy.url, 12.0, vllm96.url))
        limits = metric_value(proxy.metrics_text(), "rightsizer_backend_inflight_limit")
        assert limits >= ENGINE_SEQS, f"the learned limit is {limits}"
        for _attempt in range(3):
            d1, peak_d1 = asyncio.run(_pass(vllm96.url, 10.0, vllm96.url))
            p, peak = asyncio.run(_pass(proxy.url, 10.0, vllm96.url))
            d2, peak_d2 = asyncio.run(_pass(vllm96.url, 10.0, vllm96.url))
            if abs(d1 - d2) / max(d1, d2) <= 0.25:
                break
        direct, direct_peak = (d1 + d2) / 2, max(peak_d1, peak_d2)
        print(f"direct {d1:.0f}/{d2:.0f} tok/s peak {peak_d1}/{peak_d2}; proxy {p:.0f} peak {peak}")
        assert peak >= min(0.9 * ENGINE_SEQS, 0.9 * direct_peak), (
            f"engine ran at most {peak} sequences through the proxy, {direct_peak} direct"
        )
        assert p >= 0.85 * direct, f"through the proxy {p:.0f} tok/s, direct {direct:.0f} tok/s"
