"""Tenants: identity (API key map, ``x-tenant``, the body's ``user``), limits (concurrency,
tokens per minute) and the virtual token counters (VTC) behind fairness inside a class.

API keys are matched by their SHA-256 digest; the key itself is never stored, logged or
exported. Counts are this replica's plus the other replicas' (shared state) where a limit
must hold fleet-wide; the VTC counters are per replica (fairness is decided where the queue
is)."""

from __future__ import annotations

import collections
import hashlib
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .config import AuthConfig, TenantConfig
from .errors import Shed, Unauthorized
from .exchange import Exchange
from .telemetry import Metrics
from .validate import parse_tenant

if TYPE_CHECKING:
    from .admission import ModelQueue

WINDOW_S = 60.0


def key_digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class TenantLedger:
    def __init__(
        self, tenants: tuple[TenantConfig, ...], auth: AuthConfig, metrics: Metrics
    ) -> None:
        self.by_name = {t.name: t for t in tenants}
        self.by_digest = {d.lower(): t for t in tenants for d in t.api_key_sha256}
        self.auth = auth
        self.metrics = metrics
        self.inflight: collections.Counter[str] = collections.Counter()
        self.vtc: dict[str, float] = {}
        self.window = int(time.time() // WINDOW_S)  # wall-clock minute, shared by replicas
        self.window_tokens: collections.Counter[str] = collections.Counter()
        # other replicas' counts, filled by the shared-state sync
        self.remote_inflight: Mapping[str, int] = {}
        self.remote_window_tokens: Mapping[str, int] = {}

    # --- identity ---

    def identify(
        self, headers: Mapping[str, str], body: dict[str, Any] | None
    ) -> tuple[str, str | None]:
        """(tenant, its default priority class or None)."""
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and self.by_digest:
            t = self.by_digest.get(key_digest(auth[7:].strip()))
            if t is not None:
                return t.name, t.priority
        if self.auth.required:
            raise Unauthorized("The API key is missing or unknown.", code="invalid_api_key")
        name = parse_tenant(headers.get("x-tenant"), body)
        t = self.by_name.get(name)
        return name, t.priority if t else None

    # --- limits ---

    def _roll(self) -> float:
        """Start a new minute window when the wall-clock minute changed; seconds left in it."""
        wall = time.time()
        window = int(wall // WINDOW_S)
        if window != self.window:
            self.window = window
            self.window_tokens.clear()
        return WINDOW_S - wall % WINDOW_S

    def check(self, ex: Exchange, now: float) -> None:
        t = self.by_name.get(ex.tenant)
        if t is None:
            return
        left_s = self._roll()
        if t.max_concurrency is not None:
            n = self.inflight[ex.tenant] + self.remote_inflight.get(ex.tenant, 0)
            if n >= t.max_concurrency:
                raise self._shed(
                    ex,
                    "tenant_concurrency",
                    f"Tenant '{ex.tenant}' already has {n} requests in flight "
                    f"(limit {t.max_concurrency}).",
                    1.0,
                )
        if t.tokens_per_minute is not None:
            used = self.window_tokens[ex.tenant] + self.remote_window_tokens.get(ex.tenant, 0)
            if used + ex.est_tokens > t.tokens_per_minute:
                raise self._shed(
                    ex,
                    "tenant_tpm",
                    f"Tenant '{ex.tenant}' used {used} of {t.tokens_per_minute} tokens "
                    "this minute.",
                    left_s,
                )

    def _shed(self, ex: Exchange, reason: str, message: str, retry_after_s: float) -> Shed:
        self.metrics.shed.labels(ex.model, ex.priority, reason).inc()
        return Shed(message, reason=reason, retry_after_s=math.ceil(retry_after_s))

    # --- accounting ---

    def weight(self, tenant: str) -> float:
        t = self.by_name.get(tenant)
        return t.weight if t and t.weight > 0 else 1.0

    def counter(self, tenant: str) -> float:
        return self.vtc.get(tenant, 0.0)

    def backlogged(self, tenant: str, queue: ModelQueue) -> None:
        """A tenant joining the queue starts no lower than the least counter already waiting."""
        waiting = {w.ex.tenant for w in queue.waiters()} - {tenant}
        if waiting:
            floor = min(self.counter(t) for t in waiting)
            if self.counter(tenant) < floor:
                self.vtc[tenant] = floor

    def dispatched(self, ex: Exchange) -> None:
        self.inflight[ex.tenant] += 1
        self.vtc[ex.tenant] = self.counter(ex.tenant) + ex.est_tokens / self.weight(ex.tenant)
        self._roll()
        self.window_tokens[ex.tenant] += ex.est_tokens

    def finished(self, ex: Exchange) -> None:
        self.inflight[ex.tenant] -= 1
        if self.inflight[ex.tenant] <= 0:
            del self.inflight[ex.tenant]
        if ex.prompt_tokens is not None or ex.completion_tokens is not None:
            actual = (ex.prompt_tokens or 0) + (ex.completion_tokens or 0)
            delta = actual - ex.est_tokens
            self.vtc[ex.tenant] = self.counter(ex.tenant) + delta / self.weight(ex.tenant)
            self.window_tokens[ex.tenant] = max(0, self.window_tokens[ex.tenant] + delta)
        if len(self.vtc) > 10_000:  # bounded: forget the least-served idle tenants
            for name in sorted(self.vtc, key=self.vtc.__getitem__)[:1000]:
                if name not in self.inflight:
                    del self.vtc[name]
