"""Configuration: frozen dataclasses, loaded from YAML, overridden by env vars and CLI flags.

Defaults live only in the field defaults. Every field carries its documentation in
``metadata["doc"]`` (the README's config reference is generated from it). Durations are float
seconds with an ``_s`` suffix. Unknown keys and wrong types are errors that name the file,
the key path and the reason: ``configs/proxy.yaml: timeouts.read_s: expected a number, got 'x'``.

Environment overrides: ``RIGHTSIZER_<SECTION>__<FIELD>=value`` (double underscore between
levels), e.g. ``RIGHTSIZER_SERVER__PORT=9000``; values are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from estimator.settings import EstimatorConfig

ENV_PREFIX = "RIGHTSIZER_"


class ConfigError(ValueError):
    """A configuration problem, naming the source, the key path and the reason."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")
        self.source, self.key, self.reason = source, key, reason


def doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with documentation attached."""
    if default is dataclasses.MISSING:
        return field(metadata={"doc": text}, **kw)  # required, or built by default_factory
    return field(default=default, metadata={"doc": text}, **kw)


def section(text: str, cls: type[Any]) -> Any:
    """A nested config section, defaulting to its own defaults."""
    return field(default_factory=cls, metadata={"doc": text})


_FROZEN = {"frozen": True, "slots": True, "kw_only": True}


@dataclass(**_FROZEN)
class BackendConfig:
    url: str = doc("Base URL of the OpenAI-compatible server, e.g. http://10.0.0.5:8000.")
    name: str = doc("Name used in metrics and logs; defaults to host:port of the URL.", "")
    models: tuple[str, ...] = doc(
        "Models this backend serves. Empty: discovered from its /v1/models.", ()
    )
    api_key: str | None = doc("Bearer token sent upstream (never logged).", None)
    dialect: str = doc("Metrics dialect: auto, vllm, sglang, tgi, llamacpp or none.", "auto")
    gpu_metrics_url: str | None = doc(
        "A `rightsizer gpu-exporter` beside this engine (e.g. http://node:9400/metrics): its "
        "GPU samples join this backend's snapshots.", None,
    )  # fmt: skip
    max_inflight: int | None = doc(
        "Requests in flight on this backend at most (None: the engine's max_num_seqs, else "
        "the limit learned from the engine's own signals).",
        None,
    )
    forward_client_auth: bool = doc(
        "Forward the client's own Authorization header to this backend when it has no api_key "
        "(off: the client's key never leaves the proxy).",
        False,
    )

    def __post_init__(self) -> None:
        if not self.name:
            parts = urlsplit(self.url)
            object.__setattr__(self, "name", parts.netloc or self.url)


@dataclass(**_FROZEN)
class ServerConfig:
    host: str = doc("Address to listen on.", "127.0.0.1")
    port: int = doc("Port to listen on.", 8080)
    workers: int = doc(
        "Worker processes sharing the port (SO_REUSEPORT) and, through shared memory, the "
        "in-flight counts, tenant usage and prefix index; 0: one per usable core (CPU "
        "affinity), at most 8.",
        0,
    )
    max_body_bytes: int = doc("Largest request body accepted; larger gets 413.", 4 * 1024 * 1024)
    max_header_bytes: int = doc("Largest single request header accepted (larger: 431).", 16 * 1024)
    max_headers: int = doc("Most request headers accepted (more: 431).", 128)
    admin_token: str | None = doc(
        "Bearer token required on /admin/* (the estimator report); None: open, which is only "
        "allowed on a loopback address unless allow_open_admin. Prefer the "
        "RIGHTSIZER_SERVER__ADMIN_TOKEN env var over a file.", None,
    )  # fmt: skip
    allow_open_admin: bool = doc(
        "Start on a non-loopback address without admin_token (the admin endpoints open to "
        "anyone who reaches the port).",
        False,
    )
    shutdown_grace_s: float = doc(
        "After SIGTERM, how long in-flight requests may finish; streams still open then end "
        "with an SSE error event (code shutdown).",
        10.0,
    )
    drain_delay_s: float = doc(
        "After SIGTERM, keep accepting requests this long while /ready answers 503, so load "
        "balancers see the drain before the listener closes.",
        0.0,
    )
    header_timeout_s: float = doc(
        "Longest time a client may take to send a request's headers (slowloris guard).", 10.0
    )
    body_timeout_s: float = doc(
        "Longest time a client may take to send a request body (408 after it).", 60.0
    )
    keepalive_s: float = doc(
        "Idle client keep-alive connections are closed after this (longer than clients' own "
        "idle timeouts, so a client does not reuse a connection the proxy is closing).",
        75.0,
    )
    max_connections: int = doc(
        "Client connections open at once at most; more are answered 503 and closed.", 4096
    )
    forward_headers_deny: tuple[str, ...] = doc(
        "Client headers never forwarded upstream, besides hop-by-hop headers, the proxy's own "
        "controls (x-priority, x-tenant, x-request-deadline-ms, x-rightsizer-*, the "
        "routing.session_header) and credentials (see backends[].forward_client_auth). "
        "Case-insensitive.",
        (),
    )


@dataclass(**_FROZEN)
class TimeoutConfig:
    connect_s: float = doc("Upstream TCP connect timeout.", 5.0)
    read_s: float = doc(
        "Longest wait for upstream bytes: the first byte, and between streamed chunks.", 120.0
    )
    total_s: float | None = doc("Whole-request limit (None: no limit).", 900.0)
    keepalive_s: float = doc(
        "How long an idle upstream connection is kept for reuse. Below the backends' own idle"
        " timeout (uvicorn/vLLM and llama-server close after 5 s) so the proxy rarely picks a"
        " connection the server is closing.",
        4.0,
    )


@dataclass(**_FROZEN)
class RelayConfig:
    max_event_bytes: int = doc(
        "Largest server-sent event (or unterminated tail) the relay holds; past it the stream "
        "ends with an SSE error event.",
        8 * 1024 * 1024,
    )


@dataclass(**_FROZEN)
class HealthConfig:
    interval_s: float = doc("Active health check period per backend.", 5.0)
    timeout_s: float = doc("Timeout of one health check or scrape.", 3.0)
    unhealthy_after: int = doc("Consecutive failures (active or passive) that eject a backend.", 3)
    eject_s: float = doc("Minimum time an ejected backend stays out before re-checking.", 10.0)
    models_refresh_s: float = doc("How often each backend's /v1/models is re-read.", 30.0)
    scrape_interval_s: float = doc("How often each backend's /metrics is scraped (0: never).", 5.0)


@dataclass(**_FROZEN)
class RequestLogConfig:
    path: str | None = doc("JSON-lines request log (one RequestRecord per line); None: off.", None)
    max_bytes: int = doc("Rotate the log when it reaches this size.", 100 * 1024 * 1024)
    backups: int = doc("Rotated files kept.", 5)
    log_prompts: bool = doc("Also log request bodies (prompts). Off unless explicitly on.", False)


@dataclass(**_FROZEN)
class MetricsConfig:
    max_tenants: int = doc("Distinct tenant label values before the rest collapse to 'other'.", 50)


PRIORITY_CLASSES = ("critical", "high", "normal", "low", "sheddable")


@dataclass(**_FROZEN)
class TenantConfig:
    name: str = doc("Tenant name (a metrics label, capped by metrics.max_tenants).")
    api_key_sha256: tuple[str, ...] = doc(
        "SHA-256 hex digests of this tenant's API keys (keys themselves are never stored).", ()
    )
    priority: str = doc("Default priority class when the request has no x-priority.", "normal")
    weight: float = doc("Fair-share weight inside a priority class (virtual token counter).", 1.0)
    max_concurrency: int | None = doc("Most requests in flight at once (None: no limit).", None)
    tokens_per_minute: int | None = doc(
        "Most prompt + completion tokens per minute (None: no limit).", None
    )
    max_priority: str | None = doc(
        "Highest priority class this tenant may ask for with x-priority (higher asks are "
        "lowered to it); None: its own default class (priority), so asking for more takes "
        "the operator's say-so.",
        None,
    )


@dataclass(**_FROZEN)
class AuthConfig:
    required: bool = doc("Refuse requests whose API key matches no tenant (401).", False)
    anonymous_max_priority: str = doc(
        "Highest priority class a client not identified by an API key may ask for (x-tenant "
        "and the body's user are claims, not proof).",
        "normal",
    )


@dataclass(**_FROZEN)
class SchedulingConfig:
    enabled: bool = doc("Hold requests in the proxy's queue instead of flooding the engines.", True)
    default_max_inflight: int = doc(
        "Starting in-flight limit per backend when neither the backend config nor the engine "
        "(max_num_seqs) gives one; it is then learned from the engine's own metrics: raised "
        "while the engine runs everything it gets without queueing, set to what it runs once "
        "it queues (see README, Scheduling).",
        64,
    )
    max_inflight_ceiling: int = doc(
        "Highest in-flight limit the learning may reach per backend.", 1024
    )
    probe_hold_s: float = doc(
        "After the engine showed its limit (it queued), wait this long before probing above "
        "it again.",
        60.0,
    )
    engine_waiting_high: float = doc(
        "Engine-reported waiting requests above which a backend gets no new request.", 4.0
    )
    kv_usage_high: float = doc("Engine KV-cache usage above which a backend is saturated.", 0.97)
    max_queue: int = doc(
        "Requests waiting in the proxy at most; beyond it lower classes shed.", 2048
    )
    aging_s: float = doc("Each aging_s of waiting raises a request one priority class.", 10.0)
    deadline_s: Mapping[str, float] = doc(
        "Default deadline per class (header x-request-deadline-ms overrides).",
        dataclasses.MISSING,
        default_factory=lambda: {
            "critical": 120.0,
            "high": 60.0,
            "normal": 30.0,
            "low": 15.0,
            "sheddable": 5.0,
        },
    )
    shed_sheddable_above: float = doc(
        "Utilization (in flight / limit over the model's backends) above which sheddable "
        "requests that would have to queue are dropped.",
        0.9,
    )


@dataclass(**_FROZEN)
class RoutingConfig:
    policy: str = doc("round_robin, least_loaded, prefix or session.", "prefix")
    scorers: Mapping[str, float] = doc(
        "Override the policy's scorers: name -> weight (prefix, load, session, round_robin).",
        dataclasses.MISSING,
        default_factory=dict,
    )
    block_chars: int = doc("Characters per prefix block (about 4 characters per token).", 256)
    prefix_ttl_s: float = doc("Routed prefix blocks are forgotten after this long.", 600.0)
    max_blocks_per_backend: int = doc(
        "Prefix-index entries per backend at most (lowered to the engine's KV capacity).", 100_000
    )
    imbalance_abs: float = doc("Load guard: in-flight difference that may override affinity.", 8.0)
    imbalance_rel: float = doc("Load guard: relative excess over the least-loaded backend.", 0.5)
    session_header: str = doc("Header naming a session for session affinity.", "x-session-id")
    session_memory_bytes: int = doc(
        "Memory for remembered sessions (hashed ids; the least recently used are forgotten).",
        8 * 1024 * 1024,
    )


@dataclass(**_FROZEN)
class SharedStateConfig:
    redis_url: str | None = doc(
        "Share state across proxy replicas through Redis; None: local.", None
    )
    sync_interval_s: float = doc(
        "How often the local view is pushed to and pulled from Redis.", 0.1
    )
    op_timeout_s: float = doc("Timeout of one Redis round trip.", 0.25)
    key_prefix: str = doc("Prefix of every Redis key.", "rightsizer")
    records_stream_maxlen: int = doc("Approximate length cap of the records stream.", 100_000)


@dataclass(**_FROZEN)
class GpuTelemetryConfig:
    enabled: bool = doc("Sample this node's NVIDIA GPUs with NVML (a logged no-op without).", True)
    interval_s: float = doc("GPU sampling period.", 5.0)
    backend: str | None = doc(
        "Backend whose engine runs on this node's GPUs: its snapshots carry the GPU samples "
        "for the estimator (None: metrics only).", None,
    )  # fmt: skip


Scalar = str | int | float | bool
GROUP_ROLES = ("baseline", "candidate")
STICKINESS = ("request", "session", "tenant")
ROLLBACK_METRICS = ("errors", "slo")


@dataclass(**_FROZEN)
class GroupConfig:
    name: str = doc(
        "Group name (a metrics label): a deployment of its own for routing, admission and the "
        "estimator's verdict."
    )
    backends: tuple[str, ...] = doc("Names (backends[].name) of the backends in this group.", ())
    engine: str = doc("What runs it, for the report: vllm, sglang, tgi, llamacpp, managed ...", "")
    gpu: str | None = doc(
        "GPU catalog key of each replica (cost and roofline prior), e.g. a100-80gb; None for a "
        "managed API priced per token.",
        None,
    )
    gpus_per_backend: int = doc("GPUs per replica (tensor-parallel degree).", 1)
    quant: str = doc("Weight format: bf16, fp8, int8, int4-awq ...", "bf16")
    max_num_seqs: int | None = doc(
        "The engine's max_num_seqs when it does not expose it (vLLM does not): the capacity "
        "model needs it.",
        None,
    )
    settings: Mapping[str, Scalar] = doc(
        "Other engine settings, for the report (e.g. max_model_len: 8192, kv_cache_dtype: fp8).",
        dataclasses.MISSING,
        default_factory=dict,
    )
    usd_per_hour: float | None = doc(
        "Price of one replica per hour, overriding the catalog's GPU price x gpus_per_backend "
        "(reserved or on-premise pricing).",
        None,
    )
    usd_per_1m_input_tokens: float | None = doc(
        "Managed API: price per 1M prompt tokens (with usd_per_1m_output_tokens; the group is "
        "then priced per token, not per hour).",
        None,
    )
    usd_per_1m_output_tokens: float | None = doc("Managed API: price per 1M output tokens.", None)
    model_config: str | None = doc(
        "Hugging Face config.json of the model this group runs (roofline prior); default: "
        "estimator.model_configs of the served name.",
        None,
    )

    @property
    def managed(self) -> bool:
        return self.usd_per_1m_input_tokens is not None


@dataclass(**_FROZEN)
class ShadowConfig:
    share: float = doc(
        "Share of the baseline's admitted requests mirrored to the candidate (0..1); the copy's "
        "answer is discarded and never delays the client.",
        0.0,
    )
    queue: int = doc(
        "Shadow copies waiting at most; beyond it new copies are dropped (counted).", 256
    )
    concurrency: int = doc("Shadow copies in flight at most.", 16)
    max_delay_s: float = doc(
        "A copy that waited longer than this for a worker is dropped: it no longer reflects the "
        "traffic's timing (one that finds the candidate without headroom is dropped at once).",
        1.0,
    )


@dataclass(**_FROZEN)
class RollbackConfig:
    enabled: bool = doc("Roll the canary back automatically (weight to 0).", True)
    metrics: tuple[str, ...] = doc(
        "What is compared: errors (upstream errors, timeouts and backend 4xx per request "
        "attempt) and slo (share of requests meeting the TTFT and ITL targets).",
        ROLLBACK_METRICS,
    )
    error_margin: float = doc(
        "Roll back when the candidate's error rate exceeds the baseline's by more than this "
        "(absolute, 0..1) ...",
        0.02,
    )
    slo_margin: float = doc(
        "... or its share of requests missing the SLO exceeds the baseline's by more than this ...",
        0.05,
    )
    confidence: float = doc(
        "... with this one-sided confidence (Newcombe's score interval of the difference). The "
        "rule is checked every interval_s on a sliding window: with the defaults, equal groups "
        "(2% errors, a 1 req/s canary) were rolled back in 4% of simulated hours, a candidate "
        "failing every request within 15 s (tests/unit/estimator/test_abtest.py).",
        0.999,
    )
    window_s: float = doc(
        "Sliding window the rates are compared on; also how long the candidate may have no "
        "available backend before it is rolled back.",
        60.0,
    )
    min_samples: int = doc(
        "Requests the candidate needs in the window before its rates are judged.", 10
    )
    interval_s: float = doc("How often the rule is checked.", 1.0)


@dataclass(**_FROZEN)
class ExperimentConfig:
    name: str = doc("Experiment name (a metrics label).")
    baseline: str = doc("Group serving the traffic the candidate is compared with.")
    candidate: str = doc("Group under test.")
    models: tuple[str, ...] = doc(
        "Models the experiment applies to; empty: every model both groups serve.", ()
    )
    weight: float = doc(
        "Canary: share of the traffic routed to the candidate (0..1); changed live with POST "
        "/admin/experiments/<name>.",
        0.0,
    )
    stickiness: str = doc(
        "What the split is decided on: request (each request drawn), session (the "
        "routing.session_header value) or tenant; a sticky key stays in its group while the "
        "weight ramps up.",
        "request",
    )
    header: str | None = doc(
        "Request header naming a group of this experiment that the request must go to "
        "(testers, load tests); never forwarded upstream. None: off.",
        "x-rightsizer-group",
    )
    tenants: tuple[str, ...] = doc("Tenants always sent to the candidate.", ())
    shadow: ShadowConfig = section("Shadow traffic to the candidate.", ShadowConfig)
    rollback: RollbackConfig = section("Automatic rollback of the canary.", RollbackConfig)
    min_requests: int = doc("Requests each group needs before the estimator gives a verdict.", 50)


@dataclass(**_FROZEN)
class ProxyConfig:
    server: ServerConfig = section("Listener settings.", ServerConfig)
    backends: tuple[BackendConfig, ...] = doc("Inference servers behind the proxy.", ())
    timeouts: TimeoutConfig = section("Upstream timeouts.", TimeoutConfig)
    relay: RelayConfig = section("Streaming relay limits.", RelayConfig)
    health: HealthConfig = section("Health checks, ejection and scraping.", HealthConfig)
    request_log: RequestLogConfig = section("Request log.", RequestLogConfig)
    metrics: MetricsConfig = section("Prometheus metrics.", MetricsConfig)
    estimator: EstimatorConfig = section(
        "Online estimator (estimator/settings.py).", EstimatorConfig
    )
    scheduling: SchedulingConfig = section(
        "Priority queueing, fairness and shedding.", SchedulingConfig
    )
    routing: RoutingConfig = section("Backend choice.", RoutingConfig)
    tenants: tuple[TenantConfig, ...] = doc("Tenants, their API keys and limits.", ())
    auth: AuthConfig = section("API-key authentication.", AuthConfig)
    shared: SharedStateConfig = section("State shared across proxy replicas.", SharedStateConfig)
    gpu: GpuTelemetryConfig = section("GPU telemetry (pynvml).", GpuTelemetryConfig)
    groups: tuple[GroupConfig, ...] = doc(
        "Deployment groups: named sets of backends and what they run (README, Experiments).", ()
    )
    experiments: tuple[ExperimentConfig, ...] = doc(
        "Canary and shadow experiments between groups.", ()
    )


# --- generic loading -----------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, key, source)
        for arm in inner:
            try:
                return _convert(arm, value, key, source)
            except ConfigError:
                continue
        names = " or ".join(_type_name(a) for a in inner)
        raise ConfigError(source, key, f"expected {names}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(source, key, f"expected a mapping, got {value!r}")
        return from_mapping(tp, value, source=source, prefix=key)  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(source, key, f"expected a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_convert(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(source, key, f"expected a mapping, got {value!r}")
        (_, val_tp) = typing.get_args(tp)
        return {str(k): _convert(val_tp, v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    raise ConfigError(source, key, f"expected {_type_name(tp)}, got {value!r}")


def from_mapping(cls: type[Any], data: Mapping[str, Any], *, source: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if raw_key not in names:
            raise ConfigError(source, key, f"unknown key (known: {', '.join(sorted(names))})")
        kwargs[raw_key] = _convert(hints[raw_key], value, key, source)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        where = f"{prefix}.{missing[0]}" if prefix and missing else (missing or [prefix])[0]
        raise ConfigError(source, where, "required key is missing") from exc
    _validate(obj, source, prefix)
    return obj


def _validate(obj: Any, source: str, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ConfigError(source, key, f"must not be negative, got {value}")
    for name, value in _class_fields(obj):
        if value not in PRIORITY_CLASSES:
            raise ConfigError(
                source,
                f"{prefix}.{name}" if prefix else name,
                f"unknown class {value!r} (known: {', '.join(PRIORITY_CLASSES)})",
            )
    if isinstance(obj, SchedulingConfig):
        for name in obj.deadline_s:
            if name not in PRIORITY_CLASSES:
                raise ConfigError(source, f"{prefix}.deadline_s.{name}", "unknown class")
    _validate_experiment_parts(obj, source, prefix)
    if isinstance(obj, BackendConfig):
        parts = urlsplit(obj.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(source, f"{prefix}.url", f"not an http(s) URL: {obj.url!r}")
        from .upstream.dialects import DIALECTS  # parsers only: no import cycle

        known = ("auto", "none", *DIALECTS)
        if obj.dialect not in known:
            raise ConfigError(
                source,
                f"{prefix}.dialect",
                f"unknown dialect {obj.dialect!r} (known: {', '.join(known)})",
            )


def _where(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_ratio(source: str, key: str, value: float, *, upper_open: bool = False) -> None:
    if not 0.0 <= value <= 1.0 or (upper_open and value >= 1.0):
        raise ConfigError(source, key, f"must be in [0, 1{')' if upper_open else ']'}, got {value}")


def _validate_experiment_parts(obj: Any, source: str, prefix: str) -> None:
    """Value checks of the groups and experiments sections (cross-references: ``_cross``)."""
    if isinstance(obj, GroupConfig):
        if obj.gpus_per_backend < 1:
            raise ConfigError(source, _where(prefix, "gpus_per_backend"), "must be >= 1")
        if (obj.usd_per_1m_input_tokens is None) != (obj.usd_per_1m_output_tokens is None):
            raise ConfigError(
                source,
                _where(prefix, "usd_per_1m_output_tokens"),
                "a managed API needs both per-token prices",
            )
        if obj.managed and (obj.gpu is not None or obj.usd_per_hour is not None):
            raise ConfigError(
                source,
                _where(prefix, "gpu"),
                "a group priced per token (a managed API) has no gpu or usd_per_hour",
            )
    elif isinstance(obj, ExperimentConfig):
        _check_ratio(source, _where(prefix, "weight"), obj.weight)
        if obj.stickiness not in STICKINESS:
            raise ConfigError(
                source,
                _where(prefix, "stickiness"),
                f"unknown {obj.stickiness!r} (known: {', '.join(STICKINESS)})",
            )
        if obj.baseline == obj.candidate:
            raise ConfigError(source, _where(prefix, "candidate"), "must differ from baseline")
    elif isinstance(obj, ShadowConfig):
        _check_ratio(source, _where(prefix, "share"), obj.share)
        if obj.concurrency < 1:
            raise ConfigError(source, _where(prefix, "concurrency"), "must be >= 1")
    elif isinstance(obj, RollbackConfig):
        for i, m in enumerate(obj.metrics):
            if m not in ROLLBACK_METRICS:
                raise ConfigError(
                    source,
                    f"{_where(prefix, 'metrics')}[{i}]",
                    f"unknown {m!r} (known: {', '.join(ROLLBACK_METRICS)})",
                )
        for name in ("error_margin", "slo_margin"):
            _check_ratio(source, _where(prefix, name), getattr(obj, name), upper_open=True)
        if not 0.5 < obj.confidence < 1.0:
            raise ConfigError(source, _where(prefix, "confidence"), "must be in (0.5, 1)")
        if obj.interval_s <= 0 or obj.window_s <= 0:
            raise ConfigError(source, _where(prefix, "window_s"), "window_s and interval_s > 0")
    elif isinstance(obj, ProxyConfig):
        _cross(obj, source)


def _cross(cfg: ProxyConfig, source: str) -> None:
    """Cross-references between backends, groups and experiments, errors naming the key."""
    names = {b.name for b in cfg.backends}
    owner: dict[str, str] = {}
    groups: dict[str, GroupConfig] = {}
    for i, g in enumerate(cfg.groups):
        if g.name in groups:
            raise ConfigError(source, f"groups[{i}].name", f"duplicate group {g.name!r}")
        groups[g.name] = g
        for j, b in enumerate(g.backends):
            key = f"groups[{i}].backends[{j}]"
            if b not in names:
                known = ", ".join(sorted(names)) or "none"
                raise ConfigError(source, key, f"unknown backend {b!r} (backends: {known})")
            if b in owner:
                raise ConfigError(source, key, f"backend {b!r} is already in group {owner[b]!r}")
            owner[b] = g.name
    seen: dict[str, int] = {}
    for i, e in enumerate(cfg.experiments):
        if e.name in seen:
            raise ConfigError(source, f"experiments[{i}].name", f"duplicate experiment {e.name!r}")
        seen[e.name] = i
        for role in ("baseline", "candidate"):
            if getattr(e, role) not in groups:
                known = ", ".join(groups) or "none"
                raise ConfigError(
                    source,
                    f"experiments[{i}].{role}",
                    f"unknown group {getattr(e, role)!r} (groups: {known})",
                )
        for k, other in enumerate(cfg.experiments[:i]):
            if not e.models or not other.models or set(e.models) & set(other.models):
                raise ConfigError(
                    source,
                    f"experiments[{i}].models",
                    f"overlaps experiment "
                    f"{other.name!r} (experiments[{k}]): a model has one experiment",
                )


def _class_fields(obj: Any) -> list[tuple[str, str]]:
    """The priority-class fields of a config object (checked against PRIORITY_CLASSES)."""
    if isinstance(obj, TenantConfig):
        return [("priority", obj.priority), ("max_priority", obj.max_priority or obj.priority)]
    if isinstance(obj, AuthConfig):
        return [("anonymous_max_priority", obj.anonymous_max_priority)]
    return []


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(raw) if raw else None
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def load_config(
    path: str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ProxyConfig:
    """YAML file (optional) < ``RIGHTSIZER_*`` env vars < ``overrides`` (from CLI flags)."""
    data: dict[str, Any] = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(source, "", f"cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(source, "", f"not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(source, "", "the top level must be a mapping")
        data = dict(loaded or {})
    env = _env_overrides(os.environ if environ is None else environ)
    if env:
        data = _merge(data, env)
        source += " (+ RIGHTSIZER_* env)"
    if overrides:
        data = _merge(data, overrides)
    return typing.cast(ProxyConfig, from_mapping(ProxyConfig, data, source=source))


def reference_markdown(cls: type[Any] = ProxyConfig, prefix: str = "") -> list[str]:
    """The config reference (README) generated from the dataclasses' docs."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"| `{key}` | | {f.metadata.get('doc', '')} |")
            lines.extend(reference_markdown(tp, key + "."))  # type: ignore[arg-type]
            continue
        if typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            lines.append(f"| `{key}` | `[]` | {f.metadata.get('doc', '')} |")
            lines.extend(reference_markdown(typing.get_args(tp)[0], key + "[]."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "required" if default is dataclasses.MISSING else f"`{default!r}`"
        lines.append(f"| `{key}` | {shown} | {f.metadata.get('doc', '')} |")
    return lines


def _write_reference(readme: Path) -> None:
    """Replace the README's config reference (between its markers) with the generated one."""
    text = readme.read_text()
    start = text.index("<!-- config-reference:start")
    start = text.index("\n", start) + 1
    end = text.index("<!-- config-reference:end -->")
    table = ["| key | default | meaning |", "|---|---|---|", *reference_markdown()]
    readme.write_text(text[:start] + "\n".join(table) + "\n" + text[end:])


if __name__ == "__main__":
    import sys

    _write_reference(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
