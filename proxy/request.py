"""A request's two halves: what the client asked (``InferenceRequest``, frozen once parsed) and
what happened to it (``Measurement``, filled in by the upstream layer as bytes flow), joined into
one immutable ``RequestRecord`` when the request ends.

Writers of a ``Measurement``: ``proxy.dispatch`` (backend, attempts, dispatch time, load at
dispatch), ``proxy.upstream.relay`` (status, first-token time, gaps, tokens, finish reason),
for the outcome of a request that failed, the handler (``fail``), and the group of the backend
that served it (the handler, or the shadow runner for its copies). Nothing else writes it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from estimator.records import ItlSummary, Outcome, RequestRecord


@dataclass(frozen=True, slots=True, kw_only=True)
class InferenceRequest:
    """A parsed, validated request, ready for admission and routing."""

    request_id: str
    endpoint: str  # "chat", "completions", or the last segment of another /v1 path
    method: str
    path: str  # what is sent upstream: a normalised /v1/... path with its query
    model: str  # a model a backend serves or the config names; "" for model-less requests
    stream: bool = False
    body: Mapping[str, Any] | None = None  # the parsed body (request log's log_prompts)
    data: bytes = b""  # the body sent upstream
    strip_usage: bool = False  # remove the usage chunk the proxy asked for on the client's behalf
    max_tokens: int | None = None
    est_prompt_tokens: int = 0
    est_tokens: int = 0  # prompt + expected output, for in-flight and fairness accounting
    tenant: str = "default"
    priority: str = "normal"
    deadline_s: float | None = None  # the client's x-request-deadline-ms, in seconds
    prefix_hashes: tuple[bytes, ...] = ()
    session: bytes | None = None  # digest of the session header (session routing only)
    group: str | None = None  # the deployment group an experiment chose (proxy.experiments)
    headers: Mapping[str, str] = field(default_factory=dict)  # forwarded upstream
    client_auth: str | None = field(default=None, repr=False)  # for forward_client_auth only


class Measurement:
    """What the proxy measured about one request; frozen into a record exactly once."""

    __slots__ = (
        "arrival_epoch",
        "arrival_s",
        "attempts",
        "backend",
        "cached_tokens",
        "completion_tokens",
        "content_events",
        "dispatch_s",
        "end_s",
        "finish_reason",
        "first_token_s",
        "gaps",
        "group",
        "inflight_requests",
        "inflight_tokens",
        "last_event_sent",
        "outcome",
        "prompt_tokens",
        "request_id",
        "shadow",
        "status",
        "tokens_estimated",
    )

    def __init__(self, request_id: str, *, arrival_s: float | None = None) -> None:
        self.request_id = request_id
        self.arrival_s = time.perf_counter() if arrival_s is None else arrival_s
        self.arrival_epoch = time.time()
        self.backend: str | None = None
        self.attempts = 0
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
        self.gaps: list[float] = []
        self.content_events = 0
        self.inflight_requests: int | None = None
        self.inflight_tokens: int | None = None
        self.last_event_sent = False  # the stream's final event ([DONE]) reached the client
        self.group: str | None = None  # the group of the backend that served it
        self.shadow = False  # a shadow copy (proxy.experiments.shadow), never seen by a client

    def fail(self, outcome: Outcome, status: int) -> None:
        self.outcome, self.status = outcome, status

    def dispatched(self, backend: str, inflight: tuple[int, int]) -> None:
        """An upstream attempt starts on ``backend``, which had ``inflight`` (requests,
        tokens) in flight before this request."""
        if self.dispatch_s is None:
            self.dispatch_s = time.perf_counter()
        self.attempts += 1
        self.backend = backend
        self.inflight_requests, self.inflight_tokens = inflight

    def to_record(self, req: InferenceRequest | None, endpoint: str) -> RequestRecord:
        """The record; ``req`` is None when the request failed before it was parsed."""
        if self.end_s is None:
            self.end_s = time.perf_counter()
        return RequestRecord(
            request_id=self.request_id,
            model=(req.model if req is not None else "") or "unknown",
            backend=self.backend,
            tenant=req.tenant if req is not None else "default",
            priority=req.priority if req is not None else "normal",
            endpoint=endpoint,
            streamed=req.stream if req is not None else False,
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
            max_tokens=req.max_tokens if req is not None else None,
            itl=ItlSummary.from_gaps(self.gaps),
            inflight_requests=self.inflight_requests,
            inflight_tokens=self.inflight_tokens,
            attempts=self.attempts,
            group=self.group,
            shadow=self.shadow,
        )
