"""The emulated engine's per-request API cost: a serial stage and a parallel rest, taken from
the timing model it emulates (a ``StepModel`` from an engine profile)."""

from __future__ import annotations

import asyncio

from estimator.engine import StepModel
from proxy.programs.emulator import EmulatorConfig, Engine, FixedPace

STEP = StepModel(overhead_s=0.01, prefill_s_per_token=1e-5, decode_s_per_seq=1e-5,
                 kv_s_per_token=1e-8, request_overhead_s=0.03, api_service_s=0.01)  # fmt: skip


async def test_requests_queue_for_the_api_servers_serial_stage() -> None:
    engine = Engine(EmulatorConfig(), STEP)
    assert (engine.api_service_s, round(engine.api_parallel_s, 9)) == (0.01, 0.02)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    done: list[float] = []

    async def one() -> None:
        await engine.front()
        done.append(loop.time() - t0)

    await asyncio.gather(*(one() for _ in range(4)))
    # the k-th request waits for k serial slots, then its parallel rest (sleeps never end
    # early; the loop's clock resolution is about a millisecond)
    for k, at in enumerate(sorted(done), start=1):
        assert at >= k * 0.01 + 0.02 - 0.002


async def test_time_scale_and_models_without_an_api_cost() -> None:
    fast = Engine(EmulatorConfig(time_scale=10.0), STEP)
    assert round(fast.api_service_s, 9) == 0.001 and round(fast.api_parallel_s, 9) == 0.002
    plain = Engine(EmulatorConfig(), FixedPace())
    assert plain.api_service_s == plain.api_parallel_s == 0.0
    await plain.front()  # no wait at all
