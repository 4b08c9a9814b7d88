"""Backends: health, discovered models, passive ejection, in-flight counts, /metrics scraping.

Each backend has one background task that, on its own timers, checks ``/health`` (falling back
to ``/v1/models`` when the server has no ``/health``), refreshes the served models and scrapes
``/metrics`` into an immutable ``BackendSnapshot`` (parsed in a worker thread: vLLM's exposition
text is large). Passive ejection: ``unhealthy_after`` consecutive upstream failures take a
backend out for at least ``eject_s``; the next successful active check brings it back.

A backend that cannot be reached is logged when it is first checked and at every failed check
while it stays down (with the reason: connection refused, timeout, HTTP status), so a
misspelled URL shows at once. Components that react to changes subscribe: ``on_change``
(health or engine state changed: admission re-checks its queue) and ``on_snapshot`` (every
scrape: the estimator, the admission limits).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp
import orjson

from estimator.records import BackendSnapshot, GpuSample

from ..config import BackendConfig, HealthConfig
from ..gpu import samples_from_metrics
from ..tasks import cancel_and_wait
from ..telemetry import Metrics
from .dialects import parse_metrics

log = logging.getLogger("rightsizer.backends")

GpuSource = Callable[[str], tuple[GpuSample, ...]]


class Backend:
    """State of one backend, owned by the event loop. Its in-flight counts change only through
    ``acquire``/``release`` (admission's tickets); health and snapshots only through the pool."""

    __slots__ = (
        "_models_discovered",
        "_models_due",
        "config",
        "consecutive_failures",
        "dialect",
        "ejected_until",
        "healthy",
        "inflight",
        "inflight_tokens",
        "last_error",
        "model_entries",
        "models",
        "name",
        "snapshot",
        "url",
    )

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.name = config.name
        self.url = config.url.rstrip("/")
        self.models: frozenset[str] = frozenset(config.models)
        self.model_entries: dict[str, dict[str, Any]] = {}  # /v1/models entries, as served
        self._models_discovered = bool(config.models)  # its model list was ever known
        self._models_due = not config.models  # read /v1/models at the next passing check
        self.healthy = False  # until the first check passes
        self.last_error: str | None = None
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.inflight = 0  # this replica's requests upstream
        self.inflight_tokens = 0
        self.dialect: str | None = None if config.dialect == "auto" else config.dialect
        self.snapshot: BackendSnapshot | None = None

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def acquire(self, tokens: int) -> None:
        self.inflight += 1
        self.inflight_tokens += tokens

    def release(self, tokens: int) -> None:
        self.inflight -= 1
        self.inflight_tokens -= tokens

    def auth_headers(self, client_auth: str | None = None) -> dict[str, str]:
        """The backend's own key; else the client's, where ``forward_client_auth``."""
        key = self.config.api_key
        if key:
            return {"Authorization": f"Bearer {key}"}
        if client_auth and self.config.forward_client_auth:
            return {"Authorization": client_auth}
        return {}


class BackendPool:
    def __init__(
        self,
        configs: Iterable[BackendConfig],
        health: HealthConfig,
        metrics: Metrics,
        *,
        gpu_source: GpuSource | None = None,
    ) -> None:
        self.backends = [Backend(c) for c in configs]
        self.by_name = {b.name: b for b in self.backends}
        self.health = health
        self.metrics = metrics
        self.gpu_source = gpu_source
        self._on_change: list[Callable[[], None]] = []
        self._on_snapshot: list[Callable[[Backend, BackendSnapshot], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    def on_change(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` when a backend's health or engine state changes."""
        self._on_change.append(fn)

    def on_snapshot(self, fn: Callable[[Backend, BackendSnapshot], None]) -> None:
        """Call ``fn(backend, snapshot)`` after every scrape."""
        self._on_snapshot.append(fn)

    def _changed(self) -> None:
        for fn in self._on_change:
            fn()

    # --- routing-side queries (sync, cheap) ---

    def serving(self, model: str) -> list[Backend]:
        """Backends up now that serve ``model``."""
        now = time.monotonic()
        return [b for b in self.backends if model in b.models and b.available(now)]

    def models(self) -> list[str]:
        now = time.monotonic()
        return sorted({m for b in self.backends if b.available(now) for m in b.models})

    def knows(self, model: str) -> bool:
        """Does a backend serve ``model`` or the config name it (up or not)?"""
        return any(model in b.models for b in self.backends)

    def known_models(self) -> list[str]:
        return sorted({m for b in self.backends for m in b.models})

    def undiscovered(self) -> list[Backend]:
        """Backends whose models are not known yet (never reached): a model missing from the
        others may still be theirs."""
        return [b for b in self.backends if not b.config.models and not b._models_discovered]

    def model_list(self) -> list[dict[str, Any]]:
        """``/v1/models`` entries of the backends up now, each model once, with the fields the
        first backend serving it gave (``max_model_len``, ``root``, ...)."""
        now = time.monotonic()
        out: dict[str, dict[str, Any]] = {}
        for b in self.backends:
            if not b.available(now):
                continue
            for m in sorted(b.models):
                if m not in out:
                    entry = b.model_entries.get(m) or {"id": m, "object": "model", "created": 0,
                                                       "owned_by": "rightsizer"}  # fmt: skip
                    out[m] = entry
        return [out[m] for m in sorted(out)]

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
        await cancel_and_wait(self._tasks)

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
                b._models_due = not b.config.models
                next_models = now + h.models_refresh_s
            await asyncio.sleep(min(h.interval_s, h.scrape_interval_s or h.interval_s))
            await self._check(b)

    async def _get(self, url: str, headers: Mapping[str, str]) -> tuple[int, bytes]:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=self.health.timeout_s)
        async with self._session.get(url, headers=headers, timeout=timeout) as resp:
            return resp.status, await resp.read()

    async def _check(self, b: Backend) -> None:
        was = b.healthy
        error: str | None = None
        try:
            status, _ = await self._get(b.url + "/health", b.auth_headers())
            if status == 404:  # servers without /health: the models list is the probe
                status, _ = await self._get(b.url + "/v1/models", b.auth_headers())
            if status != 200:
                error = f"HTTP {status}"
            elif b._models_due:
                await self._discover(b)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            error = _describe(exc)
        ok = error is None
        b.healthy, b.last_error = ok, error
        if ok and time.monotonic() >= b.ejected_until:
            b.consecutive_failures = 0
        if ok != was:
            self._changed()
        if ok and not was:
            log.info("backend %s (%s) is up", b.name, b.url)
        elif not ok:  # at each failed check while down: the URL may be wrong
            log.warning("backend %s (%s) is down: %s", b.name, b.url, error)

    async def _discover(self, b: Backend) -> None:
        status, body = await self._get(b.url + "/v1/models", b.auth_headers())
        if status != 200:
            return
        data = orjson.loads(body).get("data", [])
        entries = {str(m["id"]): m for m in data if isinstance(m, dict) and "id" in m}
        models = frozenset(entries)
        if models != b.models:
            log.info("backend %s serves %s", b.name, ", ".join(sorted(models)) or "nothing")
        b.models, b.model_entries = models, entries
        b._models_discovered, b._models_due = True, False

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
        gpus = (self.gpu_source(b.name) if self.gpu_source else ()) or await self._scrape_gpus(b)
        b.dialect = dialect
        snap = BackendSnapshot(
            backend=b.name,
            time_s=time.monotonic(),
            epoch=time.time(),
            up=b.healthy,
            dialect=dialect,
            models=tuple(sorted(b.models)),
            gpus=gpus,
            **fields,  # type: ignore[arg-type]
        )
        b.snapshot = snap
        for fn in self._on_snapshot:
            fn(b, snap)
        self._changed()

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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or exc.os_error})"
    return type(exc).__name__
