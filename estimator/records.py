"""The contracts between the proxy and the estimator.

``RequestRecord``: one per request the proxy accepted, produced exactly once (in a
``finally``), immutable. ``BackendSnapshot``: one per scrape of a backend's ``/metrics``
(plus GPU samples when a pynvml sampler runs beside the engine).

Both are plain frozen dataclasses with a JSON round trip (``to_dict`` / ``from_dict``) so
they can travel through a JSON-lines request log or a Redis stream and be replayed by an
estimator that runs alone. ``None`` always means "unknown"; never ``-1``.

Timestamps: ``*_s`` fields are seconds on the proxy's monotonic clock (comparable within one
proxy process only); ``arrival_epoch`` is the wall-clock time of arrival, for joining across
processes and for daily seasonality. Durations are derived properties.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class Outcome(enum.StrEnum):
    """How a request ended."""

    OK = "ok"
    CLIENT_ERROR = "client_error"  # 4xx from validation or from the backend
    UPSTREAM_ERROR = "upstream_error"  # backend failed (connect, 5xx, broken stream)
    SHED = "shed"  # rejected by admission (429/503), never sent upstream
    TIMEOUT = "timeout"  # upstream did not answer in time (504)
    CLIENT_CANCELLED = "client_cancelled"  # the client went away; upstream was cancelled
    SHUTDOWN = "shutdown"  # still open when the proxy's shutdown grace ran out (503 / SSE error)
    INTERNAL_ERROR = "internal_error"  # a fault in the proxy itself (500), never the client's


@dataclass(frozen=True, slots=True, kw_only=True)
class ItlSummary:
    """Inter-token (inter-chunk) gaps of one streamed request, in seconds."""

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p95: float | None = None
    max: float | None = None

    @classmethod
    def from_gaps(cls, gaps: Sequence[float]) -> ItlSummary:
        n = len(gaps)
        if n == 0:
            return cls()
        s = sorted(gaps)
        return cls(
            count=n,
            mean=sum(s) / n,
            p50=s[(n - 1) // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2,
            p95=s[min(n - 1, int(0.95 * (n - 1) + 0.5))],
            max=s[-1],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRecord:
    """Everything the proxy measured about one request."""

    request_id: str
    model: str
    backend: str | None = (
        None  # backend name that served it (last one tried); None if never dispatched
    )
    tenant: str = "default"
    priority: str = "normal"
    endpoint: str = "chat"  # "chat", "completions" or another /v1 path's last segment
    streamed: bool = False
    status: int | None = None  # HTTP status the client got
    outcome: Outcome = Outcome.OK
    finish_reason: str | None = None
    # clock (monotonic seconds, proxy-local) and wall clock
    arrival_s: float = 0.0
    dispatch_s: float | None = None  # upstream request sent (after queueing)
    first_token_s: float | None = None  # first content-bearing chunk; None when not streamed
    end_s: float | None = None
    arrival_epoch: float = 0.0
    # tokens
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    tokens_estimated: bool = False  # True when counts were estimated, not reported by the backend
    max_tokens: int | None = None  # what the client asked for
    # inter-token gaps
    itl: ItlSummary = field(default_factory=ItlSummary)
    # load on the chosen backend at dispatch (proxy's own accounting, this request excluded)
    inflight_requests: int | None = None
    inflight_tokens: int | None = None
    attempts: int = 0  # upstream attempts (2 when retried before the first byte)
    # experiments: the deployment group of the backend that served it (``groups[].name``),
    # and whether it was a shadow copy (sent to a candidate; its answer never reached a client)
    group: str | None = None
    shadow: bool = False

    @property
    def queue_wait_s(self) -> float | None:
        return None if self.dispatch_s is None else self.dispatch_s - self.arrival_s

    @property
    def ttft_s(self) -> float | None:
        """Time to first token as the client saw it: arrival to first content chunk."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.arrival_s

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["outcome"] = self.outcome.value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RequestRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["outcome"] = Outcome(kw.get("outcome", "ok"))
        itl = kw.get("itl")
        kw["itl"] = ItlSummary(**itl) if isinstance(itl, Mapping) else ItlSummary()
        return cls(**kw)


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuSample:
    """One pynvml reading of one GPU."""

    index: int
    name: str | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    utilization: float | None = None  # 0..1
    power_watts: float | None = None
    temperature_c: float | None = None
    throttle_reasons: int | None = None  # NVML bitmask


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendSnapshot:
    """One scrape of one backend's engine state; counters as cumulative as the engine has them."""

    backend: str  # backend name
    time_s: float  # monotonic, proxy-local
    epoch: float = 0.0
    up: bool = True
    dialect: str | None = None  # "vllm", "sglang", "tgi", "llamacpp" or None when unknown
    models: tuple[str, ...] = ()
    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None  # ratio 0..1
    prefix_cache_queries: float | None = None  # counter, tokens
    prefix_cache_hits: float | None = None  # counter, tokens
    prefix_cache_hit_rate: float | None = None  # when the engine only exposes a rate (SGLang)
    preemptions: float | None = None  # counter
    prompt_tokens_total: float | None = None  # counter
    generation_tokens_total: float | None = None  # counter
    requests_total: float | None = None  # counter, finished requests
    # engine configuration, when exposed (vLLM cache_config_info)
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    gpus: tuple[GpuSample, ...] = ()

    @property
    def kv_capacity_tokens(self) -> int | None:
        if self.block_size is None or self.num_gpu_blocks is None:
            return None
        return self.block_size * self.num_gpu_blocks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BackendSnapshot:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["models"] = tuple(kw.get("models", ()))
        kw["gpus"] = tuple(GpuSample(**g) for g in kw.get("gpus", ()))
        return cls(**kw)


class EstimatorSink(Protocol):
    """What the proxy needs from an estimator. ``observe*`` are O(1), never block, never raise."""

    def observe(self, record: RequestRecord) -> None: ...

    def observe_backend(self, snapshot: BackendSnapshot) -> None: ...
