"""The routing pipeline: filters -> weighted scorers -> picker, every plugin timed.

``route`` orders the candidates by ``sum_s weight_s * score_s(b)`` (each score in [0, 1]) with
the picker's tie-breaks and load guard (``proxy.routing.picker``); ``on_routed`` tells every
plugin that learns from decisions which backend got the request. Plugin time and calls are
accumulated per type name (``rightsizer_routing_plugin_seconds_total``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from proxy.config import ConfigError, RoutingConfig
from proxy.routing.base import Decision, E, Endpoint, PluginDeps, RouteCtx, on_routed
from proxy.routing.picker import MaxScorePicker
from proxy.routing.registry import PLUGINS, POLICIES, SCORER_NAMES
from proxy.telemetry import PluginTimer

_AFFINITY = frozenset({"prefix", "session"})


class Router:
    def __init__(
        self,
        *,
        filters: Sequence[Any],
        scorers: Sequence[tuple[Any, float]],
        picker: MaxScorePicker,
        block_chars: int = 256,
        timer: PluginTimer | None = None,
    ) -> None:
        self.filters = list(filters)
        self.scorers = [(s, w) for s, w in scorers if w > 0]
        self.picker = picker
        self.block_chars = block_chars
        self.timer = timer or PluginTimer()
        names = {s.type_name for s, _ in self.scorers}
        self.uses_prefix = "prefix" in names
        self.uses_session = "session" in names
        self.guarded = bool(names & _AFFINITY)
        self._first = self.scorers[0][0].type_name if self.scorers else "first"
        self._learners = [p for p in (*self.filters, *(s for s, _ in self.scorers), picker)
                          if hasattr(p, "on_routed")]  # fmt: skip

    def plugin(self, type_name: str) -> Any | None:
        """The policy's plugin of that type (e.g. the prefix scorer, for shared state)."""
        for p in (*self.filters, *(s for s, _ in self.scorers)):
            if p.type_name == type_name:
                return p
        return None

    def filter(self, ctx: RouteCtx, candidates: Sequence[E], *, admission: bool = True) -> list[E]:
        """The candidates every filter keeps; ``admission=False`` skips the admission filters
        (headroom) when the proxy does not hold the queue."""
        out = list(candidates)
        timer, perf = self.timer, time.perf_counter
        for f in self.filters:
            if f.admission and not admission:
                continue
            t0 = perf()
            out = f.filter(ctx, out)
            timer.add(f.type_name, perf() - t0)
            if not out:
                break
        return out

    def route(self, ctx: RouteCtx, candidates: Sequence[Endpoint]) -> Decision:
        if not candidates:
            return Decision([], "none", None)
        timer, perf = self.timer, time.perf_counter
        totals = dict.fromkeys((b.name for b in candidates), 0.0)
        prefix_scores: dict[str, float] = {}
        for scorer, weight in self.scorers:
            t0 = perf()
            scores = scorer.score(ctx, candidates)
            timer.add(scorer.type_name, perf() - t0)
            if scorer.type_name == "prefix":
                prefix_scores = scores
            for name, s in scores.items():
                totals[name] += weight * s
        t0 = perf()
        ordered = self.picker.order(candidates, totals)
        best = ordered[0]
        reason = self._reason(ctx, best, prefix_scores)
        if self.guarded and len(ordered) > 1 and self.picker.guard(ordered):
            best, reason = ordered[0], "imbalance_guard"
        timer.add(self.picker.type_name, perf() - t0)
        ratio = prefix_scores.get(best.name, 0.0) if ctx.hashes and self.uses_prefix else None
        return Decision(ordered, reason, ratio)

    def _reason(self, ctx: RouteCtx, best: Endpoint, prefix_scores: dict[str, float]) -> str:
        if self.uses_session and ctx.session is not None:
            session = self.plugin("session")
            if session is not None and session.backend_of(ctx.session) == best.name:
                return "session"
        if prefix_scores.get(best.name):
            return "prefix_hit"
        return str(self._first)

    def on_routed(self, ctx: RouteCtx, chosen: Endpoint) -> None:
        for p in self._learners:
            on_routed(p, ctx, chosen)


def _build(type_name: str, cfg: RoutingConfig, deps: PluginDeps) -> Any:
    return PLUGINS[type_name].from_config(cfg, deps)  # type: ignore[attr-defined]


def build_router(
    cfg: RoutingConfig,
    deps: PluginDeps,
    *,
    timer: PluginTimer | None = None,
    source: str = "config",
) -> Router:
    """The router a routing config describes; an unknown name is a ``ConfigError`` naming its
    key (``routing.scorers.prefx: unknown scorer``)."""
    if cfg.policy not in POLICIES:
        raise ConfigError(
            source,
            "routing.policy",
            f"unknown policy {cfg.policy!r} (known: {', '.join(POLICIES)})",
        )
    weights = tuple(cfg.scorers.items()) if cfg.scorers else POLICIES[cfg.policy]
    for name, _ in weights:
        if name not in PLUGINS or not hasattr(PLUGINS[name], "score"):
            raise ConfigError(
                source,
                f"routing.scorers.{name}",
                f"unknown scorer (known: {', '.join(SCORER_NAMES)})",
            )
    return Router(
        filters=[_build("group", cfg, deps), _build("headroom", cfg, deps)],
        scorers=[(_build(name, cfg, deps), float(w)) for name, w in weights],
        picker=_build("max_score", cfg, deps),
        block_chars=cfg.block_chars,
        timer=timer,
    )
