"""``prefix``: send a prompt where its prefix is most likely still in the engine's KV cache.

score_b = matched_blocks_b / request_blocks (0 when the prompt has no whole block), where
matched_blocks_b is how many leading prefix blocks of the prompt were routed to b within
``routing.prefix_ttl_s`` (``PrefixIndex``; see ``proxy.routing.prefix_index`` for the hashing).
Range [0, 1]. Each backend's index is bounded by ``routing.max_blocks_per_backend`` and by
what the engine can hold (its KV capacity in tokens / tokens per block) when it reports it.

The index learns from ``on_routed`` (this replica's decisions) and from ``learn`` (the other
replicas' decisions, through shared state); ``subscribe`` gives this replica's decisions to
shared state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from proxy.config import RoutingConfig
from proxy.routing.base import Endpoint, PluginDeps, RouteCtx
from proxy.routing.prefix_index import CHARS_PER_TOKEN, PrefixIndex
from proxy.routing.registry import register

Listener = Callable[[str, Sequence[bytes]], None]


@register
class PrefixScorer:
    type_name: ClassVar[str] = "prefix"

    def __init__(self, *, block_chars: int, ttl_s: float, max_blocks: int) -> None:
        self.block_chars, self.ttl_s, self.max_blocks = block_chars, ttl_s, max_blocks
        self._indexes: dict[str, PrefixIndex] = {}
        self._listeners: list[Listener] = []

    @classmethod
    def from_config(cls, cfg: RoutingConfig, deps: PluginDeps) -> PrefixScorer:
        return cls(
            block_chars=cfg.block_chars,
            ttl_s=cfg.prefix_ttl_s,
            max_blocks=cfg.max_blocks_per_backend,
        )

    def subscribe(self, fn: Listener) -> None:
        """``fn(backend, hashes)`` after every decision (shared state publishes them)."""
        self._listeners.append(fn)

    def index(self, backend: Endpoint) -> PrefixIndex:
        idx = self._index(backend.name)
        snap = backend.snapshot
        if snap is not None and snap.kv_capacity_tokens:  # never remember more than it holds
            cap = max(1, snap.kv_capacity_tokens * CHARS_PER_TOKEN // self.block_chars)
            if cap != idx.max_blocks and cap < self.max_blocks:
                idx.resize(cap)
        return idx

    def _index(self, name: str) -> PrefixIndex:
        idx = self._indexes.get(name)
        if idx is None:
            idx = self._indexes[name] = PrefixIndex(self.max_blocks, self.ttl_s)
        return idx

    def matched(self, ctx: RouteCtx, backend: Endpoint) -> int:
        return self.index(backend).match(ctx.hashes, ctx.now) if ctx.hashes else 0

    def score(self, ctx: RouteCtx, candidates: Sequence[Endpoint]) -> dict[str, float]:
        n = len(ctx.hashes)
        if not n:
            return {b.name: 0.0 for b in candidates}
        return {b.name: self.matched(ctx, b) / n for b in candidates}

    def on_routed(self, ctx: RouteCtx, chosen: Endpoint) -> None:
        if ctx.hashes:
            self.index(chosen).insert(ctx.hashes, ctx.now)
            for fn in self._listeners:
                fn(chosen.name, ctx.hashes)

    def learn(self, backend: str, hashes: Sequence[bytes], t: float) -> None:
        """Another replica routed these blocks to ``backend`` at monotonic time ``t``."""
        self._index(backend).insert(hashes, t)
