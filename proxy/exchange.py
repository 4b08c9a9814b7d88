"""``Exchange``: the mutable per-request state the relay fills in, frozen into a RequestRecord
exactly once when the request ends."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from estimator.records import ItlSummary, Outcome, RequestRecord

if TYPE_CHECKING:
    from .backends import Backend


class Exchange:
    __slots__ = (
        "arrival_epoch",
        "arrival_s",
        "attempts",
        "backend",
        "cached_tokens",
        "completion_tokens",
        "dispatch_s",
        "end_s",
        "endpoint",
        "est_prompt_tokens",
        "est_tokens",
        "finish_reason",
        "first_token_s",
        "gaps",
        "held",
        "inflight_requests",
        "inflight_tokens",
        "max_tokens",
        "model",
        "outcome",
        "priority",
        "prompt_tokens",
        "request_body",
        "request_id",
        "status",
        "streamed",
        "tenant",
        "tokens_estimated",
    )

    def __init__(self, request_id: str, *, endpoint: str, arrival_s: float | None = None) -> None:
        self.request_id = request_id
        self.endpoint = endpoint
        self.arrival_s = time.perf_counter() if arrival_s is None else arrival_s
        self.arrival_epoch = time.time()
        self.model = ""
        self.tenant = "default"
        self.priority = "normal"
        self.streamed = False
        self.backend: str | None = None
        self.status: int | None = None
        self.outcome = Outcome.OK
        self.finish_reason: str | None = None
        self.dispatch_s: float | None = None
        self.first_token_s: float | None = None
        self.end_s: float | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.cached_tokens: int | None = None
        self.tokens_estimated = False
        self.max_tokens: int | None = None
        self.est_prompt_tokens = 0
        self.est_tokens = 0  # prompt + max output, for in-flight token accounting
        self.gaps: list[float] = []
        self.inflight_requests: int | None = None
        self.inflight_tokens: int | None = None
        self.attempts = 0
        self.request_body: dict[str, Any] | None = None  # for the request log's log_prompts
        self.held: Backend | None = None  # the backend whose in-flight slot this request holds

    def fail(self, outcome: Outcome, status: int) -> None:
        self.outcome, self.status = outcome, status

    def to_record(self) -> RequestRecord:
        if self.end_s is None:
            self.end_s = time.perf_counter()
        return RequestRecord(
            request_id=self.request_id,
            model=self.model or "unknown",
            backend=self.backend,
            tenant=self.tenant,
            priority=self.priority,
            endpoint=self.endpoint,
            streamed=self.streamed,
            status=self.status,
            outcome=self.outcome,
            finish_reason=self.finish_reason,
            arrival_s=self.arrival_s,
            dispatch_s=self.dispatch_s,
            first_token_s=self.first_token_s,
            end_s=self.end_s,
            arrival_epoch=self.arrival_epoch,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
            tokens_estimated=self.tokens_estimated,
            max_tokens=self.max_tokens,
            itl=ItlSummary.from_gaps(self.gaps),
            inflight_requests=self.inflight_requests,
            inflight_tokens=self.inflight_tokens,
            attempts=self.attempts,
        )
