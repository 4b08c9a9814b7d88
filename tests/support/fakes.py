"""Fakes and builders shared by the unit tests and the benchmarks: a fake clock, backends that
are up without a server, requests, records and snapshots with sensible defaults, and the
admission stack (pool, limits, router, scheduler) wired as ``proxy.app`` wires it."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from estimator.records import BackendSnapshot, ItlSummary, Outcome, RequestRecord
from proxy.admission import Limits, Scheduler, TenantLedger
from proxy.config import (
    AuthConfig,
    BackendConfig,
    HealthConfig,
    RoutingConfig,
    SchedulingConfig,
    TenantConfig,
)
from proxy.request import InferenceRequest
from proxy.routing import PluginDeps, Router, build_router
from proxy.state import LocalView, SharedView
from proxy.telemetry import Metrics
from proxy.upstream.backends import Backend, BackendPool

_ids = itertools.count()


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def up(backend: Backend, models: Sequence[str] = ("m",)) -> Backend:
    """Mark a backend healthy and serving ``models`` (as a passed health check would)."""
    backend.healthy, backend.models = True, frozenset(models)
    return backend


def pool_of(
    n: int,
    *,
    limit: int | None = None,
    metrics: Metrics | None = None,
    models: Sequence[str] = ("m",),
) -> BackendPool:
    pool = BackendPool(
        [BackendConfig(url=f"http://b{i}:80", max_inflight=limit) for i in range(n)],
        HealthConfig(),
        metrics or Metrics(CollectorRegistry()),
    )
    for b in pool.backends:
        up(b, models)
    return pool


def request(
    priority: str = "normal",
    tenant: str = "t",
    tokens: int = 100,
    model: str = "m",
    **kw: Any,
) -> InferenceRequest:
    return InferenceRequest(
        request_id=f"r{next(_ids)}", endpoint="chat", method="POST", path="/v1/chat/completions",
        model=model, priority=priority, tenant=tenant, est_tokens=tokens, **kw,
    )  # fmt: skip


def record(**kw: Any) -> RequestRecord:
    base: dict[str, Any] = dict(
        request_id=f"r{next(_ids)}", model="m", backend="b0", streamed=True, status=200,
        outcome=Outcome.OK, arrival_s=0.0, dispatch_s=0.001, first_token_s=0.05, end_s=0.5,
        arrival_epoch=1_700_000_000.0, prompt_tokens=100, completion_tokens=32,
        itl=ItlSummary.from_gaps([0.014] * 31),
    )  # fmt: skip
    base.update(kw)
    return RequestRecord(**base)


def snapshot(backend: str = "b0:80", **kw: Any) -> BackendSnapshot:
    return BackendSnapshot(backend=backend, time_s=kw.pop("time_s", 0.0), **kw)


class Admission:
    """The admission stack as ``proxy.app`` wires it, over backends that need no server."""

    def __init__(
        self,
        pool: BackendPool,
        *,
        routing: RoutingConfig | None = None,
        scheduling: SchedulingConfig | None = None,
        tenants: tuple[TenantConfig, ...] = (),
        auth: AuthConfig | None = None,
        view: SharedView | None = None,
        clock: Any = None,
    ) -> None:
        self.metrics = pool.metrics
        self.registry = pool.metrics.registry
        self.pool = pool
        self.view = view or LocalView()
        sched = scheduling or SchedulingConfig()
        self.limits = Limits(sched, self.view, **({"clock": clock} if clock else {}))
        self.router: Router = build_router(
            routing or RoutingConfig(policy="least_loaded"),
            PluginDeps(load=self.limits.load, inflight=self.limits.inflight,  # type: ignore[arg-type]
                       headroom=self.limits.has_headroom),  # type: ignore[arg-type]
            timer=self.metrics.plugin_timer,
        )  # fmt: skip
        self.tenants = TenantLedger(tenants, auth or AuthConfig(), self.view)
        self.scheduler = Scheduler(
            sched, pool, self.router, self.tenants, self.limits, self.metrics,
            **({"clock": clock} if clock else {}),
        )  # fmt: skip
        pool.on_change(self.scheduler.pump)
        pool.on_snapshot(self.limits.observe)
