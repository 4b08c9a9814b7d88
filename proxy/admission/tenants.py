"""Tenants: identity (API key map, ``x-tenant``, the body's ``user``), limits (concurrency,
tokens per minute), priority ceilings, and the virtual token counters (VTC) behind fairness
inside a class.

Identity, first that applies:

1. an ``Authorization: Bearer <key>`` (scheme case-insensitive) whose SHA-256 matches a
   tenant's ``api_key_sha256``: that tenant, up to its ``max_priority`` (default: its own
   ``priority`` class);
2. ``auth.required``: anything else is 401;
3. ``x-tenant`` naming a configured tenant: that tenant, up to its ``max_priority``, unless the
   tenant has API keys, whose name then must come with one of them (401);
4. ``x-tenant`` naming no configured tenant, the body's ``user`` (as a digest, never the raw
   value), else ``default``: an anonymous client, up to ``auth.anonymous_max_priority``.

API keys are matched by their digest; the key itself is never stored, logged or exported.
Counts are this replica's plus the other replicas' (``SharedView``) where a limit must hold
fleet-wide; the VTC counters are per replica (fairness is decided where the queue is). The
ledger never sees the queue: the scheduler gives it the numbers it needs.
"""

from __future__ import annotations

import collections
import hashlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import AuthConfig, TenantConfig
from ..errors import Shed, Unauthorized
from ..state import SharedView
from ..validate import parse_tenant

WINDOW_S = 60.0
MAX_COUNTERS = 10_000


def key_digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive)."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


@dataclass(frozen=True, slots=True)
class Identity:
    tenant: str
    default_class: str | None  # the tenant's configured default priority, if configured
    ceiling: str  # the highest class it may ask for


class TenantLedger:
    def __init__(
        self,
        tenants: tuple[TenantConfig, ...],
        auth: AuthConfig,
        view: SharedView,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.by_name = {t.name: t for t in tenants}
        self.by_digest = {d.lower(): t for t in tenants for d in t.api_key_sha256}
        self.auth, self.view, self.wall = auth, view, wall
        self.inflight: collections.Counter[str] = collections.Counter()
        self.vtc: dict[str, float] = {}
        self.window = int(wall() // WINDOW_S)  # wall-clock minute, shared by replicas
        self.window_tokens: collections.Counter[str] = collections.Counter()

    # --- identity ---

    def identify(self, headers: Mapping[str, str], body: Mapping[str, Any] | None) -> Identity:
        token = bearer_token(headers.get("authorization", ""))
        if token is not None and self.by_digest:
            t = self.by_digest.get(key_digest(token))
            if t is not None:
                return Identity(t.name, t.priority, t.max_priority or t.priority)
        if self.auth.required:
            raise Unauthorized("The API key is missing or unknown.", code="invalid_api_key")
        name = parse_tenant(headers.get("x-tenant"), body)
        t = self.by_name.get(name)
        if t is None:
            return Identity(name, None, self.auth.anonymous_max_priority)
        if t.api_key_sha256:
            raise Unauthorized(
                f"Tenant '{t.name}' is identified by its API key, not by x-tenant.",
                code="invalid_api_key",
            )
        return Identity(t.name, t.priority, t.max_priority or t.priority)

    # --- limits ---

    def _roll(self) -> float:
        """Start a new minute window when the wall-clock minute changed; seconds left in it."""
        wall = self.wall()
        window = int(wall // WINDOW_S)
        if window != self.window:
            self.window = window
            self.window_tokens.clear()
        return WINDOW_S - wall % WINDOW_S

    def check(self, tenant: str, est_tokens: int) -> None:
        """Raises ``Shed`` (``tenant_concurrency`` / ``tenant_tpm``) over a tenant's limits."""
        t = self.by_name.get(tenant)
        if t is None:
            return
        left_s = self._roll()
        if t.max_concurrency is not None:
            n = self.inflight[tenant] + self.view.remote_tenant_inflight(tenant)
            if n >= t.max_concurrency:
                raise Shed(
                    f"Tenant '{tenant}' already has {n} requests in flight "
                    f"(limit {t.max_concurrency}).",
                    reason="tenant_concurrency",
                    retry_after_s=1.0,
                )
        if t.tokens_per_minute is not None:
            used = self.window_tokens[tenant] + self.view.remote_tenant_tokens(tenant)
            if used + est_tokens > t.tokens_per_minute:
                raise Shed(
                    f"Tenant '{tenant}' used {used} of {t.tokens_per_minute} tokens this minute.",
                    reason="tenant_tpm",
                    retry_after_s=math.ceil(left_s),
                )

    # --- accounting ---

    def weight(self, tenant: str) -> float:
        t = self.by_name.get(tenant)
        return t.weight if t and t.weight > 0 else 1.0

    def counter(self, tenant: str) -> float:
        return self.vtc.get(tenant, 0.0)

    def join(self, tenant: str, floor: float | None) -> None:
        """A tenant joining the queue starts no lower than ``floor``, the least counter of the
        other tenants already waiting (None: nobody else waits): idling earns no credit."""
        if floor is not None and self.counter(tenant) < floor:
            self.vtc[tenant] = floor

    def dispatched(self, tenant: str, est_tokens: int) -> None:
        self.inflight[tenant] += 1
        self.vtc[tenant] = self.counter(tenant) + est_tokens / self.weight(tenant)
        self._roll()
        self.window_tokens[tenant] += est_tokens
        self._publish(tenant)

    def _publish(self, tenant: str) -> None:
        if tenant in self.by_name:  # only configured tenants have limits to share
            self.view.publish_tenant(
                tenant, self.inflight.get(tenant, 0), self.window_tokens[tenant], self.window
            )

    def finished(self, tenant: str, est_tokens: int, actual_tokens: int | None) -> None:
        """The request ended; ``actual_tokens`` (prompt + completion, when known) corrects the
        estimate charged at dispatch."""
        self.inflight[tenant] -= 1
        if self.inflight[tenant] <= 0:
            del self.inflight[tenant]
        if actual_tokens is not None:
            delta = actual_tokens - est_tokens
            self.vtc[tenant] = self.counter(tenant) + delta / self.weight(tenant)
            self.window_tokens[tenant] = max(0, self.window_tokens[tenant] + delta)
        self._publish(tenant)
        if len(self.vtc) > MAX_COUNTERS:  # bounded: forget the least-served idle tenants
            for name in sorted(self.vtc, key=self.vtc.__getitem__)[: MAX_COUNTERS // 10]:
                if name not in self.inflight:
                    del self.vtc[name]

    def tokens_this_minute(self) -> Mapping[str, int]:
        self._roll()
        return self.window_tokens
