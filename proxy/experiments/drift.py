"""Model version drift: backends of one group that announce different models or settings.

A group is meant to be identical replicas. Each backend's *version* of a model is a short
digest of what it announces about it: the stable fields of its ``/v1/models`` entry (vLLM's
``root``, ``parent`` and ``max_model_len``, llama.cpp's ``meta``: parameters, size, training
context, vocabulary; ``owned_by``; never ids or timestamps that change at every start) and the
engine settings its ``/metrics`` exposes (dialect, KV block size, ``max_num_seqs``,
``max_model_len``). ``drift`` gives, per group and model served by two or more of its up
backends, the number of distinct versions minus one (0: consistent), exported as
``rightsizer_model_version_drift{group,model}`` with the per-backend versions in
``rightsizer_backend_model_version_info``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from estimator.records import BackendSnapshot

_ENTRY_FIELDS = ("root", "parent", "max_model_len", "owned_by", "meta")
_SNAPSHOT_FIELDS = ("dialect", "block_size", "max_num_seqs", "max_model_len")


class Announcing(Protocol):
    """What drift reads of a backend."""

    @property
    def name(self) -> str: ...
    @property
    def models(self) -> frozenset[str]: ...
    @property
    def model_entries(self) -> Mapping[str, Mapping[str, Any]]: ...
    @property
    def snapshot(self) -> BackendSnapshot | None: ...
    def available(self, now: float) -> bool: ...


@dataclass(frozen=True, slots=True)
class Drift:
    group: str
    model: str
    versions: dict[str, str]  # backend -> version digest

    @property
    def distinct(self) -> int:
        return len(set(self.versions.values()))


def version(entry: Mapping[str, Any] | None, snap: BackendSnapshot | None) -> str:
    """An 8-hex digest of what a backend announces about one model (module docstring)."""
    announced: dict[str, Any] = {}
    for k in _ENTRY_FIELDS:
        if entry is not None and entry.get(k) is not None:
            announced[f"model.{k}"] = entry[k]
    for k in _SNAPSHOT_FIELDS:
        v = getattr(snap, k, None) if snap is not None else None
        if v is not None:
            announced[f"engine.{k}"] = v
    blob = orjson.dumps(announced, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(blob, digest_size=4).hexdigest()


def drift(
    backends: Iterable[Announcing],
    group_of: Callable[[str], str | None],
    now: float | None = None,
) -> list[Drift]:
    """Versions per (group, model) over the group's backends that are up (module docstring)."""
    t = time.monotonic() if now is None else now
    seen: dict[tuple[str, str], dict[str, str]] = {}
    for b in backends:
        group = group_of(b.name)
        if group is None or not b.available(t):
            continue
        for model in sorted(b.models):
            seen.setdefault((group, model), {})[b.name] = version(
                b.model_entries.get(model), b.snapshot
            )
    return [Drift(g, m, v) for (g, m), v in sorted(seen.items())]
