"""Routing plugins by type name, and the named policies (weighted scorer lists).

A new plugin is one new module that decorates its class with ``@register`` plus one import
line in ``proxy/routing/__init__.py``. Names in the routing config are checked when the router
is built at start-up (``build_router``), errors naming the key.
"""

from __future__ import annotations

from typing import TypeVar

PLUGINS: dict[str, type] = {}
"""type_name -> plugin class (filters, scorers, pickers)."""

SCORER_NAMES = ("prefix", "load", "session", "round_robin")
"""The scorers a policy or ``routing.scorers`` may name."""

POLICIES: dict[str, tuple[tuple[str, float], ...]] = {
    "round_robin": (("round_robin", 1.0),),
    "least_loaded": (("load", 1.0),),
    "prefix": (("prefix", 1.0), ("load", 0.5)),
    "session": (("session", 2.0), ("prefix", 1.0), ("load", 0.5)),
}
"""Named policies: the scorers they weigh. ``routing.scorers`` overrides the list."""

T = TypeVar("T", bound=type)


def register(cls: T) -> T:
    name = cls.type_name  # type: ignore[attr-defined]
    if name in PLUGINS and PLUGINS[name] is not cls:
        raise ValueError(f"routing plugin {name!r} registered twice")
    PLUGINS[name] = cls
    return cls
