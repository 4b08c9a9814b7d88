"""Backend choice for the proxy core: least in-flight first, ties broken round-robin.

Output: the candidates in the order to try them (the second is the retry target). Inputs: the
healthy backends that serve the model, and the proxy's own in-flight accounting (requests,
then estimated tokens), which is updated at dispatch so a burst spreads instead of
dogpiling one backend between scrapes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from .backends import Backend


class LeastLoaded:
    type_name = "least_loaded"

    def __init__(self) -> None:
        self._rr = itertools.count()

    def order(self, candidates: Sequence[Backend]) -> list[Backend]:
        n = len(candidates)
        if n <= 1:
            return list(candidates)
        start = next(self._rr) % n
        rotated = [*candidates[start:], *candidates[:start]]
        return sorted(rotated, key=lambda b: (b.inflight, b.inflight_tokens))
