"""Prefix hashing and a bounded, decaying per-backend prefix index.

Hashing: the prompt's canonical text (chat: role and content of every message in order, with
separators; completions: the prompt) is cut into blocks of ``block_chars`` characters; block
k's hash is blake2b-64 over (hash of block k-1, block k), so one hash names its whole prefix.
Only whole blocks are hashed (a partial tail is never cached by an engine either).

Index: per backend, an LRU map ``hash -> last time routed there``. Its size is bounded by
``max_blocks`` (from the backend's KV capacity when the engine reports it: the engine can't
hold more than ``kv_tokens / tokens_per_block`` blocks, so remembering more only lies) and
entries older than ``ttl_s`` are treated as evicted (engines evict cold blocks too).
``match(hashes)`` returns how many leading blocks the backend is believed to hold.
Memory: about 100 bytes per entry; 1M entries across backends ≈ 100 MB at most.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence
from typing import Any

SEP_MSG = "\x1e"
SEP_ROLE = "\x1f"
CHARS_PER_TOKEN = 4
"""Characters per token assumed where only characters are known (prompt estimates, block
sizes): English text in BPE vocabularies averages about four."""


def canonical_text(body: dict[str, Any], endpoint: str) -> str:
    if endpoint == "chat":
        parts = []
        for m in body.get("messages") or ():
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):
                texts = (p.get("text") for p in content if isinstance(p, dict))
                content = "".join(t for t in texts if isinstance(t, str))
            elif not isinstance(content, str):
                content = ""
            role = m.get("role")
            parts.append(f"{role if isinstance(role, str) else ''}{SEP_ROLE}{content}{SEP_MSG}")
        return "".join(parts)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        return SEP_MSG.join(str(p) for p in prompt)
    return str(prompt)


def block_hashes(text: str, block_chars: int, max_blocks: int = 4096) -> list[bytes]:
    out: list[bytes] = []
    prev = b""
    data = text.encode("utf-8", "surrogatepass")
    # blocks over encoded bytes: cheap, deterministic; block_chars counts bytes for non-ASCII
    for start in range(0, min(len(data), block_chars * max_blocks) - block_chars + 1, block_chars):
        prev = hashlib.blake2b(prev + data[start : start + block_chars], digest_size=8).digest()
        out.append(prev)
    return out


class PrefixIndex:
    """One backend's remembered block hashes (LRU, bounded, with time decay)."""

    __slots__ = ("_lru", "max_blocks", "ttl_s")

    def __init__(self, max_blocks: int, ttl_s: float) -> None:
        self._lru: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self.max_blocks = max_blocks
        self.ttl_s = ttl_s

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, hashes: Sequence[bytes], now: float) -> int:
        """Leading blocks present and fresh. Chained hashes: binary search on the prefix."""
        lru, cutoff = self._lru, now - self.ttl_s
        lo, hi = 0, len(hashes)
        while lo < hi:  # invariant: blocks [0, lo) present
            mid = (lo + hi + 1) // 2
            t = lru.get(hashes[mid - 1])
            if t is not None and t >= cutoff:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def insert(self, hashes: Sequence[bytes], now: float) -> None:
        """Deepest block first, so the LRU evicts deep blocks before the shared shallow ones
        and "block k present" keeps implying "blocks < k present" (``match`` relies on it)."""
        lru = self._lru
        for h in reversed(hashes):
            lru[h] = now
            lru.move_to_end(h)
        while len(lru) > self.max_blocks:
            lru.popitem(last=False)

    def resize(self, max_blocks: int) -> None:
        self.max_blocks = max(1, max_blocks)
        while len(self._lru) > self.max_blocks:
            self._lru.popitem(last=False)

    def items_since(self, t: float) -> list[tuple[bytes, float]]:
        """Entries touched at or after ``t`` (newest last), for sharing with other replicas."""
        out = []
        for h, ts in reversed(self._lru.items()):
            if ts < t:
                break
            out.append((h, ts))
        out.reverse()
        return out
