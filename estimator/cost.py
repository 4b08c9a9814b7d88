"""Cost of a deployment: $/hour, $/month, $ per 1M input and output tokens, $ per request.

Rule for splitting the hourly cost between input and output tokens: by **token-time share**.
From the step model, a prompt token costs ``prefill_s`` seconds of engine time (the marginal
time of one more prefill token in a large prefill chunk) and an output token costs
``decode_s`` (one decode step at the operating batch size, divided by the batch). At token
rates ``P`` (uncached prompt tokens/s) and ``O`` (output tokens/s) the input share is
``P * prefill_s / (P * prefill_s + O * decode_s)``. Prompt tokens served from the prefix
cache cost no prefill time, so they lower the input price per token. Without a step model,
the default ratio ``decode_s / prefill_s = DEFAULT_DECODE_TO_PREFILL`` is used (decode is
memory-bound: an output token costs several times a prompt token).

A deployment can serve at most its capacity: above it the served rate is the capacity, so
cost per token never falls below its value at capacity. A per-token price means nothing
without the rate it holds at (the same $2/h can be $9 per 1M output tokens at a trickle and
$0.31 at capacity): ``CostFigures.at`` names it and ``label()`` prints it beside every price.
At rate 0, per-token and per-request costs are ``None`` (unknown, not infinite). A month is
730 hours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

HOURS_PER_MONTH = 730.0
DEFAULT_DECODE_TO_PREFILL = 8.0
_PREFILL_PROBE_TOKENS = 2048


class StepTimer(Protocol):
    """What the cost split needs from ``estimator.engine.StepModel``."""

    def step_time(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenTimes:
    """Engine seconds per prompt token and per output token at an operating point."""

    prefill_s: float
    decode_s: float

    @classmethod
    def default(cls) -> TokenTimes:
        return cls(prefill_s=1.0, decode_s=DEFAULT_DECODE_TO_PREFILL)


def token_times(step: StepTimer, *, decode_batch: int, mean_context: float) -> TokenTimes:
    """Marginal prefill seconds/token and decode seconds/token from a step model."""
    b = max(1, int(decode_batch))
    ctx = int(max(1.0, mean_context) * b)
    idle = step.step_time(0, 0, 0)
    prefill = (step.step_time(_PREFILL_PROBE_TOKENS, 0, 0) - idle) / _PREFILL_PROBE_TOKENS
    decode = step.step_time(0, b, ctx) / b
    if not (prefill > 0 and decode > 0):
        return TokenTimes.default()
    return TokenTimes(prefill_s=prefill, decode_s=decode)


@dataclass(frozen=True, slots=True, kw_only=True)
class CostFigures:
    """Cost of a deployment at one request rate. USD; ``None`` = unknown (no traffic)."""

    usd_per_hour: float
    usd_per_month: float
    rate_rps: float  # the rate asked about
    served_rps: float  # min(rate, capacity)
    utilization: float | None  # served / capacity
    input_share: float  # fraction of the hourly cost charged to input tokens
    usd_per_1m_input_tokens: float | None
    usd_per_1m_output_tokens: float | None
    usd_per_1m_tokens: float | None  # blended, all tokens
    usd_per_request: float | None
    at: str = ""  # which rate this is: "current rate", "capacity", "forecast peak"

    def label(self) -> str:
        """``at capacity (11.05 req/s)``: what every printed per-token price carries."""
        rate = f"{self.served_rps:.2f} req/s"
        return f"at {self.at} ({rate})" if self.at else f"at {rate}"


def deployment_usd_per_hour(gpu_usd_per_hour: float, gpus_per_replica: int, replicas: int) -> float:
    return gpu_usd_per_hour * gpus_per_replica * replicas


def input_share(
    times: TokenTimes, *, prompt_tokens: float, output_tokens: float, cached_ratio: float = 0.0
) -> float:
    """Fraction of engine time spent on prompt tokens (see the module docstring)."""
    p = max(0.0, prompt_tokens) * (1.0 - min(max(cached_ratio, 0.0), 1.0)) * times.prefill_s
    o = max(0.0, output_tokens) * times.decode_s
    return p / (p + o) if p + o > 0 else 0.0


def cost_figures(
    *,
    usd_per_hour: float,
    rate_rps: float,
    mean_prompt_tokens: float,
    mean_output_tokens: float,
    times: TokenTimes | None = None,
    cached_ratio: float = 0.0,
    capacity_rps: float | None = None,
    at: str = "",
) -> CostFigures:
    """Cost figures at ``rate_rps`` for a deployment costing ``usd_per_hour``; ``at`` names
    that rate (``current rate``, ``capacity``, ``forecast peak``) for whoever prints them."""
    served = max(0.0, rate_rps)
    if capacity_rps is not None:
        served = min(served, max(0.0, capacity_rps))
    share = input_share(times or TokenTimes.default(), prompt_tokens=mean_prompt_tokens,
                        output_tokens=mean_output_tokens, cached_ratio=cached_ratio)  # fmt: skip
    per_s = usd_per_hour / 3600.0
    in_tps, out_tps = served * mean_prompt_tokens, served * mean_output_tokens
    return CostFigures(
        usd_per_hour=usd_per_hour,
        usd_per_month=usd_per_hour * HOURS_PER_MONTH,
        rate_rps=rate_rps,
        served_rps=served,
        utilization=served / capacity_rps if capacity_rps else None,
        input_share=share,
        usd_per_1m_input_tokens=_per_million(per_s * share, in_tps),
        usd_per_1m_output_tokens=_per_million(per_s * (1.0 - share), out_tps),
        usd_per_1m_tokens=_per_million(per_s, in_tps + out_tps),
        usd_per_request=per_s / served if served > 0 else None,
        at=at,
    )


def _per_million(usd_per_s: float, tokens_per_s: float) -> float | None:
    return usd_per_s / tokens_per_s * 1e6 if tokens_per_s > 0 else None
