"""In-flight limits per backend: how many requests admission lets through to each engine.

Source, first that applies (exported as ``rightsizer_backend_inflight_limit{source}``):

1. ``config``: ``backends[].max_inflight``;
2. ``engine``: the engine's own ``max_num_seqs`` when its ``/metrics`` exposes it, plus a
   small queue of its own (below);
3. ``learned`` / ``probing`` / ``default``: learned from the engine's signals at each scrape.
   It starts at ``scheduling.default_max_inflight``. While the proxy keeps the backend at its
   limit (total in flight >= 90% of it) and the engine reports no waiting request and a KV
   cache below ``kv_usage_high``, the engine could take more: the limit doubles (``probing``)
   up to ``scheduling.max_inflight_ceiling``. When two scrapes in a row find the engine
   queueing (waiting requests) while running R1 and R2, R = max(R1, R2) is its concurrency
   (its ``max_num_seqs`` or what its KV cache holds): the limit becomes R plus the small queue
   (``learned``), and probing above it resumes, one step of max(1, R/16) at a time, only after
   ``probe_hold_s``. One scrape is not enough: vLLM admits new prompts only as its batched-
   token budget allows, so a scrape right after a wave of sequences finished shows requests
   waiting below ``max_num_seqs`` (on the real vLLM CPU server at 96 sequences, one scrape
   set the limit to 90, held for a minute). So an engine configured for 256 sequences reaches
   256 in three or four scrapes; meanwhile ``effective_limit`` holds new work while it
   queues. Engines without metrics keep the default.

The small queue: ``engine_waiting_high`` requests (at least one) beyond what the engine runs,
so a sequence that finishes in the engine is replaced at its next step, not a round trip
through the proxy later (measured on the real vLLM CPU server at 96 sequences: without it,
throughput through the proxy fell to 0.77 of direct). Priority and fairness still decide
everything beyond those few.

On top of the limit, ``effective_limit`` holds new work while the engine reports more than
``engine_waiting_high`` waiting requests or a KV cache above ``kv_usage_high`` (at most what it
was running then, at least one).

With R proxy replicas sharing a backend through Redis, ``has_headroom`` lets a replica fill
its own share (ceil(limit / R)) and borrow only 1/R of the free room it sees, so replicas
deciding on the same slightly stale view (one sync interval) can't all take the same slots.
Workers of one machine see each other's counts at once (``ShmView.fresh``): they use the
whole limit, and can exceed it only when several decide in the same instant, by at most one
request per other worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from estimator.records import BackendSnapshot

from ..config import SchedulingConfig
from ..state import SharedView
from ..upstream.backends import Backend

_AT_CAP = 0.9


@dataclass(slots=True)
class _Learned:
    limit: int
    source: str = "default"
    hold_until: float = 0.0
    queued_running: int | None = None  # running at the previous scrape, if it was queueing


class Limits:
    def __init__(
        self,
        cfg: SchedulingConfig,
        view: SharedView,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg, self.view, self.clock = cfg, view, clock
        self._learned: dict[str, _Learned] = {}

    def _state(self, b: Backend) -> _Learned:
        st = self._learned.get(b.name)
        if st is None:
            st = self._learned[b.name] = _Learned(self.cfg.default_max_inflight)
        return st

    @property
    def engine_queue(self) -> int:
        """Requests let wait inside the engine beyond what it runs (see the module doc)."""
        return max(1, int(self.cfg.engine_waiting_high))

    def limit(self, b: Backend) -> int:
        if b.config.max_inflight is not None:
            return b.config.max_inflight
        snap = b.snapshot
        if snap is not None and snap.max_num_seqs:
            return snap.max_num_seqs + self.engine_queue
        return self._state(b).limit

    def source(self, b: Backend) -> str:
        if b.config.max_inflight is not None:
            return "config"
        snap = b.snapshot
        if snap is not None and snap.max_num_seqs:
            return "engine"
        return self._state(b).source

    def acquire(self, b: Backend, tokens: int) -> None:
        b.acquire(tokens)
        self.view.publish_backend(b.name, b.inflight)

    def release(self, b: Backend, tokens: int) -> None:
        b.release(tokens)
        self.view.publish_backend(b.name, b.inflight)

    def total(self, b: Backend) -> int:
        """In flight on ``b`` from every replica."""
        return b.inflight + self.view.remote_inflight(b.name)

    def load(self, b: Backend) -> float:
        return self.total(b) / max(1, self.limit(b))

    def inflight(self, b: Backend) -> tuple[int, int]:
        return self.total(b), self.limit(b)

    def effective_limit(self, b: Backend) -> int:
        limit = self.limit(b)
        snap = b.snapshot
        if snap is not None and (
            (snap.waiting or 0) > self.cfg.engine_waiting_high
            or (snap.kv_usage or 0.0) > self.cfg.kv_usage_high
        ):
            limit = min(limit, max(1, int(snap.running or 0)))
        return limit

    def has_headroom(self, b: Backend) -> bool:
        limit = self.effective_limit(b)
        total = self.total(b)
        if total >= limit:
            return False
        r = self.view.replicas
        if r <= 1 or self.view.fresh:
            return True
        return b.inflight < -(-limit // r) or (limit - total) / r >= 1

    def observe(self, b: Backend, snap: BackendSnapshot) -> None:
        """Learn from one scrape of ``b``'s engine (see the module docstring)."""
        if b.config.max_inflight is not None or snap.max_num_seqs or snap.running is None:
            return
        st = self._state(b)
        running, waiting = int(snap.running), snap.waiting or 0.0
        now = self.clock()
        if waiting > 0 and running >= 1:
            before, st.queued_running = st.queued_running, running
            if before is not None:  # queueing at two scrapes in a row (module docstring)
                st.limit, st.source = max(before, running) + self.engine_queue, "learned"
                st.hold_until = now + self.cfg.probe_hold_s
            return
        st.queued_running = None
        if snap.kv_usage is not None and snap.kv_usage > self.cfg.kv_usage_high:
            return  # full cache, nothing queued yet: neither raise nor learn
        if self.total(b) < _AT_CAP * st.limit or now < st.hold_until:
            return  # the engine is not being offered more: nothing to learn
        ceiling = self.cfg.max_inflight_ceiling
        if st.source == "learned":
            step = max(1, st.limit // 16)
            st.limit, st.hold_until = min(ceiling, st.limit + step), now + self.cfg.probe_hold_s
        else:
            st.limit, st.source = min(ceiling, max(st.limit + 1, 2 * st.limit)), "probing"

    def rows(self, backends: Iterable[Backend]) -> list[tuple[str, int, str]]:
        """(backend, limit, source) for telemetry."""
        return [(b.name, self.limit(b), self.source(b)) for b in backends]
