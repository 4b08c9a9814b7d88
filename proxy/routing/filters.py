"""Filters: drop candidates that must not get this request now.

``headroom``: keeps backends with room under their admission limit (``proxy.admission``
decides the limit: configured, reported by the engine, or learned; lowered while the engine
reports a queue or a full KV cache). When it leaves none, admission queues the request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from proxy.config import RoutingConfig
from proxy.routing.base import E, Endpoint, PluginDeps, RouteCtx
from proxy.routing.registry import register


@register
class HeadroomFilter:
    type_name: ClassVar[str] = "headroom"

    def __init__(self, headroom: Callable[[Endpoint], bool]) -> None:
        self._headroom = headroom

    @classmethod
    def from_config(cls, cfg: RoutingConfig, deps: PluginDeps) -> HeadroomFilter:
        return cls(deps.headroom)

    def filter(self, ctx: RouteCtx, candidates: Sequence[E]) -> list[E]:
        ok = self._headroom
        return [b for b in candidates if ok(b)]
