"""``load``: prefer the least loaded backend.

score_b = 1 - min(1, u_b), where u_b = in-flight requests / admission limit (this replica's
plus the other replicas' through shared state, counted at dispatch, so bursts spread before
the engines' metrics catch up). Range [0, 1]; 1 is idle, 0 is at or over its limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from proxy.config import RoutingConfig
from proxy.routing.base import Endpoint, LoadFn, PluginDeps, RouteCtx
from proxy.routing.registry import register


@register
class LoadScorer:
    type_name: ClassVar[str] = "load"

    def __init__(self, load: LoadFn) -> None:
        self._load = load

    @classmethod
    def from_config(cls, cfg: RoutingConfig, deps: PluginDeps) -> LoadScorer:
        return cls(deps.load)

    def score(self, ctx: RouteCtx, candidates: Sequence[Endpoint]) -> dict[str, float]:
        load = self._load
        return {b.name: 1.0 - min(1.0, max(0.0, load(b))) for b in candidates}
