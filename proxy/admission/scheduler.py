"""Admission: the proxy holds the queue instead of flooding the engines.

A request is dispatched only when one of its model's healthy backends passes the router's
filters (by default ``headroom``: in flight below the backend's limit, see
``proxy.admission.limits``). ``admit`` returns a ``Ticket``: the slot held on the chosen
backend, which the request releases exactly once when it ends (``Ticket.release``) and which
moves with a retry (``Ticket.move``).

Order of the waiting: strict priority between classes (critical > high > normal > low >
sheddable), with aging (every ``aging_s`` waited raises a request one class, so nothing
starves); inside a class, per-tenant fairness by virtual token counters (VTC): the backlogged
tenant with the least weighted service (prompt + expected output tokens) goes first, and a
tenant that becomes backlogged starts at the minimum counter of those already waiting, so
idling earns no credit.

Shedding, before the death spiral (429 unless no backend at all: 503), each counted in
``rightsizer_shed_total{reason}``:
- ``no_backend``: every backend serving the model is down or ejected (503);
- ``tenant_concurrency`` / ``tenant_tpm``: the tenant's limits;
- ``queue_full``: the queue is at ``max_queue``; an arrival of a higher class displaces the
  newest waiter of the lowest class (``displaced``);
- ``predicted_wait``: requests ahead ÷ the model's recent completion rate exceeds the
  request's deadline (header ``x-request-deadline-ms`` or the class default);
- ``saturated``: a ``sheddable`` request would have to queue while utilization is above
  ``shed_sheddable_above``;
- ``deadline_exceeded``: it waited in the queue past its deadline; never sent upstream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence

from ..config import PRIORITY_CLASSES, SchedulingConfig
from ..errors import NoHealthyBackend, Shed
from ..request import InferenceRequest
from ..routing import RouteCtx, Router
from ..telemetry import Metrics
from ..upstream.backends import Backend, BackendPool
from ..validate import CLASS_INDEX
from .limits import Limits
from .queue import ModelQueue, Waiter
from .tenants import TenantLedger

SHEDDABLE = CLASS_INDEX["sheddable"]
QueueKey = tuple[str, str | None]  # (model, experiment group)


class Ticket:
    """An in-flight slot held on ``backend`` for one request."""

    __slots__ = ("_counted", "_req", "_sched", "backend", "fallbacks", "inflight_at_grant")

    def __init__(
        self,
        sched: Scheduler,
        req: InferenceRequest,
        backend: Backend,
        fallbacks: Sequence[Backend],
        *,
        counted: bool,
    ) -> None:
        self._sched, self._req, self._counted = sched, req, counted
        self.backend: Backend | None = None
        self.fallbacks = list(fallbacks)
        self.inflight_at_grant = (0, 0)
        self._take(backend)

    def _take(self, backend: Backend) -> None:
        limits = self._sched.limits
        self.inflight_at_grant = (limits.total(backend), backend.inflight_tokens)
        limits.acquire(backend, self._req.est_tokens)
        self.backend = backend

    def _drop(self) -> None:
        if self.backend is not None:
            self._sched.limits.release(self.backend, self._req.est_tokens)
            self.backend = None

    def move(self, backend: Backend) -> None:
        """A retry goes to ``backend``: the slot moves with it."""
        self._drop()
        self._take(backend)

    @property
    def held(self) -> bool:
        return self.backend is not None

    def release(self, actual_tokens: int | None = None) -> None:
        """The request ended (any outcome): free the slot, settle the tenant, admit the next.
        Idempotent."""
        if self.backend is None:
            return
        self._drop()
        self._sched.released(self._req, actual_tokens, counted=self._counted)


class Scheduler:
    def __init__(
        self,
        cfg: SchedulingConfig,
        pool: BackendPool,
        router: Router,
        tenants: TenantLedger,
        limits: Limits,
        metrics: Metrics,
        *,
        retry_after_s: float = 5.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.cfg, self.pool, self.router, self.tenants = cfg, pool, router, tenants
        self.limits, self.metrics, self.clock = limits, metrics, clock
        self.retry_after_s = retry_after_s
        # one queue per deployment: a model, or a model's experiment group (a full canary
        # must not hold up the baseline's requests behind it)
        self.queues: dict[QueueKey, ModelQueue] = {}

    # --- admission ---

    def _queue(self, model: str, group: str | None = None) -> ModelQueue:
        key = (model, group)
        q = self.queues.get(key)
        if q is None:
            q = self.queues[key] = ModelQueue()
        return q

    def waiting(self, model: str, group: str | None) -> int:
        """Requests waiting for this deployment (shadow traffic yields to them)."""
        q = self.queues.get((model, group))
        return 0 if q is None else q.size

    def _free(self, ctx: RouteCtx, candidates: list[Backend]) -> list[Backend]:
        return self.router.filter(ctx, candidates, admission=self.cfg.enabled)

    def _serving(self, req: InferenceRequest) -> list[Backend]:
        candidates = self.pool.serving(req.model)
        if not candidates:
            raise self._count(
                req,
                NoHealthyBackend(
                    f"Every backend serving model '{req.model}' is down or ejected.",
                    reason="no_backend",
                    retry_after_s=self.retry_after_s,
                ),
            )
        return candidates

    async def admit(self, req: InferenceRequest, ctx: RouteCtx) -> Ticket:
        """A ticket for the first backend of the routing decision, after queueing if needed."""
        klass = CLASS_INDEX[req.priority]
        now = self.clock()
        try:
            self.tenants.check(req.tenant, req.est_tokens)
        except Shed as err:
            raise self._count(req, err) from None
        candidates = self._serving(req)
        queue = self._queue(req.model, req.group)
        budget = req.deadline_s
        if budget is None:
            budget = self.cfg.deadline_s.get(req.priority, 30.0)
        if queue.size == 0 or not self.cfg.enabled:
            free = self._free(ctx, candidates)
            if free:
                return self._grant(req, free, ctx)
        self._check_shed(req, queue, klass, candidates, budget, now)
        w = Waiter(req, klass, now + budget, ctx, asyncio.get_running_loop().create_future(), now)
        others = queue.tenants_waiting() - {req.tenant}
        self.tenants.join(req.tenant, min(map(self.tenants.counter, others), default=None))
        queue.push(w)
        self.pump()
        try:
            async with asyncio.timeout(budget):
                return await w.future
        except TimeoutError:
            raise self._shed(
                req,
                "deadline_exceeded",
                f"The request waited {budget:g}s in the queue "
                "(its deadline) without a backend becoming free.",
            ) from None
        except asyncio.CancelledError:
            if w.future.done() and not w.future.cancelled() and w.future.exception() is None:
                w.future.result().release()  # granted as the client left: give it back
            raise
        finally:
            queue.remove(w)

    def hold(self, req: InferenceRequest, candidates: list[Backend]) -> Ticket:
        """A slot on the least-loaded candidate, without queueing (other /v1 paths)."""
        ordered = sorted(candidates, key=self.limits.load)
        return Ticket(self, req, ordered[0], ordered[1:], counted=False)

    def _check_shed(
        self,
        req: InferenceRequest,
        queue: ModelQueue,
        klass: int,
        candidates: list[Backend],
        budget: float,
        now: float,
    ) -> None:
        cfg, limits = self.cfg, self.limits
        util = sum(map(limits.total, candidates)) / max(1, sum(map(limits.limit, candidates)))
        if klass == SHEDDABLE and util >= cfg.shed_sheddable_above:
            raise self._shed(
                req, "saturated", f"Backends are {util:.0%} busy; sheddable requests are dropped."
            )
        ahead = queue.ahead_of(klass)
        rate = queue.service_rate(now)
        if rate is not None and ahead / rate > budget:
            raise self._shed(
                req,
                "predicted_wait",
                f"Predicted wait {ahead / rate:.1f}s exceeds the deadline of {budget:g}s.",
                retry_after_s=ahead / rate,
            )
        if self.total_waiting() >= cfg.max_queue:
            victim = self._lowest_newest()
            if victim is None or victim.klass <= klass:
                raise self._shed(req, "queue_full", f"The queue is full ({cfg.max_queue} waiting).")
            self.queues[(victim.req.model, victim.req.group)].remove(victim)
            victim.future.set_exception(
                self._shed(
                    victim.req,
                    "displaced",
                    "Displaced from the full queue by a higher-priority request.",
                )
            )

    def _count(
        self, req: InferenceRequest, err: Shed | NoHealthyBackend
    ) -> Shed | NoHealthyBackend:
        self.metrics.child(self.metrics.shed, req.model, req.priority, err.reason).inc()
        return err

    def _shed(
        self, req: InferenceRequest, reason: str, message: str, retry_after_s: float = 1.0
    ) -> Shed:
        err = Shed(message, reason=reason, retry_after_s=retry_after_s)
        self._count(req, err)
        return err

    def _lowest_newest(self) -> Waiter | None:
        worst: Waiter | None = None
        for q in self.queues.values():
            for w in q.waiters():
                if worst is None or (w.klass, w.enqueued) > (worst.klass, worst.enqueued):
                    worst = w
        return worst

    def total_waiting(self) -> int:
        return sum(q.size for q in self.queues.values())

    def _grant(self, req: InferenceRequest, free: list[Backend], ctx: RouteCtx) -> Ticket:
        d = self.router.route(ctx, free)
        best: Backend = d.ordered[0]  # type: ignore[assignment]
        m = self.metrics
        m.child(m.routing, best.name, d.reason).inc()
        if d.matched_ratio is not None:
            m.child(m.prefix_match, req.model).observe(d.matched_ratio)
        self.router.on_routed(ctx, best)
        self.tenants.dispatched(req.tenant, req.est_tokens)
        fallbacks: list[Backend] = d.ordered[1:]  # type: ignore[assignment]
        if req.group is not None:  # a retry may leave the group: the other group serves it
            fallbacks += sorted((b for b in self.pool.serving(req.model)
                                 if b not in d.ordered and self.limits.has_headroom(b)),
                                key=self.limits.load)  # fmt: skip
        return Ticket(self, req, best, fallbacks, counted=True)

    # --- completion ---

    def released(self, req: InferenceRequest, actual_tokens: int | None, *, counted: bool) -> None:
        if counted:
            self.tenants.finished(req.tenant, req.est_tokens, actual_tokens)
            q = self.queues.get((req.model, req.group))
            if q is not None:
                q.completions.append(self.clock())
        self.pump()

    def pump(self) -> None:
        """Grant waiting requests while their backends have headroom."""
        for (model, _group), queue in self.queues.items():
            while queue.size:
                now = self.clock()
                w = self._next(queue, now)
                free = self._free(w.ctx, self.pool.serving(model))
                if not free:
                    break
                queue.remove(w)
                if w.future.done():
                    continue
                w.future.set_result(self._grant(w.req, free, w.ctx))

    def _next(self, queue: ModelQueue, now: float) -> Waiter:
        """Best effective class (class minus aging), then least VTC, then FIFO."""
        best: tuple[float, float, float] | None = None
        chosen: Waiter | None = None
        for klass, tenants in enumerate(queue.classes):
            for tenant, q in tenants.items():
                head = q[0]
                eff = klass - int((now - head.enqueued) / self.cfg.aging_s)
                key = (eff, self.tenants.counter(tenant), head.enqueued)
                if best is None or key < best:
                    best, chosen = key, head
        assert chosen is not None
        return chosen

    def depths(self) -> Iterator[tuple[str, str, int]]:
        """(model, class, waiting) for telemetry, summed over a model's groups."""
        out: dict[tuple[str, str], int] = {}
        for (model, _group), q in self.queues.items():
            for klass, tenants in enumerate(q.classes):
                key = (model, PRIORITY_CLASSES[klass])
                out[key] = out.get(key, 0) + sum(len(d) for d in tenants.values())
        for (model, name), n in out.items():
            yield model, name, n
