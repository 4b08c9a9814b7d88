"""``rightsizer gpu-exporter``: this node's GPU samples as ``rightsizer_gpu_*`` metrics, for a
node that runs an engine but no proxy. The proxy reads them through
``backends[].gpu_metrics_url`` into that backend's snapshots (measured vs predicted memory).
Without NVIDIA GPUs it serves an empty /metrics and says so once in its log."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.gpu import GpuSampler
from proxy.telemetry import StateCollector, gpu_families, metrics_handler


def build_exporter_app(interval_s: float, sampler: GpuSampler | None = None) -> web.Application:
    gpu = sampler or GpuSampler()
    registry = CollectorRegistry()
    registry.register(StateCollector(lambda: gpu_families(gpu.last)))

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "gpus": len(gpu.last), "nvml": gpu.available})

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(gpu.run(interval_s))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(registry))
    app.router.add_get("/health", health)
    app.cleanup_ctx.append(lifetime)
    return app
