"""``max_score`` picker: the highest weighted score, with a load guard.

Order: descending weighted score; ties go to the lower load, then to rotation order (a counter
over decisions, so equal backends share the work).

Load guard (affinity must not create hot spots, the failure of pure-affinity routers): when the
policy weighs an affinity scorer (prefix, session) and the best-scored backend carries more
than ``min(routing.imbalance_abs, limit_best / 4)`` requests more than the least-loaded
candidate *and* more than ``(1 + routing.imbalance_rel)`` x its count, the least-loaded
candidate goes first (reason ``imbalance_guard``).

Reasons: ``session`` (the session's backend won), ``prefix_hit`` (the winner holds part of the
prefix), ``imbalance_guard``, else the first scorer's name.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import ClassVar

from proxy.config import RoutingConfig
from proxy.routing.base import Endpoint, InflightFn, LoadFn, PluginDeps
from proxy.routing.registry import register


@register
class MaxScorePicker:
    type_name: ClassVar[str] = "max_score"

    def __init__(
        self, *, load: LoadFn, inflight: InflightFn, imbalance_abs: float, imbalance_rel: float
    ) -> None:
        self._load, self._inflight = load, inflight
        self.imbalance_abs, self.imbalance_rel = imbalance_abs, imbalance_rel
        self._turn = itertools.count()

    @classmethod
    def from_config(cls, cfg: RoutingConfig, deps: PluginDeps) -> MaxScorePicker:
        return cls(
            load=deps.load,
            inflight=deps.inflight,
            imbalance_abs=cfg.imbalance_abs,
            imbalance_rel=cfg.imbalance_rel,
        )

    def order(self, candidates: Sequence[Endpoint], scores: dict[str, float]) -> list[Endpoint]:
        """Candidates (at least one) by descending score, ties by load then rotation."""
        n = len(candidates)
        turn = next(self._turn) % n
        rotated = [*candidates[turn:], *candidates[:turn]]
        load = self._load
        return sorted(rotated, key=lambda b: (-scores.get(b.name, 0.0), load(b)))

    def guard(self, ordered: list[Endpoint]) -> bool:
        """Move the least-loaded candidate first when the best one is a hot spot."""
        best = ordered[0]
        least = min(ordered, key=self._load)
        if least is best:
            return False
        in_b, limit_b = self._inflight(best)
        in_l, _ = self._inflight(least)
        threshold = min(self.imbalance_abs, max(1.0, 0.25 * limit_b))
        if in_b - in_l > threshold and in_b > (1 + self.imbalance_rel) * in_l:
            ordered.remove(least)
            ordered.insert(0, least)
            return True
        return False
