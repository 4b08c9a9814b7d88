"""The load conditions benchmarks use, simulated: Poisson rate, closed-loop concurrency, burst.

- ``Load.poisson(rate)``: open loop, Poisson arrivals at ``rate`` req/s (``vllm bench serve
  --request-rate``); the first ``warmup_fraction`` (10%) of requests is left out.
- ``Load.concurrency(n)``: closed loop, ``n`` clients each sending its next request the
  moment its previous one ends (``vllm bench serve --max-concurrency``, GenAI-Perf / AIPerf
  ``--concurrency``, NIM's tables). The clients start at random times within one
  request's duration (out of phase, as a real engine's noise soon makes them) and their
  first requests are left out: the steady state, as GenAI-Perf's measurement window
  measures it.
- ``Load.burst(n)``: all ``n`` requests at once (``--request-rate inf``,
  ``trtllm-bench throughput``: the maximum-throughput scenario); every request counts.

:func:`simulate_load` returns a :class:`LoadResult`: mean, p50, p90, p95 and p99 of TTFT,
ITL (pooled over every token gap, token-weighted), TPOT (per request, ``(e2e - ttft) /
(output - 1)``) and end-to-end latency, and the throughputs over the run (output tokens/s from
the first send to the last token, as ``vllm bench serve`` and ``trtllm-bench`` divide).
TTFT and e2e include the step model's per-request overhead (the API server's work).

Uncertainty band (``LoadResult.band``): ``[value * lo, value * hi]`` with ``(lo, hi)`` the
10th and 90th percentiles of ``published / predicted`` over the validation rows of
``bench/data/published.yaml`` for that metric (``estimator.engines.bands``): a prior
prediction's 80% interval, as measured against published benchmarks. It says nothing about
a calibrated model (whose own fit error the calibrator reports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from estimator.engine import StepModel
from estimator.engines.bands import BANDS
from estimator.simulate import EngineLimits, Workload, _itl_quantiles, _Sim

LoadKind = Literal["poisson", "concurrency", "burst"]
_QS = (0.5, 0.9, 0.95, 0.99)


@dataclass(frozen=True, slots=True)
class Load:
    """One load condition (module docstring)."""

    kind: LoadKind
    value: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.value) and self.value > 0):
            raise ValueError(f"Load value must be finite and > 0, got {self.value!r}")
        if self.kind != "poisson" and self.value != int(self.value):
            raise ValueError(f"{self.kind} needs a whole number of requests, got {self.value}")

    @classmethod
    def poisson(cls, rate_rps: float) -> Load:
        return cls("poisson", rate_rps)

    @classmethod
    def concurrency(cls, n: int) -> Load:
        return cls("concurrency", n)

    @classmethod
    def burst(cls, n: int) -> Load:
        return cls("burst", n)

    def describe(self) -> str:
        if self.kind == "poisson":
            return f"Poisson {self.value:g} req/s"
        return f"{self.kind} {int(self.value)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats:
    """Mean and percentiles of one latency (seconds)."""

    mean: float
    p50: float
    p90: float
    p95: float
    p99: float

    @classmethod
    def of(cls, x: np.ndarray) -> Stats:
        if x.size == 0:
            return cls(mean=math.nan, p50=math.nan, p90=math.nan, p95=math.nan, p99=math.nan)
        q = np.quantile(x, _QS)
        return cls(mean=float(x.mean()), p50=float(q[0]), p90=float(q[1]), p95=float(q[2]),
                   p99=float(q[3]))  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadResult:
    """One simulated benchmark run (module docstring). Seconds, tokens/s, requests/s."""

    load: Load
    n_requests: int
    n_counted: int
    ttft: Stats
    itl: Stats
    tpot: Stats
    e2e: Stats
    output_tokens_per_s: float
    requests_per_s: float
    input_tokens_per_s: float
    duration_s: float
    mean_running: float
    peak_running: int
    preemptions: int

    def band(self, metric: str, value: float | None = None) -> tuple[float, float]:
        """The uncertainty band of ``metric`` (``throughput``, ``ttft``, ``itl``, ``e2e``)
        around ``value`` (default: the mean), module docstring."""
        lo, hi = BANDS.get(metric, BANDS["default"])
        if value is None:
            value = {
                "throughput": self.output_tokens_per_s,
                "ttft": self.ttft.mean,
                "itl": self.itl.mean,
                "e2e": self.e2e.mean,
            }[metric]
        return value * lo, value * hi


def simulate_load(
    step: StepModel,
    limits: EngineLimits,
    workload: Workload,
    load: Load,
    *,
    n_requests: int = 2000,
    seed: int = 0,
    warmup_fraction: float | None = None,
) -> LoadResult:
    """Simulate ``workload`` under ``load`` on one replica (module docstring). A burst sends
    ``load.value`` requests (``n_requests`` is ignored); a closed loop sends ``n_requests``
    through ``load.value`` clients."""
    if n_requests < 1:
        raise ValueError("simulate_load needs n_requests >= 1")
    closed = load.kind == "concurrency"
    n = int(load.value) if load.kind == "burst" else n_requests
    prompts, outputs, gaps = workload.draw(n, seed)
    if load.kind == "poisson":
        arrivals = (np.cumsum(gaps) / load.value).tolist()
    elif load.kind == "burst":
        arrivals = [0.0] * n
    else:
        k = min(n, int(load.value))
        spread = _request_duration(step, workload, k)
        starts = np.sort(np.random.default_rng([seed, 0xC10]).uniform(0.0, spread, k))
        arrivals = starts.tolist() + [math.inf] * (n - k)
    sim = _Sim(step, limits, arrivals, prompts.tolist(), outputs.tolist(), seed=seed,
               closed_loop=closed)  # fmt: skip
    sim.run()
    if warmup_fraction is not None:
        warm = warmup_fraction
    elif load.kind == "poisson":
        warm = 0.1
    elif closed:  # the first wave (all clients at once) is the start-up transient
        warm = min(load.value / n, 0.5)
    else:
        warm = 0.0
    return _summarise_load(sim, load, warm)


def _request_duration(step: StepModel, workload: Workload, clients: int) -> float:
    """A rough duration of one request with ``clients`` running: the closed loop's clients
    start spread over it, so that they run out of phase from the start (in a real run the
    engine's noise desynchronises clients that start together within a few requests; the
    simulated engine has no such noise and would keep them in lockstep)."""
    prompt, output = workload.mean_prompt, workload.mean_output
    itl = step.itl_at(clients, prompt + output / 2)
    return step.ttft_idle(int(prompt)) + max(output - 1, 0) * itl


def _summarise_load(sim: _Sim, load: Load, warmup: float) -> LoadResult:
    tr = sim.trace()
    n = tr.arrival_s.size
    w0 = min(int(n * warmup), n - 1)
    arr, first, fin = tr.arrival_s[w0:], tr.first_token_s[w0:], tr.finish_s[w0:]
    ok = ~np.isnan(first)
    out = tr.output_tokens[w0:]
    ttft = (first - arr)[ok]
    e2e = (fin - arr)[ok]
    many = ok & (out > 1)
    tpot = ((fin - first)[many] / (out[many] - 1)).astype(float)
    since = float(arr.min()) if warmup > 0 else -math.inf
    itl_q = _itl_quantiles(sim.runs, since, _QS, jitter_sigma=sim.step.jitter_sigma)
    start = float(tr.arrival_s.min())
    span = max(float(np.nanmax(tr.finish_s)) - start, 1e-12)
    finished = ~np.isnan(tr.finish_s)
    return LoadResult(
        load=load, n_requests=n, n_counted=int(ok.sum()), ttft=Stats.of(ttft),
        itl=Stats(mean=_itl_mean(sim.runs, since), p50=itl_q[0], p90=itl_q[1], p95=itl_q[2],
                  p99=itl_q[3]),
        tpot=Stats.of(tpot), e2e=Stats.of(e2e),
        output_tokens_per_s=sim.tokens_out / span, requests_per_s=int(finished.sum()) / span,
        input_tokens_per_s=float(tr.prompt_tokens[finished].sum()) / span, duration_s=span,
        mean_running=sim.running_area / max(sim.t - start, 1e-12),
        peak_running=sim.peak_running, preemptions=sim.preemptions,
    )  # fmt: skip


def _itl_mean(runs: list[tuple[float, float, float, int, int]], since: float) -> float:
    """Token-weighted mean decode step duration of runs starting at ``since`` or later."""
    if not runs:
        return math.nan
    r = np.asarray(runs)
    r = r[r[:, 0] >= since] if np.isfinite(since) else r
    if r.size == 0:
        return math.nan
    a, b, k, d = r[:, 1], r[:, 2], r[:, 3], r[:, 4]
    total = d * (k * a + b * k * (k - 1) / 2)
    weight = d * k
    return float(total.sum() / weight.sum()) if weight.sum() > 0 else math.nan
