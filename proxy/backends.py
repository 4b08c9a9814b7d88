"""Backends: health, discovered models, passive ejection, in-flight accounting, /metrics scraping.

Each backend has one background task that, on its own timers, checks ``/health`` (falling back
to ``/v1/models`` when the server has no ``/health``), refreshes the served models and scrapes
``/metrics`` into an immutable ``BackendSnapshot`` (parsed in a worker thread: vLLM's exposition
text is large). Passive ejection: ``unhealthy_after`` consecutive upstream failures take a
backend out for at least ``eject_s``; the next successful active check brings it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

import aiohttp
import orjson

from estimator.records import BackendSnapshot, GpuSample

from .config import BackendConfig, HealthConfig
from .dialects import parse_metrics
from .gpu import samples_from_metrics
from .telemetry import GaugeRow, Metrics

log = logging.getLogger("rightsizer.backends")


class Backend:
    """Mutable state of one backend, owned by the event loop."""

    __slots__ = (
        "_models_discovered",
        "config",
        "consecutive_failures",
        "default_limit",
        "dialect",
        "ejected_until",
        "healthy",
        "inflight",
        "inflight_tokens",
        "learned_limit",
        "models",
        "name",
        "remote_inflight",
        "snapshot",
        "url",
    )

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.name = config.name
        self.url = config.url.rstrip("/")
        self.models: frozenset[str] = frozenset(config.models)
        self._models_discovered = bool(config.models)
        self.healthy = False  # until the first check passes
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.inflight = 0  # this replica's requests upstream
        self.inflight_tokens = 0
        self.remote_inflight = 0  # other replicas' (shared state), 0 when running alone
        self.default_limit = 64
        self.learned_limit: int | None = None  # engine concurrency seen while it queued
        self.dialect: str | None = None if config.dialect == "auto" else config.dialect
        self.snapshot: BackendSnapshot | None = None

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    @property
    def limit(self) -> int:
        """Requests in flight at most: config, else the engine's max_num_seqs when exposed, else
        the concurrency the engine was seen running at while it queued, else the default."""
        if self.config.max_inflight is not None:
            return self.config.max_inflight
        snap = self.snapshot
        if snap is not None and snap.max_num_seqs:
            return snap.max_num_seqs
        if self.learned_limit is not None:
            return self.learned_limit + 1  # one more probes whether the engine can take it
        return self.default_limit

    def learn(self, snap: BackendSnapshot) -> None:
        """An engine that queues while running N requests runs at most N (its max_num_seqs, or
        what its KV cache holds); one that runs more without queueing can take at least that.
        vLLM does not export max_num_seqs; its running count plateaus there. The limit is the
        learned value plus one, so a value learned low (a transient queue) climbs back up."""
        if snap.running is None or snap.running < 1:
            return
        running = int(snap.running)
        if (snap.waiting or 0) > 0 or (
            self.learned_limit is not None and running > self.learned_limit
        ):
            self.learned_limit = running

    @property
    def total_inflight(self) -> int:
        return self.inflight + self.remote_inflight

    def auth_headers(self) -> dict[str, str]:
        key = self.config.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}


class BackendPool:
    def __init__(
        self,
        configs: Iterable[BackendConfig],
        health: HealthConfig,
        metrics: Metrics,
        on_snapshot: Callable[[BackendSnapshot], None] | None = None,
    ) -> None:
        self.backends = [Backend(c) for c in configs]
        self.on_change: Callable[[], None] | None = None  # health/snapshot changed
        self.replicas = 1  # live proxy replicas sharing these backends (shared state sets it)
        # GPU samples of the node a backend runs on (a pynvml sampler beside it), by name
        self.gpu_source: Callable[[str], tuple[GpuSample, ...]] = lambda name: ()
        self.health = health
        self.metrics = metrics
        self.on_snapshot = on_snapshot
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        metrics.add_state(self.gauges)

    # --- routing-side queries (sync, cheap) ---

    def candidates(self, model: str) -> list[Backend]:
        now = time.monotonic()
        return [b for b in self.backends if model in b.models and b.available(now)]

    def models(self) -> list[str]:
        now = time.monotonic()
        return sorted({m for b in self.backends if b.available(now) for m in b.models})

    def known_models(self) -> list[str]:
        return sorted({m for b in self.backends for m in b.models})

    def ready(self) -> bool:
        now = time.monotonic()
        return any(b.available(now) and b.models for b in self.backends)

    # --- passive health ---

    def report_failure(self, backend: Backend, kind: str) -> None:
        self.metrics.backend_failures.labels(backend.name, kind).inc()
        backend.consecutive_failures += 1
        if backend.consecutive_failures >= self.health.unhealthy_after and backend.healthy:
            backend.ejected_until = time.monotonic() + self.health.eject_s
            log.warning(
                "backend %s ejected for %.0fs after %d consecutive failures (last: %s)",
                backend.name,
                self.health.eject_s,
                backend.consecutive_failures,
                kind,
            )

    def report_success(self, backend: Backend) -> None:
        backend.consecutive_failures = 0

    # --- background work ---

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        # a first round before serving, so /ready and routing are right from the start
        await asyncio.gather(*(self._check(b) for b in self.backends))
        self._tasks = [asyncio.create_task(self._loop(b)) for b in self.backends]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _loop(self, b: Backend) -> None:
        h = self.health
        next_models = time.monotonic() + h.models_refresh_s
        next_scrape = time.monotonic()
        while True:
            now = time.monotonic()
            if h.scrape_interval_s > 0 and now >= next_scrape and b.healthy:
                await self._scrape(b)
                next_scrape = now + h.scrape_interval_s
            if now >= next_models:
                b._models_discovered = False
                next_models = now + h.models_refresh_s
            await asyncio.sleep(min(h.interval_s, h.scrape_interval_s or h.interval_s))
            await self._check(b)

    async def _get(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=self.health.timeout_s)
        async with self._session.get(url, headers=headers, timeout=timeout) as resp:
            return resp.status, await resp.read()

    async def _check(self, b: Backend) -> None:
        was = b.healthy
        try:
            status, _ = await self._get(b.url + "/health", b.auth_headers())
            if status == 404:  # servers without /health: the models list is the probe
                status, _ = await self._get(b.url + "/v1/models", b.auth_headers())
            ok = status == 200
            if ok and not b._models_discovered:
                await self._discover(b)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            ok = False
        b.healthy = ok
        if ok and time.monotonic() >= b.ejected_until:
            b.consecutive_failures = 0
        if ok != was and self.on_change is not None:
            self.on_change()
        if ok != was:
            log.log(
                logging.INFO if ok else logging.WARNING,
                "backend %s is %s",
                b.name,
                "up" if ok else "down",
            )

    async def _discover(self, b: Backend) -> None:
        if b.config.models:
            b._models_discovered = True
            return
        status, body = await self._get(b.url + "/v1/models", b.auth_headers())
        if status != 200:
            return
        data = orjson.loads(body).get("data", [])
        models = frozenset(str(m["id"]) for m in data if isinstance(m, dict) and "id" in m)
        if models != b.models:
            log.info("backend %s serves %s", b.name, ", ".join(sorted(models)) or "nothing")
        b.models = models
        b._models_discovered = True

    async def _scrape(self, b: Backend) -> None:
        if b.config.dialect == "none":
            return
        try:
            status, body = await self._get(b.url + "/metrics", b.auth_headers())
            if status != 200:
                self.metrics.scrapes.labels(b.name, f"http_{status}").inc()
                return
            dialect, fields = await asyncio.to_thread(
                parse_metrics, body.decode("utf-8", "replace"), b.config.dialect
            )
        except (aiohttp.ClientError, TimeoutError, ValueError):
            self.metrics.scrapes.labels(b.name, "error").inc()
            return
        self.metrics.scrapes.labels(b.name, "ok").inc()
        gpus = self.gpu_source(b.name) or await self._scrape_gpus(b)
        b.dialect = dialect
        snap = BackendSnapshot(
            backend=b.name,
            time_s=time.monotonic(),
            epoch=time.time(),
            up=b.healthy,
            dialect=dialect,
            models=tuple(sorted(b.models)),
            gpus=gpus,
            **fields,
        )
        b.snapshot = snap
        b.learn(snap)
        if self.on_snapshot is not None:
            self.on_snapshot(snap)
        if self.on_change is not None:
            self.on_change()

    async def _scrape_gpus(self, b: Backend) -> tuple[GpuSample, ...]:
        url = b.config.gpu_metrics_url
        if not url:
            return ()
        try:
            status, body = await self._get(url, {})
            if status == 200:
                return await asyncio.to_thread(
                    samples_from_metrics, body.decode("utf-8", "replace")
                )
        except (aiohttp.ClientError, TimeoutError, ValueError):
            pass
        self.metrics.scrapes.labels(b.name, "gpu_error").inc()
        return ()

    # --- metrics (read at scrape time) ---

    def gauges(self) -> Iterable[GaugeRow]:
        now = time.monotonic()
        lb = ("backend",)
        yield GaugeRow(
            "rightsizer_backend_up",
            "1 when the backend passes health checks and is not ejected.",
            lb,
            [((b.name,), float(b.available(now))) for b in self.backends],
        )
        yield GaugeRow(
            "rightsizer_backend_inflight_requests",
            "Requests the proxy has in flight upstream.",
            lb,
            [((b.name,), float(b.inflight)) for b in self.backends],
        )
        yield GaugeRow(
            "rightsizer_backend_inflight_tokens",
            "Estimated tokens (prompt + max output) the proxy has in flight upstream.",
            lb,
            [((b.name,), float(b.inflight_tokens)) for b in self.backends],
        )
        fields = (
            ("running", "rightsizer_engine_running_requests", "Engine-reported running requests."),
            ("waiting", "rightsizer_engine_waiting_requests", "Engine-reported queued requests."),
            ("kv_usage", "rightsizer_engine_kv_cache_usage_ratio", "Engine KV-cache usage, 0..1."),
            ("prefix_cache_hits", "rightsizer_engine_prefix_cache_hits", "Engine counter."),
            ("prefix_cache_queries", "rightsizer_engine_prefix_cache_queries", "Engine counter."),
            ("preemptions", "rightsizer_engine_preemptions", "Engine counter of preemptions."),
        )
        for attr, name, doc in fields:
            rows = [
                ((b.name,), float(v))
                for b in self.backends
                if b.snapshot is not None and (v := getattr(b.snapshot, attr)) is not None
            ]
            yield GaugeRow(name, doc, lb, rows)
