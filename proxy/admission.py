"""Admission: the proxy holds the queue instead of flooding the engines.

A request is dispatched only when one of its model's backends has headroom:
``in_flight_b < limit_b`` where in-flight is the proxy's own accounting (this replica's plus
the other replicas' from shared state, bumped at dispatch so bursts don't dogpile on stale
engine metrics) and ``limit_b`` is the backend's configured limit, else the engine's
``max_num_seqs``, else ``scheduling.default_max_inflight``; the scraped engine state corrects
it: a backend whose engine reports more than ``engine_waiting_high`` waiting requests or KV
usage above ``kv_usage_high`` gets nothing new until that drains (it keeps at least one).

Order of the waiting: strict priority between classes (critical > high > normal > low >
sheddable), with aging (every ``aging_s`` waited raises a request one class, so nothing
starves); inside a class, per-tenant fairness by virtual token counters (VTC): the backlogged
tenant with the least weighted service (prompt + expected output tokens) goes first, and a
tenant that becomes backlogged starts at the minimum counter of those already waiting, so
idling earns no credit.

Shedding, before the death spiral (429 unless no backend at all: 503):
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
import collections
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .backends import Backend, BackendPool
from .config import PRIORITY_CLASSES, SchedulingConfig
from .errors import Shed
from .exchange import Exchange
from .routing import Decision, RouteCtx, Router
from .telemetry import GaugeRow, Metrics
from .tenants import TenantLedger

CLASS_INDEX = {name: i for i, name in enumerate(PRIORITY_CLASSES)}
SHEDDABLE = CLASS_INDEX["sheddable"]
RATE_WINDOW_S = 30.0


@dataclass(eq=False, slots=True)
class Waiter:
    ex: Exchange
    klass: int
    deadline: float
    ctx: RouteCtx
    future: asyncio.Future[Decision] = field(repr=False)
    enqueued: float = 0.0


class ModelQueue:
    """Waiters of one model: class -> tenant -> FIFO."""

    def __init__(self) -> None:
        self.classes: list[dict[str, collections.deque[Waiter]]] = [{} for _ in PRIORITY_CLASSES]
        self.size = 0
        self.completions: collections.deque[float] = collections.deque(maxlen=4096)

    def push(self, w: Waiter) -> None:
        self.classes[w.klass].setdefault(w.ex.tenant, collections.deque()).append(w)
        self.size += 1

    def remove(self, w: Waiter) -> bool:
        q = self.classes[w.klass].get(w.ex.tenant)
        if q is None or w not in q:
            return False
        q.remove(w)
        if not q:
            del self.classes[w.klass][w.ex.tenant]
        self.size -= 1
        return True

    def waiters(self) -> Iterable[Waiter]:
        for tenants in self.classes:
            for q in tenants.values():
                yield from q

    def service_rate(self, now: float) -> float | None:
        """Completions per second over the recent window (None until there is a history)."""
        c = self.completions
        while c and c[0] < now - RATE_WINDOW_S:
            c.popleft()
        if len(c) < 4:
            return None
        return len(c) / max(now - c[0], 1.0)


class Scheduler:
    def __init__(
        self,
        cfg: SchedulingConfig,
        pool: BackendPool,
        router: Router,
        tenants: TenantLedger,
        metrics: Metrics,
    ) -> None:
        self.cfg, self.pool, self.router, self.tenants, self.metrics = (
            cfg,
            pool,
            router,
            tenants,
            metrics,
        )
        self.queues: dict[str, ModelQueue] = {}
        for b in pool.backends:
            b.default_limit = cfg.default_max_inflight
        pool.on_change = self.pump
        metrics.add_state(self.gauges)

    # --- headroom ---

    def effective_limit(self, b: Backend) -> int:
        """The backend's limit, lowered to what the engine was running at its last scrape
        while it queued or its KV cache was full: nothing new until its queue drains."""
        limit = b.limit
        snap = b.snapshot
        if snap is not None and (
            (snap.waiting or 0) > self.cfg.engine_waiting_high
            or (snap.kv_usage or 0.0) > self.cfg.kv_usage_high
        ):
            limit = min(limit, max(1, int(snap.running or 0)))
        return limit

    def utilization(self, b: Backend) -> float:
        return b.total_inflight / max(1, b.limit)

    def has_headroom(self, b: Backend) -> bool:
        """Room under the limit. With R replicas sharing a backend (shared state), a replica may
        always fill its own partition (ceil(limit / R)) and may borrow only 1/R of the free
        room it sees: replicas deciding on the same slightly stale view (one sync interval)
        then can't all grab the same free slots at once."""
        limit = self.effective_limit(b)
        total = b.total_inflight
        if total >= limit:
            return False
        r = self.pool.replicas
        return r <= 1 or b.inflight < -(-limit // r) or (limit - total) / r >= 1

    def with_headroom(self, candidates: Iterable[Backend]) -> list[Backend]:
        if not self.cfg.enabled:
            return list(candidates)
        return [b for b in candidates if self.has_headroom(b)]

    # --- admission ---

    async def admit(
        self, ex: Exchange, candidates: list[Backend], ctx: RouteCtx, deadline_s: float | None
    ) -> Decision:
        """Returns the routing decision with its first backend held for ``ex``."""
        klass = CLASS_INDEX[ex.priority]
        now = time.perf_counter()
        self.tenants.check(ex, now)
        queue = self.queues.get(ex.model)
        if queue is None:
            queue = self.queues[ex.model] = ModelQueue()
        budget = (
            deadline_s if deadline_s is not None else self.cfg.deadline_s.get(ex.priority, 30.0)
        )
        if queue.size == 0 or not self.cfg.enabled:
            free = self.with_headroom(candidates)
            if free:
                return self._grant(ex, free, ctx)
        self._check_shed(ex, queue, klass, candidates, budget, now)
        loop = asyncio.get_running_loop()
        w = Waiter(ex, klass, now + budget, ctx, loop.create_future(), now)
        queue.push(w)
        self.tenants.backlogged(ex.tenant, queue)
        self.pump()
        try:
            async with asyncio.timeout(budget):
                return await w.future
        except TimeoutError:
            raise self._shed(
                ex,
                "deadline_exceeded",
                f"The request waited {budget:g}s in the queue "
                "(its deadline) without a backend becoming free.",
            ) from None
        except asyncio.CancelledError:
            if w.future.done() and not w.future.cancelled() and w.future.exception() is None:
                self.release(ex)  # granted in the same instant the client left: give it back
            raise
        finally:
            queue.remove(w)

    def _check_shed(
        self,
        ex: Exchange,
        queue: ModelQueue,
        klass: int,
        candidates: list[Backend],
        budget: float,
        now: float,
    ) -> None:
        cfg = self.cfg
        util = sum(b.total_inflight for b in candidates) / max(1, sum(b.limit for b in candidates))
        if klass == SHEDDABLE and util >= cfg.shed_sheddable_above:
            raise self._shed(
                ex, "saturated", f"Backends are {util:.0%} busy; sheddable requests are dropped."
            )
        ahead = sum(1 for w in queue.waiters() if w.klass <= klass)
        rate = queue.service_rate(now)
        if rate is not None and ahead / rate > budget:
            raise self._shed(
                ex,
                "predicted_wait",
                f"Predicted wait {ahead / rate:.1f}s exceeds the deadline of {budget:g}s.",
                retry_after_s=ahead / rate,
            )
        if self.total_waiting() >= cfg.max_queue:
            victim = self._lowest_newest()
            if victim is None or victim.klass <= klass:
                raise self._shed(ex, "queue_full", f"The queue is full ({cfg.max_queue} waiting).")
            self.queues[victim.ex.model].remove(victim)
            victim.future.set_exception(
                self._shed(
                    victim.ex,
                    "displaced",
                    "Displaced from the full queue by a higher-priority request.",
                )
            )

    def _shed(self, ex: Exchange, reason: str, message: str, retry_after_s: float = 1.0) -> Shed:
        self.metrics.shed.labels(ex.model, ex.priority, reason).inc()
        return Shed(message, reason=reason, retry_after_s=retry_after_s)

    def _lowest_newest(self) -> Waiter | None:
        worst: Waiter | None = None
        for q in self.queues.values():
            for w in q.waiters():
                if worst is None or (w.klass, w.enqueued) > (worst.klass, worst.enqueued):
                    worst = w
        return worst

    def total_waiting(self) -> int:
        return sum(q.size for q in self.queues.values())

    def _grant(self, ex: Exchange, free: list[Backend], ctx: RouteCtx) -> Decision:
        d = self.router.route(ctx, free)
        self.metrics.routing.labels(d.ordered[0].name, d.reason).inc()
        if d.matched_ratio is not None:
            self.metrics.prefix_match.labels(ex.model).observe(d.matched_ratio)
        self.router.on_routed(d.ordered[0], ctx)
        self.hold(ex, d.ordered[0])
        self.tenants.dispatched(ex)
        return d

    # --- accounting ---

    @staticmethod
    def hold(ex: Exchange, backend: Backend) -> None:
        ex.held = backend
        ex.inflight_requests, ex.inflight_tokens = backend.total_inflight, backend.inflight_tokens
        backend.inflight += 1
        backend.inflight_tokens += ex.est_tokens

    def move(self, ex: Exchange, backend: Backend) -> None:
        """Retry elsewhere: the hold moves with the request."""
        self.unhold(ex)
        self.hold(ex, backend)

    @staticmethod
    def unhold(ex: Exchange) -> None:
        b = ex.held
        if b is not None:
            b.inflight -= 1
            b.inflight_tokens -= ex.est_tokens
            ex.held = None

    def release(self, ex: Exchange) -> None:
        """The request ended (any outcome): free its slot, settle its tenant, admit the next."""
        if ex.held is None:
            return
        self.unhold(ex)
        self.tenants.finished(ex)
        q = self.queues.get(ex.model)
        if q is not None:
            q.completions.append(time.perf_counter())
        self.pump()

    def pump(self) -> None:
        """Grant waiting requests while their backends have headroom."""
        for model, queue in self.queues.items():
            while queue.size:
                free = self.with_headroom(self.pool.candidates(model))
                if not free:
                    break
                w = self._next(queue, time.perf_counter())
                queue.remove(w)
                if w.future.done():
                    continue
                w.future.set_result(self._grant(w.ex, free, w.ctx))

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

    def gauges(self) -> Iterable[GaugeRow]:
        rows = []
        for model, q in self.queues.items():
            for klass, tenants in enumerate(q.classes):
                rows.append(
                    ((model, PRIORITY_CLASSES[klass]), float(sum(len(d) for d in tenants.values())))
                )
        yield GaugeRow(
            "rightsizer_queue_depth",
            "Requests waiting in the proxy's queue.",
            ("model", "priority"),
            rows,
        )
