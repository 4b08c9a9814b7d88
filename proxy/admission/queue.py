"""The proxy's queue of one model: class -> tenant -> FIFO, and the model's recent completion
rate (what ``predicted_wait`` shedding divides by)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..config import PRIORITY_CLASSES
from ..request import InferenceRequest
from ..routing import RouteCtx

RATE_WINDOW_S = 30.0


@dataclass(eq=False, slots=True)
class Waiter:
    req: InferenceRequest
    klass: int
    deadline: float
    ctx: RouteCtx
    future: asyncio.Future[Any] = field(repr=False)  # resolves to the granted Ticket
    enqueued: float = 0.0


class ModelQueue:
    """Waiters of one model: class -> tenant -> FIFO."""

    def __init__(self) -> None:
        self.classes: list[dict[str, collections.deque[Waiter]]] = [{} for _ in PRIORITY_CLASSES]
        self.size = 0
        self.completions: collections.deque[float] = collections.deque(maxlen=4096)

    def push(self, w: Waiter) -> None:
        self.classes[w.klass].setdefault(w.req.tenant, collections.deque()).append(w)
        self.size += 1

    def remove(self, w: Waiter) -> bool:
        q = self.classes[w.klass].get(w.req.tenant)
        if q is None or w not in q:
            return False
        q.remove(w)
        if not q:
            del self.classes[w.klass][w.req.tenant]
        self.size -= 1
        return True

    def waiters(self) -> Iterable[Waiter]:
        for tenants in self.classes:
            for q in tenants.values():
                yield from q

    def tenants_waiting(self) -> set[str]:
        return {t for tenants in self.classes for t in tenants}

    def ahead_of(self, klass: int) -> int:
        """Waiters of class ``klass`` or higher."""
        return sum(len(q) for tenants in self.classes[: klass + 1] for q in tenants.values())

    def service_rate(self, now: float) -> float | None:
        """Completions per second over the recent window (None until there is a history)."""
        c = self.completions
        while c and c[0] < now - RATE_WINDOW_S:
            c.popleft()
        if len(c) < 4:
            return None
        return len(c) / max(now - c[0], 1.0)
