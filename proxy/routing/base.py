"""The routing contracts: filters -> weighted scorers -> picker, and what they read.

A routing decision takes the request's ``RouteCtx`` and the candidate backends (healthy,
serving the model). ``Filter``s drop candidates (e.g. no headroom); each ``Scorer`` gives every
remaining candidate a score in [0, 1]; the ``Picker`` orders them from the weighted sums.
Plugins are synchronous, never await, never import aiohttp, never change their inputs, and
keep their own state (a prefix index, a session table, a rotation counter), which they learn
from ``on_routed`` (the backend chosen for a request). Each plugin has a ``type_name`` (its
registry key) and is built from the routing config by its ``from_config`` class method.

``Endpoint`` is what plugins may read of a backend: its name and its last engine snapshot.
Load is not a backend field: admission owns the in-flight limit, so plugins that need load
are given the ``LoadFn`` it provides (``PluginDeps``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from estimator.records import BackendSnapshot
    from proxy.config import RoutingConfig


class Endpoint(Protocol):
    """What a routing plugin may read of a backend."""

    @property
    def name(self) -> str: ...
    @property
    def snapshot(self) -> BackendSnapshot | None: ...


E = TypeVar("E", bound=Endpoint)

LoadFn = Callable[[Endpoint], float]
"""In-flight requests / the admission limit (0 idle, 1 full, above 1 over the limit)."""
InflightFn = Callable[[Endpoint], tuple[int, int]]
"""(in-flight requests, admission limit) of a backend."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteCtx:
    """What a routing decision knows of the request (immutable)."""

    model: str = ""
    hashes: Sequence[bytes] = ()  # chained prefix-block hashes of the prompt
    session: bytes | None = None  # digest of the session header (session policy only)
    now: float = 0.0  # monotonic seconds
    group: str | None = None  # the deployment group an experiment chose for the request


@dataclass(frozen=True, slots=True)
class Decision:
    ordered: list[Endpoint]  # best first; the rest are fallbacks for a retry
    reason: str
    matched_ratio: float | None  # of the chosen backend; None when the prompt has no block


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginDeps:
    """What plugins may be given at build time besides their config."""

    load: LoadFn
    inflight: InflightFn
    headroom: Callable[[Endpoint], bool]
    group_of: Callable[[str], str | None] = lambda _backend: None
    """The deployment group (``groups[].name``) of a backend, by name; None: in no group."""


@runtime_checkable
class Plugin(Protocol):
    type_name: ClassVar[str]

    @classmethod
    def from_config(cls, cfg: RoutingConfig, deps: PluginDeps) -> Plugin: ...


class Filter(Plugin, Protocol):
    admission: ClassVar[bool]
    """True: an admission filter, skipped when ``scheduling.enabled`` is off (the engines
    queue); False: applies always (e.g. the experiment's group)."""

    def filter(self, ctx: RouteCtx, candidates: Sequence[E]) -> list[E]: ...


class Scorer(Plugin, Protocol):
    def score(self, ctx: RouteCtx, candidates: Sequence[Endpoint]) -> dict[str, float]:
        """Backend name -> score in [0, 1]."""
        ...


class Picker(Plugin, Protocol):
    def order(self, candidates: Sequence[Endpoint], scores: dict[str, float]) -> list[Endpoint]:
        """Best first (candidates is never empty)."""
        ...

    def guard(self, ordered: list[Endpoint]) -> bool:
        """Reorder ``ordered`` in place when the best is a hot spot; True if it did."""
        ...


def on_routed(plugin: object, ctx: RouteCtx, chosen: Endpoint) -> None:
    """The optional observer hook: plugins that learn from decisions define ``on_routed``."""
    hook = getattr(plugin, "on_routed", None)
    if hook is not None:
        hook(ctx, chosen)
