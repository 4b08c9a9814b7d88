"""``serve --workers N``: N real worker processes behind one port, sharing admission limits,
tenant usage and prefix decisions through shared memory, one estimator, one /metrics, and a
clean stop. Against the real emulated engine, over loopback."""

from __future__ import annotations

import asyncio
import glob
import os
import subprocess
import sys

import aiohttp
import pytest

from tests.support.procs import (
    http_get,
    metric_value,
    running,
    start_emulator,
    start_proxy,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def _stream(s: aiohttp.ClientSession, url: str, i: int, tokens: int) -> int:
    body = {"model": "emu", "prompt": f"request {i} " + "x" * 64, "max_tokens": tokens,
            "stream": True}  # fmt: skip
    async with s.post(url + "/v1/completions", json=body) as r:
        await r.read()
        return r.status


def test_admission_limit_holds_across_workers_and_metrics_add_up() -> None:
    """A backend limit of 6 in flight holds across 2 workers (documented slack: one request
    per other worker, when two decide in the same instant), with 40 concurrent streams."""
    emu = start_emulator(ttft=0.02, itl=0.01, max_num_seqs=64)
    with running(emu):
        config = {"backends": [{"url": emu.url, "max_inflight": 6}],
                  "estimator": {"refresh_interval_s": 1.0, "min_records": 10}}  # fmt: skip
        proxy = start_proxy([], config=config, workers=2)
        with running(proxy):

            async def load() -> list[int]:
                async with aiohttp.ClientSession() as s:
                    return await asyncio.gather(*(_stream(s, proxy.url, i, 30) for i in range(40)))

            assert asyncio.run(load()) == [200] * 40
            engine = emu.metrics_text()
            peak = metric_value(engine, "emulator:peak_requests")
            assert 6 <= peak <= 6 + 1, f"engine held {peak} at once; the limit is 6 (+1 slack)"
            text = proxy.metrics_text()
            assert metric_value(text, "rightsizer_requests_total", outcome="ok") == 40
            local = [
                metric_value(http_get(proxy.url + "/metrics?scope=local")[1].decode(),
                             "rightsizer_requests_total")
                for _ in range(8)
            ]  # fmt: skip
            assert all(v < 40 for v in local), f"each worker answers for its own share: {local}"
            # one estimator for both workers: its report covers all 40 requests
            wait_for(lambda: http_get(proxy.url + "/admin/estimator")[0] == 200, timeout_s=30)


def test_stop_leaves_nothing_behind_and_a_busy_port_is_one_line() -> None:
    emu = start_emulator()
    with running(emu):
        proxy = start_proxy([emu.url], workers=2)
        shm_before = set(glob.glob("/dev/shm/rightsizer-*"))
        assert shm_before, "the workers share a segment"
        port = proxy.url.rsplit(":", 1)[1]
        with running(proxy):
            second = subprocess.run(
                [sys.executable, "-m", "proxy", "serve", "--backend", emu.url, "--port", port,
                 "--workers", "2"],
                capture_output=True, text=True, timeout=60,
                env={**os.environ, "RIGHTSIZER_GPU__ENABLED": "false"},
            )  # fmt: skip
            assert second.returncode == 2
            lines = [ln for ln in second.stderr.splitlines() if ln.startswith("rightsizer:")]
            assert len(lines) == 1 and port in lines[0] and "in use" in lines[0], second.stderr
            assert "Traceback" not in second.stderr
        pid = proxy.proc.pid
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout_s=20)
        left = {p for p in glob.glob("/dev/shm/rightsizer-*") if str(pid) in p}
        assert not left, f"segments left after stop: {left}"


def test_a_dead_worker_is_replaced() -> None:
    emu = start_emulator()
    with running(emu):
        proxy = start_proxy([emu.url], workers=2)
        with running(proxy):
            kids = subprocess.run(["pgrep", "-f", "proxy.programs.worker", "-P",
                                   str(proxy.proc.pid)], capture_output=True, text=True)  # fmt: skip
            pids = [int(p) for p in kids.stdout.split()]
            assert len(pids) == 2
            os.kill(pids[0], 9)

            def replaced() -> bool:
                now = subprocess.run(["pgrep", "-f", "proxy.programs.worker", "-P",
                                      str(proxy.proc.pid)], capture_output=True, text=True)  # fmt: skip
                got = {int(p) for p in now.stdout.split()}
                return len(got) == 2 and pids[0] not in got

            wait_for(replaced, timeout_s=20)
            body = {"model": "emu", "prompt": "hi", "max_tokens": 2}

            async def some() -> list[int]:
                async with aiohttp.ClientSession() as s:

                    async def one() -> int:
                        async with s.post(proxy.url + "/v1/completions", json=body) as r:
                            return r.status

                    return await asyncio.gather(*(one() for _ in range(10)))

            wait_for(lambda: http_get(proxy.url + "/ready")[0] == 200, timeout_s=20)
            assert asyncio.run(some()) == [200] * 10
