"""Backend choice: filters -> weighted scorers (each in [0, 1]) -> picker.

``base`` holds the contracts, ``registry`` the plugins by type name and the named policies,
``router`` the pipeline; one module per plugin (``filters``, ``scorers/*``, ``picker``).
Importing this package registers every plugin.
"""

from proxy.routing import filters, picker  # noqa: F401  (registers the plugins)
from proxy.routing.base import Decision, PluginDeps, RouteCtx
from proxy.routing.prefix_index import block_hashes, canonical_text
from proxy.routing.router import Router, build_router
from proxy.routing.scorers import load, prefix, round_robin, session  # noqa: F401

__all__ = [
    "Decision",
    "PluginDeps",
    "RouteCtx",
    "Router",
    "block_hashes",
    "build_router",
    "canonical_text",
]
