"""``round_robin``: take turns.

score_b = 1 for the candidate whose turn it is (a counter over decisions, modulo the number of
candidates), else 0. Range {0, 1}.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import ClassVar

from proxy.config import RoutingConfig
from proxy.routing.base import Endpoint, PluginDeps, RouteCtx
from proxy.routing.registry import register


@register
class RoundRobinScorer:
    type_name: ClassVar[str] = "round_robin"

    def __init__(self) -> None:
        self._turn = itertools.count()

    @classmethod
    def from_config(cls, cfg: RoutingConfig, deps: PluginDeps) -> RoundRobinScorer:
        return cls()

    def score(self, ctx: RouteCtx, candidates: Sequence[Endpoint]) -> dict[str, float]:
        if not candidates:
            return {}
        turn = next(self._turn) % len(candidates)
        return {b.name: 1.0 if i == turn else 0.0 for i, b in enumerate(candidates)}
