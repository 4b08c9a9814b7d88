"""Backend choice: filters -> weighted scorers (each in [0, 1]) -> picker, plus a load guard.

Inputs per decision (``RouteCtx``): the request's chained prefix-block hashes, its session key,
and per candidate its load ``u_b = in_flight_b / limit_b`` (proxy accounting shared across
replicas, so bursts spread before the engine metrics catch up). Candidates reaching the router
already passed the filters (healthy, serves the model, has headroom: ``admission.py``).

Scorers (``type_name``: formula, range [0, 1]):
- ``prefix``: matched_blocks_b / request_blocks (0 when the prompt has no whole block)
- ``load``: 1 - u_b (clipped)
- ``session``: 1 when the session key was last routed to b, else 0
- ``round_robin``: 1 for the backend whose turn it is, else 0
Picker: the highest weighted sum; ties go to the lower load, then rotation order.

Load guard (prefix affinity must not create hot spots, the failure of pure-affinity routers):
if the best-by-score backend carries more than ``min(imbalance_abs, limit_b / 4)`` requests
more than the least-loaded candidate *and* more than
``(1 + imbalance_rel)`` x the least-loaded candidate's load, the decision falls back to least
loaded (reason ``imbalance_guard``). The chosen backend's index learns the request's blocks
(``on_routed``), so later requests sharing the prefix follow it.

Policies: ``round_robin``, ``least_loaded``, ``prefix`` (default) and ``session``, each a list
of (scorer, weight); ``routing.scorers`` in config overrides the list.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .backends import Backend
from .config import RoutingConfig
from .prefix import PrefixIndex


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteCtx:
    hashes: Sequence[bytes] = ()
    session: str | None = None
    now: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    ordered: list[Backend]
    reason: str
    matched_ratio: float | None  # of the chosen backend; None when the prompt has no block


LoadFn = Callable[[Backend], float]  # utilization in [0, inf)


class Router:
    def __init__(
        self,
        *,
        scorers: Sequence[tuple[str, float]],
        load: LoadFn,
        block_chars: int = 256,
        prefix_ttl_s: float = 600.0,
        max_blocks: int = 100_000,
        imbalance_abs: float = 8.0,
        imbalance_rel: float = 0.5,
        sessions_max: int = 100_000,
    ) -> None:
        unknown = [n for n, _ in scorers if n not in SCORERS]
        if unknown:
            raise ValueError(f"unknown scorer {unknown[0]!r} (known: {', '.join(SCORERS)})")
        self.scorers = [(n, w) for n, w in scorers if w > 0]
        self.uses_prefix = any(n == "prefix" for n, _ in self.scorers)
        self.guarded = self.uses_prefix or any(n == "session" for n, _ in self.scorers)
        self.load = load
        self.block_chars = block_chars
        self.prefix_ttl_s, self.max_blocks = prefix_ttl_s, max_blocks
        self.imbalance_abs, self.imbalance_rel = imbalance_abs, imbalance_rel
        self.indexes: dict[str, PrefixIndex] = {}
        self.sessions: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.sessions_max = sessions_max
        self._rr = itertools.count()
        self.listeners: list[Callable[[str, Sequence[bytes]], None]] = []  # e.g. shared state

    def index(self, backend: Backend) -> PrefixIndex:
        idx = self.indexes.get(backend.name)
        if idx is None:
            idx = self.indexes[backend.name] = PrefixIndex(self.max_blocks, self.prefix_ttl_s)
        snap = backend.snapshot
        if (
            snap is not None and snap.kv_capacity_tokens
        ):  # never remember more than the engine holds
            cap = max(1, snap.kv_capacity_tokens * 4 // self.block_chars)
            if cap != idx.max_blocks and cap < self.max_blocks:
                idx.resize(cap)
        return idx

    def route(self, ctx: RouteCtx, candidates: Sequence[Backend]) -> Decision:
        n = len(candidates)
        if n == 0:
            return Decision([], "none", None)
        turn = next(self._rr) % n
        rotated = [*candidates[turn:], *candidates[:turn]]
        loads = {b.name: self.load(b) for b in rotated}
        matched = (
            {b.name: self.index(b).match(ctx.hashes, ctx.now) for b in rotated}
            if (self.uses_prefix and ctx.hashes)
            else {}
        )
        nblocks = len(ctx.hashes)
        scores = {b.name: 0.0 for b in rotated}
        for name, weight in self.scorers:
            fn = SCORERS[name]
            for i, b in enumerate(rotated):
                scores[b.name] += weight * fn(self, ctx, b, i, loads, matched, nblocks)
        ordered = sorted(rotated, key=lambda b: (-scores[b.name], loads[b.name]))
        best, reason = ordered[0], self._reason(ordered[0], matched, ctx)
        least = min(rotated, key=lambda b: loads[b.name])
        if self.guarded and best is not least and self._imbalanced(best, least):
            ordered.remove(least)
            ordered.insert(0, least)
            best, reason = least, "imbalance_guard"
        ratio = matched.get(best.name, 0) / nblocks if nblocks else None
        return Decision(ordered, reason, ratio)

    def _reason(self, best: Backend, matched: dict[str, int], ctx: RouteCtx) -> str:
        if (
            ctx.session is not None
            and self.sessions.get(ctx.session) == best.name
            and any(n == "session" for n, _ in self.scorers)
        ):
            return "session"
        if matched.get(best.name):
            return "prefix_hit"
        return self.scorers[0][0] if self.scorers else "first"

    def _imbalanced(self, best: Backend, least: Backend) -> bool:
        """The absolute threshold shrinks for small engines: a quarter of the best's limit."""
        in_b = self.load(best) * max(best.limit, 1)
        in_l = self.load(least) * max(least.limit, 1)
        threshold = min(self.imbalance_abs, max(1.0, 0.25 * best.limit))
        return in_b - in_l > threshold and in_b > (1 + self.imbalance_rel) * in_l

    def on_routed(self, backend: Backend, ctx: RouteCtx) -> None:
        if self.uses_prefix and ctx.hashes:
            self.index(backend).insert(ctx.hashes, ctx.now or time.monotonic())
            for fn in self.listeners:
                fn(backend.name, ctx.hashes)
        if ctx.session is not None:
            self.sessions[ctx.session] = backend.name
            self.sessions.move_to_end(ctx.session)
            if len(self.sessions) > self.sessions_max:
                self.sessions.popitem(last=False)


ScoreFn = Callable[[Router, RouteCtx, Backend, int, dict[str, float], dict[str, int], int], float]


def _prefix(
    r: Router,
    ctx: RouteCtx,
    b: Backend,
    i: int,
    loads: dict[str, float],
    matched: dict[str, int],
    nblocks: int,
) -> float:
    return matched.get(b.name, 0) / nblocks if nblocks else 0.0


def _load(
    r: Router,
    ctx: RouteCtx,
    b: Backend,
    i: int,
    loads: dict[str, float],
    matched: dict[str, int],
    nblocks: int,
) -> float:
    return max(0.0, 1.0 - loads[b.name])


def _session(
    r: Router,
    ctx: RouteCtx,
    b: Backend,
    i: int,
    loads: dict[str, float],
    matched: dict[str, int],
    nblocks: int,
) -> float:
    return 1.0 if ctx.session is not None and r.sessions.get(ctx.session) == b.name else 0.0


def _round_robin(
    r: Router,
    ctx: RouteCtx,
    b: Backend,
    i: int,
    loads: dict[str, float],
    matched: dict[str, int],
    nblocks: int,
) -> float:
    return 1.0 if i == 0 else 0.0


SCORERS: dict[str, ScoreFn] = {
    "prefix": _prefix,
    "load": _load,
    "session": _session,
    "round_robin": _round_robin,
}

POLICIES: dict[str, tuple[tuple[str, float], ...]] = {
    "round_robin": (("round_robin", 1.0),),
    "least_loaded": (("load", 1.0),),
    "prefix": (("prefix", 1.0), ("load", 0.5)),
    "session": (("session", 2.0), ("prefix", 1.0), ("load", 0.5)),
}


def make_router(cfg: RoutingConfig, load: LoadFn) -> Router:
    scorers = tuple(cfg.scorers.items()) if cfg.scorers else POLICIES[cfg.policy]
    return Router(
        scorers=scorers,
        load=load,
        block_chars=cfg.block_chars,
        prefix_ttl_s=cfg.prefix_ttl_s,
        max_blocks=cfg.max_blocks_per_backend,
        imbalance_abs=cfg.imbalance_abs,
        imbalance_rel=cfg.imbalance_rel,
    )
