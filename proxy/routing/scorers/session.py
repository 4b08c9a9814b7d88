"""``session``: keep a session on the backend that served it last (its KV cache is there).

score_b = 1 when the request's session was last routed to b, else 0. Range {0, 1}.

The session key is the digest of the session header (``routing.session_header``), made only
when the policy uses this scorer; the table maps digests (16 bytes) to backend names, least
recently used first, bounded by ``routing.session_memory_bytes``: a client-chosen id of any
size costs the same few dozen bytes, and ids are never stored in clear.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence
from typing import ClassVar

from proxy.config import RoutingConfig
from proxy.routing.base import Endpoint, PluginDeps, RouteCtx
from proxy.routing.registry import register

ENTRY_BYTES = 160
"""Approximate memory of one table entry: a 16-byte digest key, the shared name string, and
the ordered dict's node and hash slot."""


def session_key(value: str) -> bytes:
    """The digest a session header value is remembered by."""
    return hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=16).digest()


@register
class SessionScorer:
    type_name: ClassVar[str] = "session"

    def __init__(self, memory_bytes: int) -> None:
        self.max_entries = max(1, memory_bytes // ENTRY_BYTES)
        self._table: collections.OrderedDict[bytes, str] = collections.OrderedDict()

    @classmethod
    def from_config(cls, cfg: RoutingConfig, deps: PluginDeps) -> SessionScorer:
        return cls(cfg.session_memory_bytes)

    def __len__(self) -> int:
        return len(self._table)

    def backend_of(self, session: bytes | None) -> str | None:
        return None if session is None else self._table.get(session)

    def score(self, ctx: RouteCtx, candidates: Sequence[Endpoint]) -> dict[str, float]:
        last = self.backend_of(ctx.session)
        return {b.name: 1.0 if b.name == last else 0.0 for b in candidates}

    def on_routed(self, ctx: RouteCtx, chosen: Endpoint) -> None:
        if ctx.session is None:
            return
        table = self._table
        table[ctx.session] = chosen.name
        table.move_to_end(ctx.session)
        while len(table) > self.max_entries:
            table.popitem(last=False)
