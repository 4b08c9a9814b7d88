"""Routing plugins by type name, and the named policies (weighted scorer lists).

A new plugin is one new module that decorates its class with ``@register`` plus one import
line in ``proxy/routing/__init__.py``. This module imports nothing of the proxy, so the config
loader can check names at load time without an import cycle.
"""

from __future__ import annotations

from typing import TypeVar

PLUGINS: dict[str, type] = {}
"""type_name -> plugin class (filters, scorers, pickers)."""

SCORER_NAMES = ("prefix", "load", "session", "round_robin")
"""The scorers a policy or ``routing.scorers`` may name (checked at config load)."""

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


def policy_problem(policy: str, scorers: dict[str, float]) -> tuple[str, str] | None:
    """(key, reason) of the first unknown name in a routing config, or None."""
    if policy not in POLICIES:
        return "policy", f"unknown policy {policy!r} (known: {', '.join(POLICIES)})"
    for name in scorers:
        if name not in SCORER_NAMES:
            return f"scorers.{name}", f"unknown scorer (known: {', '.join(SCORER_NAMES)})"
    return None
