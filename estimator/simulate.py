"""A fast discrete-event simulator of one continuous-batching engine replica (vLLM V1-like).

Per step (times from ``StepModel.step_time(prefill_tokens, decode_seqs, context_tokens)``):

1. arrivals up to the step start join the FCFS waiting queue (Poisson, or gamma-renewal with
   ``Workload.arrival_cv``);
2. every decoding sequence gets one token; if the KV blocks its next token needs are not
   free, the most recently admitted running sequence is preempted (vLLM recompute: its blocks
   are freed, it returns to the head of the queue and later re-prefills prompt + output so far);
3. partially prefilled sequences get chunks from the token budget
   ``max_num_batched_tokens - decode_seqs``; then waiting requests are admitted FCFS while
   ``running < max_num_seqs``, budget remains and the KV blocks of the whole prompt are free;
4. a sequence whose prefill completes emits its first token at the step's end (TTFT); each
   decoding sequence emits one token at the step's end (ITL = step duration).

Step jitter (``StepModel.jitter_sigma``): decode steps run on the formula's mean step
times, and the ITL quantiles are those of each step's duration times a mean-one lognormal
factor (the token-weighted step durations, binned on a log grid, convolved with the factor's
density). A step that carries prefill is drawn: its duration is multiplied by such a factor
(seeded, so common across rates). A request's TTFT is made of its own one or few prefill
steps, and their noise does not average out the way a queue's many steps do: at low load the
p95 TTFT is the p95 of that factor on the prefill. The mean is the formula, so throughput
keeps it. (The ITL quantiles take those steps' mean durations, not the drawn ones, so the
jitter is not counted twice.)

Speed drift (``StepModel.drift_sigma``, ``drift_tau_s``): every step's duration is multiplied
by a factor ``exp(x(t))`` where ``x`` is a stationary Gaussian AR(1) path (the discretised
Ornstein-Uhlenbeck process), constant over blocks of ``tau / 8`` seconds of simulated time. Its
median is one, as the calibrator's robust fit centres the records (sampled uniformly in time)
on the typical speed; so a wandering engine does a little more work per second than a steady
one at the median speed (fast spells hold more steps), yet its tails are worse: a slow spell
near capacity builds a queue. The path depends on the seed and the time only, not on the
rate, so the common random numbers of ``Workload.draw`` still make results smooth in the
rate. Runs of identical decode steps are cut at block edges. The drift makes each simulation
cost about 1.5x as much (more steps are simulated one by one).

Prefix caching: a fraction ``prefix_cache_hit_ratio`` of each prompt skips prefill (its KV
blocks are still counted, a conservative simplification).

Speed: decoding sequences are kept as aggregates (count, summed context, block-boundary phase
counts, a finish heap keyed by a global decode-step counter), so a step costs O(1) plus the
prefill work. Runs of identical pure-decode steps (no prefill, nothing admittable) up to the
next finish, arrival or possible KV shortage are advanced in closed form, using that step time
is affine in ``context_tokens`` (ITL quantiles then use 8 points per run). A test checks every
request's times against a naive per-sequence simulator. Measured CPU time for 2,000 requests
(lognormal 800-token prompts, 200-token outputs; Python 3.11 on a shared 2-core machine):
14-25 ms from nearly idle to overloaded.

A request whose prompt can never fit in the KV cache is ended at admission (``n_truncated``)
and counts as an infinite TTFT. The first ``warmup_fraction`` of requests (an empty engine
fills up), and decode steps before the first counted arrival, are left out of the latency
statistics. ``stable`` is False when the waiting queue
keeps growing: at the last arrival more than ``max(10, 5%)`` of the requests still wait for
admission and the last quarter waited over 1.5x as long as the second quarter.

Per-request overhead (``StepModel.request_overhead_s``, ``api_service_s``): a request enters
the engine after the API server's work; its serialised part is a FIFO stage (a burst queues
there). TTFT and e2e count from the client's send. ``EngineLimits.reserve_output``: admission
reserves the blocks of the prompt and the whole output (TensorRT-LLM's guaranteed-no-evict);
no decode step then needs a new block and nothing is preempted. Closed-loop clients (arrival
times set when a request ends): ``estimator.loads``.

``replay`` runs the same engine on a given request trace (arrival times and lengths) instead
of draws from a ``Workload``, so a measured run can be compared with the model request by
request (bench/estimator_accuracy.py).

This module runs past 400 lines: ``_Sim`` is one state machine whose invariants (free
blocks, aggregates, lazy heap entries) are easiest to check kept together.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from estimator.engine import StepModel, prefill_pairs

_ITL_POINTS_PER_RUN = 8
_DRIFT_BLOCKS_PER_TAU = 8
_MIN_DRIFT = 1e-3  # below: no drift (the factor is 1)
_MIN_JITTER = 1e-3  # below: the exact quantiles of the mean step durations


class _LengthSampler(Protocol):
    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineLimits:
    """The engine configuration that bounds batching (vLLM names)."""

    max_num_seqs: int
    kv_capacity_tokens: int
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    prefix_cache_hit_ratio: float = 0.0
    reserve_output: bool = False
    """Admit a request only when the KV blocks of its prompt *and* its whole output fit, and
    keep them reserved (TensorRT-LLM's ``GUARANTEED_NO_EVICT``): no preemption ever."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.block_size < 1:
            raise ValueError("EngineLimits needs max_num_seqs >= 1 and block_size >= 1")
        if self.kv_capacity_tokens < self.block_size:
            raise ValueError("EngineLimits.kv_capacity_tokens must hold at least one block")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("EngineLimits needs max_num_batched_tokens >= max_num_seqs")
        if not 0.0 <= self.prefix_cache_hit_ratio < 1.0:
            raise ValueError("EngineLimits.prefix_cache_hit_ratio must be in [0, 1)")

    @property
    def num_blocks(self) -> int:
        return self.kv_capacity_tokens // self.block_size


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Workload:
    """The request shape: (prompt, output) length pairs drawn jointly, and burstiness.

    Requests are drawn with replacement from the pairs; inter-arrival gaps have mean
    ``1 / rate`` and coefficient of variation ``arrival_cv`` (1.0: Poisson).
    """

    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    arrival_cv: float = 1.0

    def __post_init__(self) -> None:
        p, o = np.asarray(self.prompt_tokens), np.asarray(self.output_tokens)
        if p.shape != o.shape or p.ndim != 1 or p.size == 0:
            raise ValueError("Workload needs equal-length, non-empty 1-D prompt and output arrays")
        if self.arrival_cv <= 0:
            raise ValueError("Workload.arrival_cv must be > 0")
        object.__setattr__(self, "prompt_tokens", np.maximum(1, p.astype(np.int64)))
        object.__setattr__(self, "output_tokens", np.maximum(1, o.astype(np.int64)))

    @classmethod
    def fixed(cls, prompt: int, output: int, *, arrival_cv: float = 1.0) -> Workload:
        return cls(prompt_tokens=np.array([prompt]), output_tokens=np.array([output]),
                   arrival_cv=arrival_cv)  # fmt: skip

    @classmethod
    def from_distributions(
        cls, prompt: _LengthSampler, output: _LengthSampler, *, n: int = 4096, seed: int = 0,
        arrival_cv: float = 1.0,
    ) -> Workload:  # fmt: skip
        """Independent draws from two length distributions (e.g. ``traffic.LengthDist``)."""
        rng = np.random.default_rng(seed)
        return cls(prompt_tokens=prompt.sample(n, rng), output_tokens=output.sample(n, rng),
                   arrival_cv=arrival_cv)  # fmt: skip

    @property
    def mean_prompt(self) -> float:
        return float(self.prompt_tokens.mean())

    @property
    def mean_output(self) -> float:
        return float(self.output_tokens.mean())

    def draw(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``n`` (prompt, output) pairs and unit-mean inter-arrival gaps, reproducible by seed.

        The same seed gives the same draws at every rate (common random numbers), so results
        vary smoothly with the rate and bisection on it is well behaved.
        """
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, self.prompt_tokens.size, size=n)
        cv2 = self.arrival_cv**2
        gaps = rng.exponential(1.0, n) if cv2 == 1.0 else rng.gamma(1.0 / cv2, cv2, n)
        return self.prompt_tokens[idx], self.output_tokens[idx], gaps


@dataclass(frozen=True, slots=True, kw_only=True)
class SimResult:
    """Outcome of one simulation at one offered rate. Seconds, requests/s, tokens/s."""

    rate_rps: float
    n_requests: int
    n_finished: int
    n_truncated: int  # could never fit in the KV cache; ended early
    quantile: float  # the extra quantile reported in ttft_q_s / itl_q_s
    ttft_p50_s: float
    ttft_p95_s: float
    ttft_p99_s: float
    ttft_q_s: float
    itl_p50_s: float
    itl_p95_s: float
    itl_q_s: float
    e2e_p50_s: float
    e2e_p95_s: float
    queue_p95_s: float  # arrival to admission
    throughput_rps: float
    input_tokens_per_s: float
    output_tokens_per_s: float
    output_tokens: int
    mean_running: float
    peak_running: int
    peak_kv_usage: float  # ratio 0..1 of KV blocks in use, at its peak
    preemptions: int
    steps: int
    duration_s: float
    stable: bool

    @property
    def kv_bound(self) -> bool:
        """Admission was limited by KV blocks rather than ``max_num_seqs`` (or it preempted)."""
        return self.preemptions > 0 or self.peak_kv_usage >= 0.95


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SimTrace:
    """Per-request times of one simulation (arrival order), for calibration tests and plots."""

    arrival_s: np.ndarray
    admit_s: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray  # tokens actually produced
    inflight_at_arrival: np.ndarray  # requests arrived and not finished, this one excluded


def simulate(
    step: StepModel,
    limits: EngineLimits,
    workload: Workload,
    rate: float,
    *,
    n_requests: int = 2000,
    seed: int = 0,
    quantile: float = 0.95,
    warmup_fraction: float = 0.1,
) -> SimResult:
    """Simulate ``n_requests`` arriving at ``rate`` req/s on one replica; see the module doc."""
    return simulate_trace(step, limits, workload, rate, n_requests=n_requests, seed=seed,
                          quantile=quantile, warmup_fraction=warmup_fraction)[0]  # fmt: skip


def simulate_trace(
    step: StepModel,
    limits: EngineLimits,
    workload: Workload,
    rate: float,
    *,
    n_requests: int = 2000,
    seed: int = 0,
    quantile: float = 0.95,
    warmup_fraction: float = 0.1,
) -> tuple[SimResult, SimTrace]:
    """``simulate`` plus the per-request trace."""
    if rate <= 0 or n_requests < 1:
        raise ValueError("simulate needs rate > 0 and n_requests >= 1")
    prompts, outputs, gaps = workload.draw(n_requests, seed)
    arrivals = np.cumsum(gaps) / rate
    sim = _Sim(step, limits, arrivals.tolist(), prompts.tolist(), outputs.tolist(), seed=seed)
    sim.run()
    trace = sim.trace()
    return _summarise(sim, trace, rate, quantile, warmup_fraction), trace


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Replay:
    """A simulation of a given request trace (``replay``): per-request times and the decode
    steps, so that latencies can be read over any window, as a measurement would."""

    trace: SimTrace
    decode_runs: list[tuple[float, float, float, int, int]]
    """(start, first step's duration, increment per step, steps, decoding sequences)."""
    jitter_sigma: float = 0.0

    def itl_quantiles(
        self, qs: Sequence[float], since: float = -math.inf, until: float = math.inf
    ) -> list[float]:
        """Token-weighted quantiles of the decode step durations (every token's gap) of the
        steps that began in ``[since, until)``."""
        return _itl_quantiles(self.decode_runs, since, qs, until, self.jitter_sigma)


def replay(
    step: StepModel,
    limits: EngineLimits,
    arrival_s: Sequence[float],
    prompt_tokens: Sequence[int],
    output_tokens: Sequence[int],
    *,
    seed: int = 0,
) -> Replay:
    """Simulate exactly these requests (arrival times in seconds, ascending) instead of draws
    from a ``Workload``: to compare the model with a measured run request by request, without
    the sampling noise of fresh arrivals (``seed`` draws only the speed drift's path, when the
    step model has one)."""
    arr = [float(a) for a in arrival_s]
    if any(b < a for a, b in itertools.pairwise(arr)):
        raise ValueError("replay needs ascending arrival times")
    sim = _Sim(step, limits, arr, [max(1, int(p)) for p in prompt_tokens],
               [max(1, int(o)) for o in output_tokens], seed=seed)  # fmt: skip
    sim.run()
    return Replay(trace=sim.trace(), decode_runs=list(sim.runs), jitter_sigma=step.jitter_sigma)


class _Drift:
    """The speed drift's factor path (module docstring), drawn lazily block by block."""

    __slots__ = ("_factors", "_phi", "_rng", "_sigma", "_x", "block_s")

    def __init__(self, sigma: float, tau_s: float, seed: int) -> None:
        self._sigma = sigma
        self.block_s = tau_s / _DRIFT_BLOCKS_PER_TAU
        self._phi = math.exp(-1.0 / _DRIFT_BLOCKS_PER_TAU)
        self._rng = np.random.default_rng([seed, 0xD41F7])
        self._x = float(self._rng.normal(0.0, sigma))
        self._factors: list[float] = []

    def factor(self, t: float) -> float:
        """The factor of the block holding time ``t`` (seconds, >= 0 in practice)."""
        k = max(0, int(t // self.block_s))
        f = self._factors
        if k >= len(f):
            n = k + 1 - len(f) + 64
            eps = self._rng.normal(0.0, 1.0, n)
            s, phi, x = self._sigma, self._phi, self._x
            c = s * math.sqrt(1.0 - phi * phi)
            for e in eps.tolist():
                f.append(math.exp(x))
                x = phi * x + c * e
            self._x = x
        return f[k]

    def block_end(self, t: float) -> float:
        return (max(0, int(t // self.block_s)) + 1) * self.block_s


class _Sim:
    """Mutable simulation state. Per-request fields are Python lists (fast scalar access)."""

    def __init__(
        self,
        step: StepModel,
        limits: EngineLimits,
        arrivals: list[float],
        prompts: list[int],
        outputs: list[int],
        *,
        seed: int = 0,
        closed_loop: bool = False,
    ) -> None:
        n = len(arrivals)
        # the engine sees a request after the API server's per-request work: a latency
        # (request_overhead_s) of which api_service_s is serialised (one request at a time)
        self.api, self.api_service = step.request_overhead_s, step.api_service_s
        self.api_free = -math.inf
        self.client = list(arrivals)  # when each client sent its request
        arrivals = [self._through_api(a) for a in arrivals]
        self.closed = closed_loop
        self.assigned = sum(1 for a in arrivals if a < math.inf)
        self.reserve = limits.reserve_output
        self.jitter = step.jitter_sigma if step.jitter_sigma >= _MIN_JITTER else 0.0
        self._seed = seed
        self._jrng: np.random.Generator | None = None  # made on the first prefill step
        self._jitters: list[float] = []
        self.drift = (
            _Drift(step.drift_sigma, step.drift_tau_s, seed)
            if step.drift_sigma >= _MIN_DRIFT
            else None
        )
        self.step, self.lim = step, limits
        self.bs, self.total_blocks = limits.block_size, limits.num_blocks
        self.arr, self.prompt, self.out = arrivals, prompts, outputs
        self.cur_prompt = list(prompts)  # tokens to (re)compute before the next token
        self.done_pre = [0] * n
        self.emitted = [0] * n
        self.blocks = [0] * n  # reserved while prefilling
        self.kv0, self.g0, self.e0, self.phase, self.ver = ([0] * n for _ in range(5))
        nan = math.nan
        self.admit_t, self.first_t, self.finish_t = [nan] * n, [nan] * n, [nan] * n
        self.state = [0] * n  # 0 not arrived, 1 waiting, 2 prefilling, 3 decoding, 4 done
        self.next_arrival = 0
        self.waiting: deque[int] = deque()
        self.prefilling: list[int] = []
        self.order: list[int] = []  # admission order; stale entries skipped lazily
        self.heap: list[tuple[int, int, int]] = []  # (finish G, version, id)
        self.phase_count = [0] * self.bs
        self.n_dec = 0  # decoding sequences
        self.ctx_base = 0  # sum(kv0 - g0) over decoding; context = ctx_base + n_dec * G
        self.G = 0  # global decode-step counter
        self.free = self.total_blocks
        self.t = 0.0
        self.steps = self.preemptions = self.truncated = self.tokens_out = 0
        self.running_area = 0.0
        self.peak_running = 0
        self.min_free = self.total_blocks
        # decode runs for ITL statistics: (start time, first step, step increment, steps, seqs)
        self.runs: list[tuple[float, float, float, int, int]] = []
        self.waiting_at_last_arrival = 0
        self.hit = limits.prefix_cache_hit_ratio

    # ---- main loop ----------------------------------------------------------------------
    def run(self) -> None:
        n = len(self.arr)
        while True:
            self._arrivals()
            running = self.n_dec + len(self.prefilling)
            if running == 0 and not self.waiting:
                if self.next_arrival >= n:
                    return
                self.t = self.arr[self.next_arrival]
                continue
            if not self.prefilling and self.n_dec and not self._admittable():
                k = self._run_length()
                if k > 2:
                    self._jump(k)
                    continue
            self._one_step()

    def _arrivals(self) -> None:
        arr, n, i = self.arr, len(self.arr), self.next_arrival
        while i < n and arr[i] <= self.t:
            self.state[i] = 1
            self.waiting.append(i)
            i += 1
            if i == n:
                self.waiting_at_last_arrival = len(self.waiting)
        self.next_arrival = i

    def _admittable(self) -> bool:
        if not self.waiting or self.n_dec + len(self.prefilling) >= self.lim.max_num_seqs:
            return False
        nb = self._blocks_for(self.waiting[0])
        return nb <= self.free or nb > self.total_blocks  # the latter: truncate it now

    def _blocks_for(self, i: int) -> int:
        if self.reserve:
            return -(-(self.cur_prompt[i] + self.out[i] - self.emitted[i]) // self.bs)
        return -(-self.cur_prompt[i] // self.bs)

    def _uncached(self, i: int) -> int:
        return max(1, self.cur_prompt[i] - int(self.prompt[i] * self.hit))

    def _one_step(self) -> None:
        bs = self.bs
        need = self.phase_count[(-self.G) % bs] if self.n_dec and not self.reserve else 0
        while need > self.free:
            self._preempt()
            need = self.phase_count[(-self.G) % bs] if self.n_dec else 0
        budget = self.lim.max_num_batched_tokens - self.n_dec
        chunks, budget = self._prefill_chunks(budget)
        chunks += self._admit(budget)
        prefill = sum(c for _, c in chunks)
        pairs = 0
        if self.step.prefill_attn_s_per_pair:
            for i, c in chunks:
                pairs += prefill_pairs(self.prompt[i] - self._uncached(i) + self.done_pre[i], c)
        d = self.n_dec
        dt = self.step.step_time(prefill, d, self.ctx_base + d * self.G, pairs)
        if self.drift is not None:
            dt *= self.drift.factor(self.t)
        took = dt * self._jitter_factor() if prefill and self.jitter else dt
        self._account(took, d + len(self.prefilling))
        start = self.t
        self.t += took
        self.steps += 1
        if d:
            self.free -= need
            self.runs.append((start, dt, 0.0, 1, d))
            self.tokens_out += d
            self.G += 1
            self._finish_decoders()
        for i, c in chunks:
            self.done_pre[i] += c
            if self.done_pre[i] >= self._uncached(i):
                self._prefill_done(i)

    def _jitter_factor(self) -> float:
        """The next mean-one lognormal step factor (drawn in batches)."""
        if not self._jitters:
            if self._jrng is None:
                self._jrng = np.random.default_rng([self._seed, 0x717])
            sig = self.jitter
            z = self._jrng.normal(-0.5 * sig * sig, sig, 256)
            self._jitters = np.exp(z).tolist()[::-1]
        return self._jitters.pop()

    def _prefill_chunks(self, budget: int) -> tuple[list[tuple[int, int]], int]:
        chunks: list[tuple[int, int]] = []
        for i in self.prefilling:
            if budget <= 0:
                break
            c = min(self._uncached(i) - self.done_pre[i], budget)
            chunks.append((i, c))
            budget -= c
        return chunks, budget

    def _admit(self, budget: int) -> list[tuple[int, int]]:
        chunks: list[tuple[int, int]] = []
        max_seqs = self.lim.max_num_seqs
        while self.waiting and budget > 0 and self.n_dec + len(self.prefilling) < max_seqs:
            i = self.waiting[0]
            nb = self._blocks_for(i)
            if nb > self.total_blocks:  # can never fit: end it (like exceeding max_model_len)
                self.waiting.popleft()
                self._finish(i)
                self.truncated += 1
                continue
            if nb > self.free:
                break
            self.waiting.popleft()
            self.free -= nb
            self.blocks[i] = nb
            self.done_pre[i] = 0
            self.state[i] = 2
            if math.isnan(self.admit_t[i]):
                self.admit_t[i] = self.t
            self.prefilling.append(i)
            self.order.append(i)
            c = min(self._uncached(i), budget)
            chunks.append((i, c))
            budget -= c
        return chunks

    def _prefill_done(self, i: int) -> None:
        self.prefilling.remove(i)
        self.emitted[i] += 1
        self.tokens_out += 1
        if math.isnan(self.first_t[i]):
            self.first_t[i] = self.t
        remaining = self.out[i] - self.emitted[i]
        if remaining <= 0:
            self.free += self.blocks[i]
            self._finish(i)
            return
        kv0, g0 = self.cur_prompt[i], self.G
        self.kv0[i], self.g0[i], self.e0[i] = kv0, g0, self.emitted[i]
        ph = (kv0 - g0) % self.bs
        self.phase[i] = ph
        self.phase_count[ph] += 1
        self.n_dec += 1
        self.ctx_base += kv0 - g0
        self.state[i] = 3
        heapq.heappush(self.heap, (g0 + remaining, self.ver[i], i))

    def _finish_decoders(self) -> None:
        heap, G = self.heap, self.G
        while heap and heap[0][0] <= G:
            _, ver, i = heapq.heappop(heap)
            if ver != self.ver[i] or self.state[i] != 3:
                continue
            self._leave_decode(i)
            self.emitted[i] = self.out[i]
            self._finish(i)

    def _leave_decode(self, i: int) -> None:
        """Remove decoding sequence ``i`` from the aggregates and free its blocks."""
        kv = self.kv0[i] + self.G - self.g0[i]
        self.free += self.blocks[i] if self.reserve else -(-kv // self.bs)
        self.phase_count[self.phase[i]] -= 1
        self.n_dec -= 1
        self.ctx_base -= self.kv0[i] - self.g0[i]
        self.ver[i] += 1

    def _finish(self, i: int) -> None:
        self.state[i] = 4
        self.finish_t[i] = self.t
        if self.closed and self.assigned < len(self.arr):
            # the client whose request ended sends its next one at once (closed loop)
            self.client[self.assigned] = self.t
            self.arr[self.assigned] = self._through_api(self.t)
            self.assigned += 1

    def _through_api(self, t: float) -> float:
        """When a request sent at ``t`` reaches the engine: the API server serves requests
        one at a time for ``api_service_s`` each, within ``request_overhead_s`` of latency."""
        if t == math.inf or not (self.api or self.api_service):
            return t + self.api
        start = max(t, self.api_free)
        self.api_free = start + self.api_service
        return start + max(self.api, self.api_service)

    def _preempt(self) -> None:
        """vLLM recompute preemption of the most recently admitted running sequence."""
        while True:
            i = self.order.pop()
            if self.state[i] in (2, 3):
                break
        if self.state[i] == 3:
            self.emitted[i] = self.e0[i] + self.G - self.g0[i]
            self._leave_decode(i)
        else:
            self.prefilling.remove(i)
            self.free += self.blocks[i]
        self.cur_prompt[i] = self.prompt[i] + self.emitted[i]
        self.done_pre[i] = 0
        self.state[i] = 1
        self.waiting.appendleft(i)
        self.preemptions += 1

    def _account(self, dt: float, running: int) -> None:
        self.running_area += running * dt
        self.peak_running = max(self.peak_running, running)
        self.min_free = min(self.min_free, self.free)

    # ---- closed-form runs of identical decode steps -------------------------------------
    def _run_length(self) -> int:
        """Steps that can be advanced at once: until the next finish, arrival or KV risk."""
        heap = self.heap
        while heap and (heap[0][1] != self.ver[heap[0][2]] or self.state[heap[0][2]] != 3):
            heapq.heappop(heap)
        k = heap[0][0] - self.G
        if not self.reserve:
            k = min(k, (self.free // self.n_dec) * self.bs)
        gap = math.inf
        # an arrival changes the batch only if it can be admitted at once
        if (
            self.next_arrival < len(self.arr)
            and not self.waiting
            and (self.n_dec < self.lim.max_num_seqs)
        ):
            gap = self.arr[self.next_arrival] - self.t
        if self.drift is not None:  # the factor is constant within a block only
            gap = min(gap, self.drift.block_end(self.t) - self.t)
        if gap < math.inf:
            a, b = self._decode_ab()
            k = min(k, _steps_to_reach(a, b, gap))
        return k

    def _decode_ab(self) -> tuple[float, float]:
        d, base = self.n_dec, self.ctx_base
        a = self.step.step_time(0, d, base + d * self.G)
        b = self.step.step_time(0, d, base + d * (self.G + 1)) - a
        if self.drift is not None:
            f = self.drift.factor(self.t)
            return a * f, b * f
        return a, b

    def _jump(self, k: int) -> None:
        a, b = self._decode_ab()
        d, bs, G = self.n_dec, self.bs, self.G
        total = k * a + b * k * (k - 1) / 2
        alloc = 0
        for r, cnt in enumerate(self.phase_count):
            if cnt and not self.reserve:
                j0 = (-(r + G)) % bs
                if j0 < k:
                    alloc += cnt * (1 + (k - 1 - j0) // bs)
        self.free -= alloc
        self._account(total, d)
        self.runs.append((self.t, a, b, k, d))
        self.t += total
        self.steps += k
        self.tokens_out += d * k
        self.G += k
        self._finish_decoders()

    def trace(self) -> SimTrace:
        arrival = np.asarray(self.client)  # when the client sent it
        finish = np.asarray(self.finish_t)
        done_sorted = np.sort(finish)
        inflight = np.arange(arrival.size) - np.searchsorted(done_sorted, arrival, side="right")
        return SimTrace(
            arrival_s=arrival, admit_s=np.asarray(self.admit_t),
            first_token_s=np.asarray(self.first_t), finish_s=finish,
            prompt_tokens=np.asarray(self.prompt, dtype=np.int64),
            output_tokens=np.asarray(self.emitted, dtype=np.int64),
            inflight_at_arrival=np.maximum(inflight, 0),
        )  # fmt: skip


def _steps_to_reach(a: float, b: float, gap: float) -> int:
    """Smallest k >= 1 with ``k a + b k (k - 1) / 2 >= gap`` (step times a, a+b, a+2b, ...)."""
    if gap <= 0 or a <= 0:
        return 1
    if b <= 0:
        k = math.ceil(gap / a)
    else:
        half = b / 2
        k = math.ceil((-(a - half) + math.sqrt((a - half) ** 2 + 4 * half * gap)) / (2 * half))
    while k > 1 and (k - 1) * a + b * (k - 1) * (k - 2) / 2 >= gap:
        k -= 1
    return max(1, k)


def _itl_quantiles(
    runs: list[tuple[float, float, float, int, int]],
    since: float,
    qs: Sequence[float],
    until: float = math.inf,
    jitter_sigma: float = 0.0,
) -> list[float]:
    """Token-weighted quantiles of the step durations of decode runs that began at ``since``
    or later (and before ``until``); a run of ``k`` steps ``a, a + b, ...`` is represented by
    up to 8 points. With ``jitter_sigma`` > 0, of those durations times the jitter factor."""
    if not runs:
        return [math.nan] * len(qs)
    r = np.asarray(runs)
    inside = (r[:, 0] >= since) & (r[:, 0] < until)
    if inside.any():
        r = r[inside]
    elif math.isfinite(until):
        return [math.nan] * len(qs)
    a, b, k, d = r[:, 1:2], r[:, 2:3], r[:, 3:4], r[:, 4:5]
    m = np.minimum(k, _ITL_POINTS_PER_RUN)
    j = np.arange(_ITL_POINTS_PER_RUN)[None, :]
    use = j < m
    dur = (a + b * ((j + 0.5) * k / m - 0.5))[use]
    weight = np.broadcast_to(d * k / m, use.shape)[use]
    if weight.sum() <= 0:
        return [math.nan] * len(qs)
    if jitter_sigma >= _MIN_JITTER:
        return _jittered_quantiles(dur, weight, qs, jitter_sigma)
    order = np.argsort(dur)
    cw = np.cumsum(weight[order])
    at = np.minimum(np.searchsorted(cw, np.asarray(qs) * cw[-1]), dur.size - 1)
    return [float(x) for x in dur[order][at]]


def _jittered_quantiles(
    dur: np.ndarray, weight: np.ndarray, qs: Sequence[float], sigma: float
) -> list[float]:
    """Quantiles of the mixture of ``dur_i * exp(sigma Z - sigma^2 / 2)`` weighted by
    ``weight_i``: a histogram of ``log dur`` (bins of sigma/20, at most 4,000) convolved with
    the normal density of ``sigma Z``; each quantile is the centre of the bin it falls in."""
    logd = np.log(np.maximum(dur, 1e-12)) - 0.5 * sigma * sigma
    span = 5.0 * sigma
    lo, hi = float(logd.min()) - span, float(logd.max()) + span
    h = max(sigma / 20.0, (hi - lo) / 4000.0)
    nb = int((hi - lo) / h) + 2
    hist = np.bincount(np.rint((logd - lo) / h).astype(np.intp), weights=weight, minlength=nb)
    m = int(span / h)
    z = np.arange(-m, m + 1) * h
    dens = np.convolve(hist, np.exp(-0.5 * np.square(z / sigma)), mode="same")
    cdf = np.cumsum(dens)
    at = np.minimum(np.searchsorted(cdf, np.asarray(qs) * cdf[-1]), cdf.size - 1)
    return [float(x) for x in np.exp(lo + at * h)]


def _summarise(sim: _Sim, tr: SimTrace, rate: float, q: float, warmup: float) -> SimResult:
    n = tr.arrival_s.size
    w0 = min(int(n * warmup), n - 1)
    ok = ~np.isnan(tr.first_token_s[w0:])
    # a request that never fits in the KV cache never gets a first token: infinite TTFT
    ttft = np.where(ok, tr.first_token_s[w0:] - tr.arrival_s[w0:], math.inf)
    e2e = (tr.finish_s[w0:] - tr.arrival_s[w0:])[ok]
    queue = (tr.admit_s[w0:] - tr.arrival_s[w0:])[ok]

    def pct(x: np.ndarray, p: float) -> float:
        return float(np.quantile(x, p, method="inverted_cdf")) if x.size else math.nan

    itl = _itl_quantiles(
        sim.runs, float(tr.arrival_s[w0]), (0.5, 0.95, q), jitter_sigma=sim.step.jitter_sigma
    )
    finished = ~np.isnan(tr.finish_s)
    span = max(float(np.nanmax(tr.finish_s)) - float(tr.arrival_s[0]), 1e-12)
    prompt_in = float(tr.prompt_tokens[finished].sum())
    return SimResult(
        rate_rps=rate, n_requests=n, n_finished=int(finished.sum()), n_truncated=sim.truncated,
        quantile=q, ttft_p50_s=pct(ttft, 0.5), ttft_p95_s=pct(ttft, 0.95),
        ttft_p99_s=pct(ttft, 0.99), ttft_q_s=pct(ttft, q),
        itl_p50_s=itl[0], itl_p95_s=itl[1], itl_q_s=itl[2],
        e2e_p50_s=pct(e2e, 0.5), e2e_p95_s=pct(e2e, 0.95), queue_p95_s=pct(queue, 0.95),
        throughput_rps=int(finished.sum()) / span, input_tokens_per_s=prompt_in / span,
        output_tokens_per_s=sim.tokens_out / span, output_tokens=sim.tokens_out,
        mean_running=sim.running_area / max(sim.t - float(tr.arrival_s[0]), 1e-12),
        peak_running=sim.peak_running,
        peak_kv_usage=1.0 - sim.min_free / sim.total_blocks,
        preemptions=sim.preemptions, steps=sim.steps, duration_s=span,
        stable=_stable(sim, tr),
    )  # fmt: skip


def _stable(sim: _Sim, tr: SimTrace) -> bool:
    n = tr.arrival_s.size
    if sim.waiting_at_last_arrival <= max(10, 0.05 * n):
        return True
    wait = tr.admit_s - tr.arrival_s
    q2, q4 = wait[n // 4 : n // 2], wait[3 * n // 4 :]
    q2, q4 = q2[np.isfinite(q2)], q4[np.isfinite(q4)]
    if q4.size == 0:
        return True
    return not float(q4.mean()) > 1.5 * (float(q2.mean()) if q2.size else 0.0)
