"""Filters: drop candidates that must not get this request now.

``group``: keeps the backends of the deployment group an experiment chose for the request
(``RouteCtx.group``, decided once per request by ``proxy.experiments``); when that group has
no healthy backend serving the model, every candidate stays (availability first: a canary
request whose candidate is down is served by the baseline, and the other way round). Runs
first and always, so admission's limits and fairness then apply per backend unchanged.

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
class GroupFilter:
    type_name: ClassVar[str] = "group"
    admission: ClassVar[bool] = False

    def __init__(self, group_of: Callable[[str], str | None]) -> None:
        self._group_of = group_of

    @classmethod
    def from_config(cls, cfg: RoutingConfig, deps: PluginDeps) -> GroupFilter:
        return cls(deps.group_of)

    def filter(self, ctx: RouteCtx, candidates: Sequence[E]) -> list[E]:
        if ctx.group is None:
            return list(candidates)
        group_of, want = self._group_of, ctx.group
        inside = [b for b in candidates if group_of(b.name) == want]
        return inside or list(candidates)


@register
class HeadroomFilter:
    type_name: ClassVar[str] = "headroom"
    admission: ClassVar[bool] = True

    def __init__(self, headroom: Callable[[Endpoint], bool]) -> None:
        self._headroom = headroom

    @classmethod
    def from_config(cls, cfg: RoutingConfig, deps: PluginDeps) -> HeadroomFilter:
        return cls(deps.headroom)

    def filter(self, ctx: RouteCtx, candidates: Sequence[E]) -> list[E]:
        ok = self._headroom
        return [b for b in candidates if ok(b)]
