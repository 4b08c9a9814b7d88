"""The estimator-accuracy procedure against a real vLLM CPU server: settings, traffic,
measurement, prediction, judging and rendering. ``bench/estimator_accuracy.py`` is its
command line (and documents the procedure); ``tests/integration/test_estimator_accuracy.py``
runs it with short steps; ``bench/replay_ramp.py`` replays a kept run."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import shutil
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from estimator.calibrate import CalibratorConfig, OnlineCalibrator
from estimator.capacity import max_rate_at_slo
from estimator.engine import StepModel
from estimator.records import BackendSnapshot, Outcome, RequestRecord
from estimator.service import Estimator, EstimatorConfig
from estimator.simulate import EngineLimits, Replay, Workload, replay, simulate
from tests.support.openloop import isotonic

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = "small84m"
SERVED = "small84m"  # the served model name (whatever model a run serves)
# Other model shapes a run can serve (``--model``), made on first use beside small84m with its
# tokenizer: random-weight Llama configs that differ from small84m where the step model's
# terms differ (layers, attention heads, KV heads, MLP width).
MODEL_SHAPES: dict[str, dict[str, int]] = {
    # issue 14's unseen shape: 12 layers, multi-head attention (KV heads = heads)
    "mha12": {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8,
              "num_key_value_heads": 8, "intermediate_size": 1536},
    # wide and shallow, grouped-query attention with one KV head per 4
    "wide4": {"hidden_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 16,
              "num_key_value_heads": 4, "intermediate_size": 4096},
}  # fmt: skip
# Length mixes a run can draw (``--mix``): (prompt lengths, output lengths), each drawn
# uniformly and independently; "lognormal" is the default mix of the Settings fields.
MIXES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "short": ((256, 512), (16, 48)),  # issue 14's mix: short outputs, prefill-heavy steps
    "long-out": ((128, 256), (96, 160)),  # decode-heavy
}
VOCAB = 4096
FIRST_ID = 3  # 0-2: unk, bos, eos
WARMUP_FRACTION = 0.1
CAPACITY_TOL = 0.15
LATENCY_TOL = 0.20


# --- settings --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """One run of the benchmark (the defaults are the full run)."""

    max_num_seqs: int = 8
    slo_ttft_s: float = 1.0
    slo_itl_s: float = 0.06
    """The SLO, or the floor of it on a slow engine (``machine_slo``)."""
    slo_idle_factor: float = 2.5
    """The SLO is at least this many times the engine's own idle latency (``machine_slo``);
    0 keeps the SLO as given."""
    low_rate: float = 1.0
    """Requests/s of the low-rate phase."""
    low_requests: int = 150
    ramp: tuple[tuple[float, int], ...] = ((0.5, 120), (0.8, 200), (0.95, 200), (1.1, 200))
    """Ramp steps: (rate as a fraction of the predicted capacity, requests), ascending, run
    back to back; ``other_rates`` must be among them."""
    other_rates: tuple[float, float] = (0.5, 0.8)
    """Fractions of the predicted capacity where p95 TTFT/ITL are compared."""
    extra_requests: int = 150
    """Requests of a step added when the ramp does not bracket the SLO crossing."""
    extend_factor: float = 1.15
    max_extra_steps: int = 3
    prompt_median: float = 220.0
    prompt_sigma: float = 0.45
    prompt_min: int = 100
    prompt_max: int = 600
    output_min: int = 32
    output_max: int = 128
    warmup_requests: int = 8
    isolate: bool = True
    """Give the engine (vLLM's pinned CPU worker and its engine-core process) a core of its
    own and put the API server, the proxy and this client on the others, as a GPU engine
    has its device to itself (``real_backends.isolated_vllm_engine``)."""
    seed: int = 1
    sim_requests: int = 3000
    """``EstimatorConfig.sim_requests`` (default 800): requests per simulated probe. With 800
    the predicted capacity of this server varies by about 5% from seed to seed."""
    use_prior: bool = False
    """Give the estimator the model config and the ``cpu`` catalog entry (roofline prior)."""
    model: str = MODEL_DIR
    """The model folder the server serves (``MODEL_DIR`` or a ``MODEL_SHAPES`` key)."""
    prompt_choices: tuple[int, ...] = ()
    """When set, prompt lengths are drawn uniformly from these instead of the lognormal."""
    output_choices: tuple[int, ...] = ()
    """When set, output lengths are drawn uniformly from these instead of the uniform range."""

    @classmethod
    def test(cls, **kw: Any) -> Settings:
        """The integration test's run: 5-12 minutes (the steps take longer on a slower engine).
        Its low-rate phase (0.6 req/s) is slower than the full run's (1.0) so that it stays
        near or below capacity on the slowest machines of this kind seen (capacity 0.63-2.0
        req/s; at 0.8 req/s one CI run's low phase missed the SLO). Up to three steps are
        added above 1.25 C (1.44, 1.65, 1.90 C) when the ramp has not crossed the SLO: one CI
        run met an engine 30% faster during its ramp than while the estimator learned, and
        none of its steps up to 1.44 C missed the SLO."""
        base: dict[str, Any] = dict(
            low_requests=80,
            low_rate=0.6,
            ramp=((0.5, 50), (0.8, 60), (1.0, 60), (1.25, 50)),
            extra_requests=50,
            max_extra_steps=3,
        )
        return cls(**{**base, **kw})

    @classmethod
    def long(cls, **kw: Any) -> Settings:
        """About 20 minutes at 2-3 req/s: 1200 requests at 0.8 C, 300 at the other steps.

        The issue's 20% bound on a p95 TTFT at 0.8 C can only be told apart from chance with
        long steps. In the estimator's own simulator (a calibrated model of this server), the
        p95 TTFT of an N-request step at 0.8 C falls within 20% of its long-run value with
        probability 0.59 for N = 200 (90% range -28% to +107%), 0.72 for 400, 0.80 for 800
        and 0.88 for 1200 (-16% to +34%); at 0.5 C 120 requests give -13% to +24%
        (bench/README.md). A perfect model would fail the full run's 0.8 C check about
        four times in ten."""
        base: dict[str, Any] = dict(
            ramp=((0.5, 300), (0.8, 1200), (0.95, 300), (1.1, 300)),
            extra_requests=200,
        )
        return cls(**{**base, **kw})

    @classmethod
    def quick(cls, **kw: Any) -> Settings:
        """About five minutes."""
        base: dict[str, Any] = dict(
            low_requests=100,
            ramp=((0.5, 80), (0.8, 120), (1.0, 120), (1.2, 100)),
            extra_requests=80,
            max_extra_steps=2,
        )
        return cls(**{**base, **kw})


# --- workload and client ----------------------------------------------------------------------


@dataclass(slots=True)
class Sent:
    """One request as the client saw it (perf_counter seconds)."""

    prompt_len: int
    max_tokens: int
    arrival: float  # scheduled send time
    status: int = 0
    first: float | None = None
    end: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    gap_t: list[float] = field(default_factory=list)  # emission time of each per-token gap
    gap_s: list[float] = field(default_factory=list)
    chunks: int = 0  # content chunks after the first
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.first is not None


def draw_requests(s: Settings, n: int, rng: np.random.Generator) -> list[tuple[list[int], int]]:
    """``n`` (prompt token ids, output length) pairs from the benchmark's length mix."""
    lens = rng.lognormal(math.log(s.prompt_median), s.prompt_sigma, n)
    lens = np.clip(np.rint(lens), s.prompt_min, s.prompt_max).astype(int)
    outs = rng.integers(s.output_min, s.output_max + 1, n)
    if s.prompt_choices:
        lens = rng.choice(np.asarray(s.prompt_choices), n)
    if s.output_choices:
        outs = rng.choice(np.asarray(s.output_choices), n)
    return [
        (rng.integers(FIRST_ID, VOCAB, int(p)).tolist(), int(o))
        for p, o in zip(lens, outs, strict=True)
    ]


async def send(
    session: aiohttp.ClientSession,
    url: str,
    prompt: list[int],
    max_tokens: int,
    tenant: str,
    rec: Sent,
) -> None:
    body = {
        "model": SERVED,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    last_tokens = 0
    last_t = 0.0
    try:
        async with session.post(
            url + "/v1/completions",
            data=orjson.dumps(body),
            headers={"content-type": "application/json", "x-tenant": tenant},
        ) as r:
            rec.status = r.status
            if r.status != 200:
                rec.error = (await r.read())[:300].decode(errors="replace")
                return
            buf = b""
            async for data in r.content.iter_any():
                now = time.perf_counter()
                buf += data
                *events, buf = buf.split(b"\n\n")
                tokens, chunks = last_tokens, 0
                for ev in events:
                    if not ev.startswith(b"data: {"):
                        continue
                    obj = orjson.loads(ev[6:])
                    if "error" in obj:
                        rec.error = str(obj["error"])[:300]
                        continue
                    usage = obj.get("usage")
                    if usage:  # cumulative on every chunk (continuous_usage_stats)
                        rec.prompt_tokens = usage.get("prompt_tokens")
                        rec.completion_tokens = usage.get("completion_tokens")
                        if (rec.completion_tokens or 0) > tokens:
                            tokens = int(rec.completion_tokens or 0)
                            chunks += 1
                    elif obj.get("choices"):  # a server without continuous usage: a chunk
                        tokens += 1  # is taken for one token
                        chunks += 1
                if tokens <= last_tokens:
                    continue
                if rec.first is None:  # the first generated token, whatever its text
                    rec.first = now
                else:
                    k = tokens - last_tokens
                    rec.gap_t.extend([now] * k)
                    rec.gap_s.extend([(now - last_t) / k] * k)
                    rec.chunks += chunks
                last_t, last_tokens = now, tokens
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    finally:
        rec.end = time.perf_counter()


async def run_poisson(
    url: str,
    reqs: Sequence[tuple[list[int], int]],
    rate: float | Sequence[float],
    tenant: str | Sequence[str],
    rng: np.random.Generator,
) -> list[Sent]:
    """Open loop: request i is sent at the i-th arrival, whatever is in flight.

    ``rate`` and ``tenant`` are one value or one per request: a run of requests with the same
    rate is one step (consecutive steps follow each other without a pause). Within a step the
    gaps are exponential (Poisson arrivals) rescaled so that their mean is exactly
    ``1 / rate``: a step of a few hundred requests would otherwise offer a rate up to 10% off
    the one asked for."""
    n = len(reqs)
    rates = np.broadcast_to(np.asarray(rate, dtype=float), (n,))
    tenants = [tenant] * n if isinstance(tenant, str) else list(tenant)
    gaps = rng.exponential(1.0, n)
    for lo, hi in _runs(rates):
        gaps[lo:hi] *= (hi - lo) / gaps[lo:hi].sum() / rates[lo]
    gaps[0] = 0.0
    times = time.perf_counter() + 0.05 + np.cumsum(gaps)
    out = [
        Sent(prompt_len=len(p), max_tokens=o, arrival=float(t))
        for (p, o), t in zip(reqs, times, strict=True)
    ]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=900)
    ) as session:
        tasks = []
        for (prompt, max_tokens), rec, ten in zip(reqs, out, tenants, strict=True):
            delay = rec.arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            rec.arrival = time.perf_counter()  # the actual send time
            tasks.append(asyncio.create_task(send(session, url, prompt, max_tokens, ten, rec)))
        await asyncio.gather(*tasks)
    return out


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) index ranges of consecutive equal values."""
    edges = [0, *(np.flatnonzero(np.diff(values)) + 1).tolist(), len(values)]
    return list(itertools.pairwise(edges))


class CpuMonitor:
    """Samples, once a second in a thread, the machine's busy CPU time (``/proc/stat``) and
    the CPU time of this benchmark's own processes (the engine's and the proxy's process
    groups, and this process): ``other_cores(t0, t1)`` is the CPU that something else used
    in a window, in cores. Anything well above zero means the measurement shared the machine.
    """

    def __init__(self, pgids: Sequence[int]) -> None:
        self.pgids = set(pgids)
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> CpuMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(v[:3]) + sum(v[5:8])) / self._tick  # user nice system irq softirq steal
        mine = 0.0
        me = os.getpid()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) in self.pgids or stat.parent.name == str(me):
                mine += (int(fields[11]) + int(fields[12])) / self._tick
        return time.perf_counter(), busy, mine

    def _run(self) -> None:
        while True:
            self.samples.append(self._sample())
            if self._stop.wait(1.0):
                self.samples.append(self._sample())
                return

    def other_cores(self, t0: float, t1: float) -> float:
        inside = [x for x in self.samples if t0 <= x[0] <= t1]
        if len(inside) < 2:
            return math.nan
        (a, b0, m0), (z, b1, m1) = inside[0], inside[-1]
        return max(0.0, (b1 - b0) - (m1 - m0)) / (z - a) if z > a else math.nan


# --- measurement -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StepResult:
    """One ramp step as the client measured it."""

    factor: float  # rate / predicted capacity
    rate_rps: float  # offered (requested) rate
    achieved_rps: float  # requests sent / span of their send times
    n: int
    n_ok: int
    ttft_p50_s: float
    ttft_p95_s: float
    itl_p50_s: float
    itl_p95_s: float
    itl_p95_per_chunk_s: float  # p95 of per-chunk gaps (for comparison)
    tokens_per_chunk: float
    duration_s: float
    slo_ratio: float  # max(ttft_p95 / slo_ttft, itl_p95 / slo_itl)
    ttft_mean_s: float = math.nan  # the TTFT requests' mean
    itl_mean_s: float = math.nan  # mean over those requests of each one's mean gap
    # the estimator's calibrated model simulated on this very trace (same requests, same times)
    replay_ttft_p95_s: float = math.nan
    replay_itl_p95_s: float = math.nan
    replay_slo_ratio: float = math.nan
    replay_ttft_mean_s: float = math.nan
    replay_itl_mean_s: float = math.nan
    other_cpu_cores: float = math.nan  # CPU used by other processes during the step
    engine_speed_change: float = math.nan
    """The engine's time for a reference request under a step model fitted on this step's
    own records, relative to the same fitted on the low-rate phase's, minus 1 (``+0.10``: the
    engine ran 10% slower than while the estimator learned). Drift of the machine, not model
    error; see ``engine_speed_change``."""
    ttft_samples: tuple[float, ...] = field(default=(), repr=False)
    itl_samples: tuple[float, ...] = field(default=(), repr=False)
    """The step's TTFTs and per-token gaps (for pooling seeds; not written to JSON)."""


def _q(x: Sequence[float] | np.ndarray, q: float) -> float:
    a = np.asarray(x, dtype=float)
    return float(np.quantile(a, q, method="inverted_cdf")) if a.size else math.nan


def summarise_step(
    sent: Sequence[Sent],
    lo: int,
    hi: int,
    rate: float,
    factor: float,
    s: Settings,
    window_end: float = math.inf,
) -> StepResult:
    """Requests ``sent[lo:hi]`` are one step. TTFT: those requests but the first 10%. ITL: the
    per-token gaps of every request (this step's or a neighbour's) that ended between the
    first counted arrival and ``window_end`` (the next step's first arrival; the step's drain
    when it is the last), as the simulator counts the decode steps after its warm-up."""
    step = sent[lo:hi]
    n = len(step)
    w0 = min(int(n * WARMUP_FRACTION), n - 1)
    ttft = [r.first - r.arrival if r.ok and r.first is not None else math.inf for r in step[w0:]]
    since = step[w0].arrival
    gaps = [
        g
        for r in sent
        if r.ok
        for t, g in zip(r.gap_t, r.gap_s, strict=True)
        if since <= t < window_end
    ]
    tokens = chunks = 0
    for r in step:
        if r.ok and r.completion_tokens:
            tokens += r.completion_tokens - 1
            chunks += r.chunks
    per_chunk = _chunk_gaps(sent, since, window_end)
    t95, i95 = _q(ttft, 0.95), _q(gaps, 0.95)
    arr = [r.arrival for r in step]
    own_itl = [
        (r.end - r.first) / (r.completion_tokens - 1)
        for r in step[w0:]
        if r.ok and r.first is not None and r.end is not None and (r.completion_tokens or 0) >= 2
    ]
    return StepResult(
        factor=factor,
        rate_rps=rate,
        achieved_rps=(n - 1) / (max(arr) - min(arr)) if n > 1 else math.nan,
        n=n,
        n_ok=sum(r.ok for r in step),
        ttft_p50_s=_q(ttft, 0.5),
        ttft_p95_s=t95,
        itl_p50_s=_q(gaps, 0.5),
        itl_p95_s=i95,
        itl_p95_per_chunk_s=_q(per_chunk, 0.95),
        tokens_per_chunk=tokens / chunks if chunks else math.nan,
        duration_s=(min(window_end, max(r.end or r.arrival for r in sent)) - min(arr)),
        slo_ratio=max(t95 / s.slo_ttft_s, i95 / s.slo_itl_s),
        ttft_mean_s=_finite_mean(ttft),
        itl_mean_s=_finite_mean(own_itl),
        ttft_samples=tuple(ttft),
        itl_samples=tuple(gaps),
    )


def _finite_mean(x: Sequence[float] | np.ndarray) -> float:
    a = np.asarray(x, dtype=float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else math.nan


def _chunk_gaps(sent: Sequence[Sent], since: float, until: float) -> list[float]:
    """Gaps between successive reads that brought tokens (one per read, not per token)."""
    out: list[float] = []
    for r in sent:
        if not r.ok or r.first is None:
            continue
        prev = r.first
        for t in dict.fromkeys(r.gap_t):  # read times, in order
            if since <= t < until:
                out.append(t - prev)
            prev = t
    return out


def with_replay(st: StepResult, rep: Replay, lo: int, hi: int, until: float,
                s: Settings) -> StepResult:  # fmt: skip
    """The step as the model predicts it on the same trace: TTFT of requests ``lo + 10%`` to
    ``hi``, ITL of the decode steps from the first counted arrival to ``until`` (the
    measurement's own windows; times relative to the run's first arrival)."""
    tr = rep.trace
    w0 = lo + min(int((hi - lo) * WARMUP_FRACTION), hi - lo - 1)
    ttft = tr.first_token_s[w0:hi] - tr.arrival_s[w0:hi]
    ttft = np.where(np.isfinite(ttft), ttft, math.inf)
    t95 = _q(ttft, 0.95)
    i95 = rep.itl_quantiles([0.95], since=float(tr.arrival_s[w0]), until=until)[0]
    ratio = max(t95 / s.slo_ttft_s, i95 / s.slo_itl_s)
    out = tr.output_tokens[w0:hi].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        own_itl = np.where(
            out >= 2, (tr.finish_s[w0:hi] - tr.first_token_s[w0:hi]) / (out - 1), math.nan
        )
    return replace(
        st,
        replay_ttft_p95_s=t95,
        replay_itl_p95_s=i95,
        replay_slo_ratio=ratio,
        replay_ttft_mean_s=_finite_mean(ttft),
        replay_itl_mean_s=_finite_mean(own_itl),
    )


def trace_mean_errors(st: StepResult) -> tuple[float, float]:
    """(TTFT, ITL) relative errors of the model's means on the step's own trace: the
    robust check (a p95 of a short step is decided by a few requests, a mean is not)."""
    return (
        (st.replay_ttft_mean_s - st.ttft_mean_s) / st.ttft_mean_s,
        (st.replay_itl_mean_s - st.itl_mean_s) / st.itl_mean_s,
    )


_REFERENCE_BATCH = 4  # running sequences of the reference request's decode


def fitted_engine_time(
    records: Sequence[RequestRecord], max_num_seqs: int, prompt: float, output: float
) -> float:
    """Engine time of one reference request (``prompt`` and ``output`` tokens: its TTFT on an
    idle engine plus its decode among ``_REFERENCE_BATCH`` running sequences) under a step
    model fitted on ``records`` alone (the calibrator's generic prior, no forgetting); NaN
    without a fit that explains its records (too few, or their median error over 30%)."""
    cal = OnlineCalibrator(config=CalibratorConfig(half_life_s=1e9, refit_new_fraction=0.0))
    for r in records:
        cal.observe(r)
    fit = cal.fit(max_num_seqs=max_num_seqs)
    if fit.n_itl < 20 or fit.itl_mare is None or fit.itl_mare > 0.3:
        return math.nan
    st = fit.step
    ctx = prompt + output / 2
    return st.ttft_alone(round(prompt)) + (output - 1) * st.itl_at(_REFERENCE_BATCH, ctx)


def engine_speed_change(
    step_records: Sequence[RequestRecord],
    low_records: Sequence[RequestRecord],
    max_num_seqs: int,
) -> float:
    """How much slower (+) or faster (-) the engine ran during a step than during the
    low-rate phase, each fitted on its own records alone, for the low phase's mean request.

    The estimator can only know the engine as it was while it learned; on this shared 2-vCPU
    machine the engine's speed drifts by 10-15% within minutes (a fresh server fed the same
    rates in alternation measured single-sequence steps within 4% of each other, so this is
    the host, not load or warm-up; bench/README.md). Near capacity that alone moves a p95
    TTFT by tens of percent (a 10% slower engine at 0.95 C: SLO ratio 2.38 measured, 1.56
    from the model on the trace), so the report shows it beside each step.
    """
    ok = [r for r in low_records if r.prompt_tokens and r.completion_tokens]
    if not ok:
        return math.nan
    prompt = float(np.mean([r.prompt_tokens or 0 for r in ok]))
    output = float(np.mean([r.completion_tokens or 0 for r in ok]))
    base = fitted_engine_time(low_records, max_num_seqs, prompt, output)
    here = fitted_engine_time(step_records, max_num_seqs, prompt, output)
    return here / base - 1.0 if base > 0 else math.nan


def crossing(steps: Sequence[StepResult], ratio: str = "slo_ratio") -> tuple[float | None, str]:
    """Rate where the SLO ratio crosses 1 going up the ramp, linearly interpolated between the
    last passing and the first failing step of the ratios made non-decreasing in the rate
    (isotonic regression, pool-adjacent-violators weighted by requests: a short step that
    was unlucky or lucky is averaged with its neighbours instead of deciding alone); None
    when it is not bracketed (with why)."""
    ordered = sorted(steps, key=lambda x: x.rate_rps)
    ys = [min(getattr(st, ratio), 1e6) for st in ordered]
    iso = isotonic(ys, [float(st.n) for st in ordered])
    note = "interpolated" if iso == ys else "interpolated on the isotonic fit"
    for i, st in enumerate(ordered):
        if iso[i] > 1.0:
            if i == 0:
                return None, "the lowest step already misses the SLO"
            lo = ordered[i - 1]
            f = (1.0 - iso[i - 1]) / (iso[i] - iso[i - 1])
            return lo.rate_rps + f * (st.rate_rps - lo.rate_rps), note
    return None, "every step meets the SLO"


# --- prediction --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Prediction:
    capacity_rps: float
    limiting: str
    fit_source: str
    fit_error_p50: float | None
    fit_error_p90: float | None
    step: dict[str, float]
    records: int
    mean_prompt: float
    mean_output: float
    kv_capacity_tokens: int
    at_rates: dict[str, dict[str, float]]  # "0.5": {rate, ttft_p95_s, itl_p95_s}
    report_capacity_rps: float | None
    default_capacity_rps: float | None  # the same with the estimator's default sim_requests
    noise: dict[str, float] = field(default_factory=dict)  # see measurement_noise


def estimator_config(s: Settings) -> EstimatorConfig:
    kw: dict[str, Any] = {}
    if s.use_prior:
        from tests.support.real_backends import MODELS

        kw = dict(gpu="cpu", model_configs={SERVED: str(MODELS / s.model / "config.json")})
    return EstimatorConfig(
        sim_requests=s.sim_requests,
        slo_ttft_p95_s=s.slo_ttft_s,
        slo_itl_p95_s=s.slo_itl_s,
        max_num_seqs=s.max_num_seqs,
        **kw,
    )


def predict(
    records: Sequence[RequestRecord], snapshot: BackendSnapshot, s: Settings
) -> tuple[Prediction, StepModel, EngineLimits]:
    """Replay ``records`` into an ``Estimator``; its capacity, and p95 latencies at
    ``other_rates`` x capacity by the estimator's own projection pieces."""
    cfg = estimator_config(s)
    est = Estimator(cfg)
    est.observe_backend(snapshot)
    report = est.replay_records(records)
    dep = next(d for d in report.deployments if d.model == SERVED)
    # the numbers behind the report (estimator.projection.project), to simulate other rates
    proj = est.projection(SERVED)
    if proj is None or proj.basis is None:
        raise RuntimeError(f"no step model: {dep.notes}")
    step, limits, workload = proj.basis.step, proj.basis.limits, proj.basis.workload
    cap, source = proj.basis.capacity, dep.fit.source
    default = Estimator(replace(cfg, sim_requests=EstimatorConfig().sim_requests))
    default.observe_backend(snapshot)
    default_dep = next(d for d in default.replay_records(records).deployments if d.model == SERVED)
    at: dict[str, dict[str, float]] = {}
    for f in s.other_rates if cap.rate_rps > 0 else ():  # none meets the SLO: nothing to add
        sim = simulate(
            step,
            limits,
            workload,
            f * cap.rate_rps,
            n_requests=cfg.sim_requests,
            quantile=cfg.slo.quantile,
        )
        at[f"{f:g}"] = {
            "rate_rps": f * cap.rate_rps,
            "ttft_p95_s": sim.ttft_q_s,
            "itl_p95_s": sim.itl_q_s,
        }
    pred = Prediction(
        capacity_rps=cap.rate_rps,
        limiting=cap.limiting,
        fit_source=source,
        fit_error_p50=dep.fit.rel_error_p50,
        fit_error_p90=dep.fit.rel_error_p90,
        step={
            **dict(
                zip(
                    ("overhead_s", "prefill_s_per_token", "decode_s_per_seq", "kv_s_per_token"),
                    step.coefficients(),
                    strict=True,
                )
            ),
            "jitter_sigma": step.jitter_sigma,
            "drift_sigma": step.drift_sigma,
            "drift_tau_s": step.drift_tau_s,
        },
        records=len(records),
        mean_prompt=workload.mean_prompt,
        mean_output=workload.mean_output,
        kv_capacity_tokens=limits.kv_capacity_tokens,
        at_rates=at,
        report_capacity_rps=dep.capacity_rps,
        default_capacity_rps=default_dep.capacity_rps,
        noise=measurement_noise(step, limits, workload, cfg, s, cap.rate_rps),
    )
    return pred, step, limits


def measurement_noise(
    step: StepModel,
    limits: EngineLimits,
    workload: Workload,
    cfg: EstimatorConfig,
    s: Settings,
    capacity: float,
    seeds: int = 8,
    latency_seeds: int = 40,
) -> dict[str, float]:
    """How much a measurement as short as the ramp's varies by chance alone, in the
    estimator's own model: the relative standard deviation over ``seeds`` simulations (fresh
    arrivals and lengths) of the capacity found with steps of the ramp's size, and of p95 TTFT
    and ITL at ``other_rates`` with those steps' request counts (over ``latency_seeds``
    simulations, whose 5th and 95th percentiles are kept too, as ``KEY:lo`` and ``KEY:hi``: a
    short step's p95 TTFT near capacity is skewed, a rare burst of arrivals multiplies it, and
    a standard deviation says little about that). Errors of that size are sampling noise, not
    model error."""

    def rsd(x: list[float]) -> float:
        a = np.asarray(x)
        return float(a.std() / a.mean()) if a.size and a.mean() > 0 else math.nan

    near = [n for f, n in s.ramp if f >= 0.9] or [n for _, n in s.ramp]
    n_cap = max(50, int(np.mean(near)))
    out = {
        "capacity": rsd(
            [
                max_rate_at_slo(
                    step, limits, workload, cfg.slo, n_requests=n_cap, seed=100 + k
                ).rate_rps
                for k in range(seeds)
            ]
        )
    }
    counts = dict(s.ramp)
    for f in s.other_rates if capacity > 0 else ():
        sims = [
            simulate(
                step,
                limits,
                workload,
                f * capacity,
                n_requests=counts.get(f, 100),
                seed=100 + k,
                quantile=cfg.slo.quantile,
            )
            for k in range(latency_seeds)
        ]
        for metric, values in (
            ("ttft_p95_s", [x.ttft_q_s for x in sims]),
            ("itl_p95_s", [x.itl_q_s for x in sims]),
        ):
            key = f"{metric}@{f:g}C"
            out[key] = rsd(values)
            out[key + ":lo"], out[key + ":hi"] = (
                float(v) for v in np.quantile(values, [0.05, 0.95])
            )
    return out


# --- the server --------------------------------------------------------------------------------


def engine_snapshot(engine_url: str, backend: str) -> BackendSnapshot:
    """One scrape of the engine's ``/metrics`` as the proxy's scraper turns it into a
    ``BackendSnapshot`` (``proxy.upstream.dialects``): vLLM's ``cache_config_info`` gives the block size
    and the number of KV blocks; vLLM does not expose ``max_num_seqs`` (the estimator takes it
    from its config, as an operator would set it)."""
    from proxy.upstream.dialects import parse_metrics

    with urllib.request.urlopen(engine_url + "/metrics", timeout=5) as r:
        dialect, fields = parse_metrics(r.read().decode())
    return BackendSnapshot(
        backend=backend,
        time_s=time.monotonic(),
        epoch=time.time(),
        up=True,
        dialect=dialect,
        models=(SERVED,),
        **fields,
    )


def read_records(path: Path, tenant: str) -> list[RequestRecord]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = RequestRecord.from_dict(orjson.loads(line))
            if r.tenant == tenant:
                out.append(r)
    return out


def wait_for_records(path: Path, tenant: str, n: int, timeout_s: float = 30.0) -> None:
    """The proxy writes a record after the response ends: wait until all ``n`` are there."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and len(read_records(path, tenant)) >= n:
            return
        time.sleep(0.2)


# --- the run -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome_:
    settings: Settings
    prediction: Prediction
    low: StepResult
    steps: list[StepResult]
    measured_capacity_rps: float | None
    crossing_note: str
    loadavg_start: tuple[float, float, float]
    loadavg_end: tuple[float, float, float]
    snapshot: dict[str, Any]
    phases_s: dict[str, float]
    checks: list[dict[str, Any]] = field(default_factory=list)

    def compare(self) -> list[dict[str, Any]]:
        """The issue's targets: capacity within 15%, p95 TTFT and ITL at two rates within 20%."""
        p, out = self.prediction, []
        m = self.measured_capacity_rps
        err = (p.capacity_rps - m) / m if m else math.nan
        rc = crossing(self.steps, "replay_slo_ratio")[0]
        out.append(
            dict(
                name="capacity_rps",
                predicted=p.capacity_rps,
                measured=m,
                rel_error=err,
                target=CAPACITY_TOL,
                ok=m is not None and abs(err) <= CAPACITY_TOL,
                noise=p.noise.get("capacity"),
                replay=rc,
                replay_error=(rc - m) / m if m and rc is not None else math.nan,
            )
        )
        for key, pred in p.at_rates.items():
            st = _step_at(self.steps, float(key))
            for metric in ("ttft_p95_s", "itl_p95_s"):
                meas = getattr(st, metric) if st else math.nan
                e = (pred[metric] - meas) / meas if st and meas > 0 else math.nan
                out.append(
                    dict(
                        name=f"{metric}@{key}C",
                        predicted=pred[metric],
                        measured=meas,
                        rel_error=e,
                        target=LATENCY_TOL,
                        ok=bool(st) and abs(e) <= LATENCY_TOL,
                        noise=p.noise.get(f"{metric}@{key}C"),
                        chance_range=(
                            p.noise.get(f"{metric}@{key}C:lo"),
                            p.noise.get(f"{metric}@{key}C:hi"),
                        ),
                        replay=getattr(st, "replay_" + metric) if st else math.nan,
                        replay_error=(getattr(st, "replay_" + metric) - meas) / meas
                        if st and meas > 0
                        else math.nan,
                    )
                )
        self.checks = out
        return out


def _step_at(steps: Sequence[StepResult], factor: float) -> StepResult | None:
    return next((st for st in steps if math.isclose(st.factor, factor, rel_tol=1e-9)), None)


_MAKE_SHAPE = """
import json, shutil, sys
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
src, dest, shape = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=4096, max_position_embeddings=2048, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False, **shape)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(dest, safe_serialization=True)
for f in src.iterdir():
    if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
        shutil.copy(f, dest / f.name)
"""


def ensure_model(name: str) -> None:
    """Make ``MODEL_SHAPES[name]`` beside ``MODEL_DIR`` (same tokenizer) when it is missing;
    with the vLLM venv's Python (torch, transformers), seeded, a few seconds."""
    from tests.support.real_backends import MODELS, VLLM_PYTHON

    dest = MODELS / name
    if name == MODEL_DIR or (dest / "config.json").is_file():
        return
    if name not in MODEL_SHAPES:
        raise SystemExit(f"unknown model {name!r}; known: {MODEL_DIR}, {', '.join(MODEL_SHAPES)}")
    import subprocess

    tmp = MODELS / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([str(VLLM_PYTHON), "-c", _MAKE_SHAPE, str(MODELS / MODEL_DIR), str(tmp),
                    json.dumps(MODEL_SHAPES[name])], check=True)  # fmt: skip
    tmp.rename(dest)


def save_sent(path: Path, sent: Sequence[Sent], plan: Sequence[tuple[float, int]],
              capacity: float, ramp_id: int) -> None:  # fmt: skip
    """Append one ramp's requests as the client saw them (JSON lines: the step's factor and
    rate, then ``Sent``'s fields) so that a run can be replayed offline against other step
    models (``bench/replay_ramp.py``)."""
    factors = [f for f, n in plan for _ in range(n)]
    with path.open("a", encoding="utf-8") as fh:
        for f, r in zip(factors, sent, strict=True):
            row = {"ramp": ramp_id, "factor": f, "rate": f * capacity, **asdict(r)}
            fh.write(json.dumps(row) + "\n")


@dataclass(slots=True)
class _Bed:
    """What a run has started: the engine, the proxy in front of it, the CPU monitor."""

    s: Settings
    server: Any
    proxy: Any
    mon: CpuMonitor
    req_log: Path
    workdir: Path
    rng: np.random.Generator
    log: Any

    @property
    def backend(self) -> str:
        return str(self.server.url).split("://", 1)[1]


def _start(stack: contextlib.ExitStack, s: Settings, workdir: Path, log: Any) -> _Bed:
    """vLLM (with its engine on a core of its own when ``s.isolate``) and the proxy."""
    from tests.support.procs import start_proxy
    from tests.support.real_backends import isolated_vllm_engine, start_vllm

    t0 = time.monotonic()
    req_log = workdir / "requests.jsonl"
    ensure_model(s.model)
    server = start_vllm(s.model, served_name=SERVED, max_num_seqs=s.max_num_seqs)
    stack.callback(server.stop)
    proxy = start_proxy(
        [server.url],
        request_log=req_log,
        config={
            "scheduling": {"enabled": False},
            "estimator": {"enabled": False},
            "timeouts": {"read_s": 600.0, "total_s": None},
        },
    )
    stack.callback(proxy.stop)
    mon = stack.enter_context(CpuMonitor([server.pid, proxy.proc.pid]))
    log(f"vLLM {server.url} and proxy {proxy.url} up in {time.monotonic() - t0:.0f} s")
    if s.isolate:
        cores = stack.enter_context(isolated_vllm_engine(server, [proxy.proc.pid, os.getpid()]))
        if not cores["engine_cpus"]:
            raise RuntimeError(
                "could not give the engine a core of its own (no pinned vLLM CPU worker "
                f"among CPUs {sorted(os.sched_getaffinity(0))}); --no-isolate measures "
                "without (see Settings.isolate)"
            )
        log(f"engine on cores {cores['engine_cpus']}, everything else on {cores['front_cpus']}")
    rng = np.random.default_rng(s.seed)
    return _Bed(s, server, proxy, mon, req_log, workdir, rng, log)


def _low_phase(bed: _Bed) -> tuple[StepResult, list[RequestRecord]]:
    """Warm-up (not measured), then the low-rate phase the estimator learns from."""
    s, rng, url = bed.s, bed.rng, bed.proxy.url
    asyncio.run(run_poisson(url, draw_requests(s, s.warmup_requests, rng), 4.0, "warmup", rng))
    bed.log(f"low-rate phase: {s.low_requests} requests at {s.low_rate:g}/s")
    low_sent = asyncio.run(
        run_poisson(url, draw_requests(s, s.low_requests, rng), s.low_rate, "low", rng)
    )
    low = summarise_step(low_sent, 0, len(low_sent), s.low_rate, math.nan, s)
    t_end = max(r.end or r.arrival for r in low_sent)
    low = replace(low, other_cpu_cores=bed.mon.other_cores(low_sent[0].arrival, t_end))
    wait_for_records(bed.req_log, "low", s.low_requests)
    low_records = read_records(bed.req_log, "low")
    bed.log(
        f"  {sum(r.outcome is Outcome.OK for r in low_records)} records; measured TTFT p95 "
        f"{low.ttft_p95_s * 1e3:.0f} ms, ITL p95 {low.itl_p95_s * 1e3:.1f} ms"
    )
    return low, low_records


@dataclass(slots=True)
class _Ramp:
    """The measured ramp around the prediction ``capacity`` (req/s)."""

    bed: _Bed
    capacity: float
    step_model: StepModel
    limits: EngineLimits
    low_records: list[RequestRecord]
    steps: list[StepResult] = field(default_factory=list)

    def run(self, plan: Sequence[tuple[float, int]]) -> None:
        """One continuous open-loop run: the steps follow each other without a pause."""
        bed, c = self.bed, self.capacity
        rates = [f * c for f, n in plan for _ in range(n)]
        first = len(self.steps)
        tenants = [f"ramp{first + k}" for k, (_, n) in enumerate(plan) for _ in range(n)]
        reqs = draw_requests(bed.s, len(rates), bed.rng)
        sent = asyncio.run(run_poisson(bed.proxy.url, reqs, rates, tenants, bed.rng))
        save_sent(bed.workdir / "ramp_sent.jsonl", sent, plan, c, first)
        t_0 = sent[0].arrival
        rep = replay(self.step_model, self.limits, [r.arrival - t_0 for r in sent],
                     [r.prompt_len for r in sent], [r.max_tokens for r in sent])  # fmt: skip
        lo = 0
        for k, (f, n) in enumerate(plan):
            end = sent[lo + n].arrival if k + 1 < len(plan) else math.inf
            self.steps.append(self._step(sent, rep, lo, n, f, end, tenants[lo]))
            lo += n

    def _step(self, sent: list[Sent], rep: Replay, lo: int, n: int, f: float, end: float,
              tenant: str) -> StepResult:  # fmt: skip
        bed, c, s = self.bed, self.capacity, self.bed.s
        t_0 = sent[0].arrival
        st = summarise_step(sent, lo, lo + n, f * c, f, s, window_end=end)
        st = with_replay(st, rep, lo, lo + n, end - t_0, s)
        t_end = min(end, max(r.end or r.arrival for r in sent))
        wait_for_records(bed.req_log, tenant, n)
        speed = engine_speed_change(
            read_records(bed.req_log, tenant), self.low_records, s.max_num_seqs
        )
        st = replace(st, other_cpu_cores=bed.mon.other_cores(sent[lo].arrival, t_end),
                     engine_speed_change=speed)  # fmt: skip
        bed.log(
            f"  step {f:.2f} C = {f * c:.2f}/s: TTFT p95 {st.ttft_p95_s * 1e3:.0f} ms, "
            f"ITL p95 {st.itl_p95_s * 1e3:.1f} ms, SLO ratio {st.slo_ratio:.2f}, "
            f"{st.n_ok}/{st.n} ok, {st.duration_s:.0f} s, other processes "
            f"{st.other_cpu_cores:.2f} cores, engine {speed:+.0%} vs the low phase"
        )
        return st

    def extend_until_crossed(self) -> None:
        """Steps beyond the plan while the ramp has not crossed the SLO (up or down)."""
        s = self.bed.s
        for _ in range(s.max_extra_steps):
            if crossing(self.steps)[0] is not None:
                return
            ordered = sorted(self.steps, key=lambda x: x.rate_rps)
            if ordered[0].slo_ratio > 1.0:
                self.run([(ordered[0].factor / s.extend_factor, s.extra_requests)])
            else:
                self.run([(ordered[-1].factor * s.extend_factor, s.extra_requests)])


def run(s: Settings, *, log: Any = print, keep_dir: Path | None = None) -> Outcome_:
    """Start vLLM and the proxy, run the phases, stop everything (see bench/estimator_accuracy.py
    for the procedure)."""
    phases: dict[str, float] = {}
    load0 = os.getloadavg()
    workdir = keep_dir or Path(tempfile.mkdtemp(prefix="rightsizer-accuracy-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        t = time.monotonic()
        bed = _start(stack, s, workdir, log)
        phases["start"], t = time.monotonic() - t, time.monotonic()
        low, low_records = _low_phase(bed)
        phases["low_rate"], t = time.monotonic() - t, time.monotonic()
        snap = engine_snapshot(bed.server.url, bed.backend)
        (workdir / "snapshot.json").write_text(json.dumps(snap.to_dict()))
        records = [r for r in low_records if r.outcome is Outcome.OK]
        pred, step_model, limits = predict(records, snap, s)
        scaled = machine_slo(s, step_model)
        if scaled != s:
            log(f"a slow engine: SLO raised to {scaled.slo_idle_factor:g}x its idle latency, "
                f"p95 TTFT <= {scaled.slo_ttft_s:g} s, p95 ITL <= {scaled.slo_itl_s * 1e3:g} ms "
                f"(was {s.slo_ttft_s:g} s, {s.slo_itl_s * 1e3:g} ms)")  # fmt: skip
            s = bed.s = scaled
            low = replace(low, slo_ratio=max(low.ttft_p95_s / s.slo_ttft_s,
                                             low.itl_p95_s / s.slo_itl_s))  # fmt: skip
            pred, step_model, limits = predict(records, snap, s)
        phases["predict"], t = time.monotonic() - t, time.monotonic()
        c = pred.capacity_rps
        log(f"predicted capacity {c:.2f} req/s (limiting: {pred.limiting}, fit "
            f"{pred.fit_source}, p50 error {pred.fit_error_p50})")  # fmt: skip
        if not c > 0:
            raise RuntimeError("the estimator predicts no capacity: nothing to ramp around")
        ramp = _Ramp(bed, c, step_model, limits, low_records)
        log("ramp:")
        ramp.run(s.ramp)
        ramp.extend_until_crossed()
        measured, note = crossing(ramp.steps)
        phases["ramp"] = time.monotonic() - t
    out = Outcome_(
        settings=s,
        prediction=pred,
        low=low,
        steps=sorted(ramp.steps, key=lambda x: x.rate_rps),
        measured_capacity_rps=measured,
        crossing_note=note,
        loadavg_start=load0,
        loadavg_end=os.getloadavg(),
        snapshot=snap.to_dict(),
        phases_s=phases,
    )
    out.compare()
    return out


def machine_slo(s: Settings, step: StepModel) -> Settings:
    """``s`` with its SLO raised to ``slo_idle_factor`` times what the engine, as fitted on the
    low phase, takes on its own: the idle TTFT of a p95-length prompt and the idle ITL.

    The procedure judges the estimator around the capacity at the SLO, so that capacity must
    be a rate the engine can be measured at in minutes. The SLO of 1 s / 60 ms was chosen on
    engines that prefill 100-600 tokens in 50-300 ms; one machine of this kind (2026-12-07)
    ran the same vLLM build and model at 2.3 ms per prompt token (600 tokens: 1.4 s idle),
    so the p95 prompt alone missed the 1 s SLO, the predicted capacity was 0.13 req/s, and the
    ramp would have run for over half an hour around a crossing that is all noise. On such
    an engine the SLO scales with it; on the engines the SLO was chosen for, it is unchanged.
    """
    if s.slo_idle_factor <= 0:
        return s
    if s.prompt_choices:
        prompt = max(s.prompt_choices)
    else:
        prompt = min(s.prompt_max, s.prompt_median * math.exp(1.645 * s.prompt_sigma))
    outputs = s.output_choices or (s.output_min, s.output_max)
    ttft = step.ttft_idle(int(prompt))
    itl = step.itl_at(1, prompt + max(outputs) / 2)
    return replace(
        s,
        slo_ttft_s=max(s.slo_ttft_s, round(s.slo_idle_factor * ttft, 2)),
        slo_itl_s=max(s.slo_itl_s, round(s.slo_idle_factor * itl, 3)),
    )


# --- output -------------------------------------------------------------------------------------


def _num(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3g}"


def _ms(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x * 1e3:.1f}"


def render(o: Outcome_) -> str:
    s, p = o.settings, o.prediction
    lines = [
        f"server: vLLM CPU {o.settings.model}, max_num_seqs {s.max_num_seqs}, KV "
        f"{p.kv_capacity_tokens} tokens; SLO p95 TTFT <= {s.slo_ttft_s:g} s, "
        f"p95 ITL <= {s.slo_itl_s * 1e3:g} ms",
        f"low-rate phase: {p.records} records at {s.low_rate:g} req/s "
        f"(mean prompt {p.mean_prompt:.0f}, output {p.mean_output:.0f} tokens)",
        "fitted step model: "
        + ", ".join(f"{k} {v:.3g}" for k, v in p.step.items())
        + f" (fit {p.fit_source}, error p50 {p.fit_error_p50 or math.nan:.0%}, "
        f"p90 {p.fit_error_p90 or math.nan:.0%})",
        "",
        "| step | rate (req/s) | sent (req/s) | ok | TTFT p50 / p95 (ms) | ITL p50 / p95 (ms) |"
        " ITL p95 per chunk (ms) | SLO ratio | model on this trace: TTFT / ITL p95 (ms), ratio |"
        " mean TTFT / ITL (ms), model on this trace (error) | other processes (cores) |"
        " engine vs the low phase |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines.append(
        f"| low | {s.low_rate:.2f} | {o.low.achieved_rps:.2f} | {o.low.n_ok}/{o.low.n} | "
        f"{_ms(o.low.ttft_p50_s)} / {_ms(o.low.ttft_p95_s)} | {_ms(o.low.itl_p50_s)} / "
        f"{_ms(o.low.itl_p95_s)} | {_ms(o.low.itl_p95_per_chunk_s)} | "
        f"{o.low.slo_ratio:.2f} | | {_ms(o.low.ttft_mean_s)} / {_ms(o.low.itl_mean_s)} | "
        f"{o.low.other_cpu_cores:.2f} | |"
    )
    for st in o.steps:
        te, ie = trace_mean_errors(st)
        lines.append(
            f"| {st.factor:.2f} C | {st.rate_rps:.2f} | {st.achieved_rps:.2f} | "
            f"{st.n_ok}/{st.n} | {_ms(st.ttft_p50_s)} / {_ms(st.ttft_p95_s)} | "
            f"{_ms(st.itl_p50_s)} / {_ms(st.itl_p95_s)} | "
            f"{_ms(st.itl_p95_per_chunk_s)} | {st.slo_ratio:.2f} | "
            f"{_ms(st.replay_ttft_p95_s)} / {_ms(st.replay_itl_p95_s)}, "
            f"{st.replay_slo_ratio:.2f} | {_ms(st.ttft_mean_s)} / {_ms(st.itl_mean_s)}, "
            f"{_ms(st.replay_ttft_mean_s)} ({te:+.0%}) / {_ms(st.replay_itl_mean_s)} "
            f"({ie:+.0%}) | {st.other_cpu_cores:.2f} | {st.engine_speed_change:+.0%} |"
        )
    lines += [
        "",
        f"measured capacity: {_num(o.measured_capacity_rps)} req/s ({o.crossing_note}); "
        f"predicted {p.capacity_rps:.3g} req/s (limiting: {p.limiting}; with the default "
        f"800 simulated requests per probe: {_num(p.default_capacity_rps)})",
        "",
        "| quantity | predicted | measured | error | target | result | chance alone (1 sd) "
        "| chance alone: 90% range of a step this short | model on the measured trace "
        "| its error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in o.checks:
        unit = 1e3 if c["name"] != "capacity_rps" else 1.0

        def fmtv(v: float | None, u: float = unit) -> str:
            return "-" if v is None or not math.isfinite(v) else f"{v * u:.3g}"

        lines.append(
            f"| {c['name']}{' (ms)' if unit != 1 else ' (req/s)'} | "
            f"{fmtv(c['predicted'])} | {fmtv(c['measured'])} | "
            f"{c['rel_error']:+.1%} | ±{c['target']:.0%} | "
            f"{'PASS' if c['ok'] else 'FAIL'} | "
            f"{'-' if c.get('noise') is None else format(c['noise'], '.0%')} | "
            f"{_range(c.get('chance_range'), c['measured'], unit)} | "
            f"{fmtv(c['replay'])} | {c['replay_error']:+.1%} |"
        )
    lines.append("")
    lines.append(
        f"load average at start {o.loadavg_start[0]:.2f} / end {o.loadavg_end[0]:.2f}; "
        "phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in o.phases_s.items())
    )
    return "\n".join(lines)


def _range(r: tuple[float | None, float | None] | None, measured: float, unit: float) -> str:
    """'lo-hi, measured inside/above/below' for a chance range, '-' without one."""
    if not r or r[0] is None or r[1] is None:
        return "-"
    lo, hi = r
    where = "inside" if lo <= measured <= hi else ("above" if measured > hi else "below")
    return f"{lo * unit:.3g}-{hi * unit:.3g}, measured {where}"


def _clean(x: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def _step_json(st: StepResult) -> dict[str, Any]:
    d = asdict(st)
    del d["ttft_samples"], d["itl_samples"]
    return d


def to_json(o: Outcome_) -> dict[str, Any]:
    return _clean(
        {
            "settings": asdict(o.settings),
            "prediction": asdict(o.prediction),
            "low_rate_phase": _step_json(o.low),
            "steps": [_step_json(st) for st in o.steps],
            "measured_capacity_rps": o.measured_capacity_rps,
            "crossing": o.crossing_note,
            "checks": o.checks,
            "snapshot": o.snapshot,
            "phases_s": o.phases_s,
            "loadavg_start": o.loadavg_start,
            "loadavg_end": o.loadavg_end,
            "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )


# --- several seeds, pooled -----------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Pooled:
    """The ramp steps of several runs (seeds) pooled by their rate as a fraction of each run's
    own predicted capacity, and the issue's targets judged on them.

    One run's p95 near capacity is decided by a few bursts of arrivals (its "chance alone"
    range at 0.8 C spans a factor of 2-4); the same quantity over the requests of several
    runs at the same relative rate is what a longer measurement gives, which is what the
    estimator predicts. Rates are in units of the run's predicted capacity, so the measured
    capacity is a factor ``f`` (prediction error ``1 / f - 1``) and the predicted p95s are
    averaged over the runs. When the pooled steps do not bracket the SLO crossing (the runs
    extended their ramps differently), ``f`` is the mean of the runs' own crossings.
    """

    seeds: list[int]
    steps: list[StepResult]  # rate_rps = factor
    crossing_factor: float | None
    crossing_note: str
    checks: list[dict[str, Any]]


def pool(outcomes: Sequence[Outcome_]) -> Pooled:
    """Pool the steps whose factor every run has (the planned ramp; extensions differ)."""
    keyed = [{round(st.factor, 4): st for st in o.steps} for o in outcomes]
    common = sorted(set.intersection(*(set(k) for k in keyed))) if keyed else []
    s = outcomes[0].settings
    steps = []
    for f in common:
        group = [k[f] for k in keyed]
        ttft = [x for st in group for x in st.ttft_samples]
        gaps = [x for st in group for x in st.itl_samples]
        n = [float(st.n) for st in group]
        t95, i95 = _q(ttft, 0.95), _q(gaps, 0.95)

        def wmean(attr: str, group: list[StepResult] = group, n: list[float] = n) -> float:
            v = np.array([getattr(st, attr) for st in group], dtype=float)
            ok = np.isfinite(v)
            return float(np.average(v[ok], weights=np.array(n)[ok])) if ok.any() else math.nan

        steps.append(
            StepResult(
                factor=f, rate_rps=f, achieved_rps=math.nan, n=int(sum(n)),
                n_ok=sum(st.n_ok for st in group), ttft_p50_s=_q(ttft, 0.5), ttft_p95_s=t95,
                itl_p50_s=_q(gaps, 0.5), itl_p95_s=i95, itl_p95_per_chunk_s=math.nan,
                tokens_per_chunk=math.nan, duration_s=sum(st.duration_s for st in group),
                slo_ratio=max(t95 / s.slo_ttft_s, i95 / s.slo_itl_s),
                ttft_mean_s=_finite_mean(ttft), itl_mean_s=wmean("itl_mean_s"),
                replay_ttft_mean_s=wmean("replay_ttft_mean_s"),
                replay_itl_mean_s=wmean("replay_itl_mean_s"),
                other_cpu_cores=wmean("other_cpu_cores"),
                engine_speed_change=wmean("engine_speed_change"),
            )
        )  # fmt: skip
    fx, note = crossing(steps)
    own = [o.measured_capacity_rps / o.prediction.capacity_rps
           for o in outcomes if o.measured_capacity_rps]  # fmt: skip
    if fx is None and own:
        fx = float(np.mean(own))
        note = f"the mean of {len(own)} of {len(outcomes)} runs' own crossings; pooled: {note}"
    checks: list[dict[str, Any]] = []
    err = 1.0 / fx - 1.0 if fx else math.nan
    mean_c = float(np.mean([o.prediction.capacity_rps for o in outcomes]))
    checks.append(dict(
        name="capacity_rps", predicted=mean_c, measured=fx * mean_c if fx else None,
        rel_error=err, target=CAPACITY_TOL, ok=fx is not None and abs(err) <= CAPACITY_TOL,
        per_run=[c["rel_error"] for o in outcomes for c in o.checks if c["name"] == "capacity_rps"],
    ))  # fmt: skip
    for key in outcomes[0].prediction.at_rates:
        st = _step_at(steps, float(key))
        for metric in ("ttft_p95_s", "itl_p95_s"):
            pred = float(np.mean([o.prediction.at_rates[key][metric] for o in outcomes]))
            meas = getattr(st, metric) if st else math.nan
            e = (pred - meas) / meas if st and meas > 0 else math.nan
            name = f"{metric}@{key}C"
            checks.append(dict(
                name=name, predicted=pred, measured=meas, rel_error=e, target=LATENCY_TOL,
                ok=bool(st) and abs(e) <= LATENCY_TOL,
                per_run=[c["rel_error"] for o in outcomes for c in o.checks if c["name"] == name],
            ))  # fmt: skip
    return Pooled(
        seeds=[o.settings.seed for o in outcomes], steps=steps, crossing_factor=fx,
        crossing_note=note, checks=checks,
    )  # fmt: skip


def render_pooled(p: Pooled) -> str:
    lines = [
        f"pooled over seeds {', '.join(map(str, p.seeds))} (rates as fractions of each run's "
        "predicted capacity C)",
        "",
        "| step | requests | TTFT p50 / p95 (ms) | ITL p50 / p95 (ms) | SLO ratio | mean TTFT / "
        "ITL (ms), model on the traces (error) | engine vs the low phases |",
        "|---|---|---|---|---|---|---|",
    ]
    for st in p.steps:
        te, ie = trace_mean_errors(st)
        lines.append(
            f"| {st.factor:.2f} C | {st.n_ok}/{st.n} | {_ms(st.ttft_p50_s)} / "
            f"{_ms(st.ttft_p95_s)} | {_ms(st.itl_p50_s)} / {_ms(st.itl_p95_s)} | "
            f"{st.slo_ratio:.2f} | {_ms(st.ttft_mean_s)} / {_ms(st.itl_mean_s)}, "
            f"{_ms(st.replay_ttft_mean_s)} ({te:+.0%}) / {_ms(st.replay_itl_mean_s)} ({ie:+.0%})"
            f" | {st.engine_speed_change:+.0%} |"
        )
    lines += [
        "",
        f"measured capacity: {_num(p.crossing_factor)} C ({p.crossing_note})",
        "",
        "| quantity | predicted (mean of the runs) | measured, pooled | error | target | result "
        "| each run's own error |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in p.checks:
        unit = 1e3 if c["name"] != "capacity_rps" else 1.0
        lines.append(
            f"| {c['name']}{' (ms)' if unit != 1 else ' (req/s)'} | "
            f"{_num(c['predicted'] * unit)} | "
            f"{_num(c['measured'] * unit if c['measured'] is not None else None)} | "
            f"{c['rel_error']:+.1%} | ±{c['target']:.0%} | {'PASS' if c['ok'] else 'FAIL'} | "
            + ", ".join(f"{e:+.0%}" for e in c["per_run"])
            + " |"
        )
    return "\n".join(lines)
