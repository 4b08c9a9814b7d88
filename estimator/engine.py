"""Step-time model of a continuous-batching engine (vLLM-like, chunked prefill).

One engine *step* runs one forward pass over a batch made of ``prefill_tokens`` new prompt
tokens (chunks of one or more prompts) plus one new token for each of ``decode_seqs`` running
sequences whose summed context (tokens already in the KV cache) is ``context_tokens``.

Formula (seconds; every coefficient >= 0, base units)::

    step_time = overhead_s                                  # per step
              + prefill_s_per_token * prefill_tokens        # prefill matmuls: compute-bound
              + prefill_attn_s_per_pair * prefill_pairs     # prefill attention (quadratic)
              + decode_s_per_seq    * decode_seqs           # per running sequence
              + kv_s_per_token      * context_tokens        # attention reads the KV cache
              + moe_weight_s * (1 - (1 - k/E) ** tokens)    # routed experts the batch touches

* ``overhead_s``: fixed cost of a step: CPU-side scheduling and sampling set-up, kernel
  launches, TP all-reduce latency, and streaming the weights once from HBM (a decode step is
  memory-bound: the whole weight set is read whatever the batch).
* ``prefill_s_per_token``: FLOPs of one prompt token / (peak FLOPs x MFU), plus its share of
  the TP all-reduce bytes.
* ``decode_s_per_seq``: the matmul FLOPs of one decoded token plus per-sequence CPU work
  (sampling, detokenisation) and all-reduce bytes.
* ``kv_s_per_token``: KV bytes of one context token / (HBM bandwidth x efficiency).

Why additive and not ``max(compute, memory)``: it is linear in its four coefficients, so the
online calibrator fits it by (robust, weighted, non-negative) least squares, and the simulator
can advance many identical decode steps in closed form. The price is a conservative bias near
the roofline ridge, where compute and weight streaming overlap in reality: there the sum
exceeds the max by at most 2x. The prior prices the marginal decode compute accordingly
(``Efficiency.decode_mfu``, measured), and calibration on real observations absorbs the rest. The
quadratic attention cost of long prompts is folded into ``prefill_s_per_token`` (taken at a
reference prompt length) in earlier versions; it is now its own term,
``prefill_attn_s_per_pair`` times the (query, key) pairs a step's prefill chunks attend to
(``sum over new positions p of p``: a chunk of ``c`` tokens after ``s`` already prefilled ones
attends ``c s + c (c + 1) / 2`` pairs), so a 32k-token prompt costs what its attention FLOPs
say instead of 32 times a 1k prompt.

Mixture of experts: ``overhead_s`` streams the dense weights and the shared experts only; the
routed experts (``moe_weight_s`` to stream them all once) are read in the share a step's
``tokens = prefill_tokens + decode_seqs`` touch, ``1 - (1 - k/E)^tokens`` for ``k`` of ``E``
experts per token (uniform routing): one decode sequence reads ``k/E`` of them, a large batch
all of them. With expert parallelism each GPU holds ``E / ep`` whole experts instead of a
``1/tp`` slice of each: the same bytes per GPU.

Per-request fixed cost: ``request_overhead_s`` (the engine profile's ``api_ttft_s``: HTTP,
chat template, tokenisation and detokenisation in the API server) adds to every request's
TTFT and end-to-end latency without occupying the engine's steps (the API server is its own
process); the simulator delays each request's entry into the engine by it. Of it,
``api_service_s`` is work the API server does one request at a time (a single process
tokenising, templating, detokenising): a burst of requests queues there before the engine
sees them, which caps the request rate at ``1 / api_service_s`` (a small model on a fast GPU
is API-bound: vLLM 0.19 served a 0.6B model at 93 req/s on an H100, its TTFT in a burst of
500 mostly that queue).

``step_time`` is called by the emulated engine on every step: plain float arithmetic, no numpy.

Step-to-step jitter: real steps scatter around the formula (CPU scheduling, the host's other
work, HTTP chunking between the engine and the client). ``jitter_sigma`` is the log-standard
deviation of a mean-one lognormal factor on each step's duration; it leaves throughput (and so
capacity by rate) unchanged and widens the ITL quantiles the simulator reports
(``estimator.simulate``). The calibrator learns it from the records' own ITL spread.

Speed drift: besides step-to-step jitter, an engine's speed wanders over seconds to minutes
(the host's other tenants, CPU frequency and thermal limits, memory-bandwidth contention,
background work in the serving process). ``drift_sigma`` is the log-standard deviation of a
slowly varying, median-one speed factor on every step (an Ornstein-Uhlenbeck process in the
log, correlation time ``drift_tau_s``). Unlike jitter it does move TTFT and capacity: a slow
spell near capacity builds a queue that a fast one does not drain as quickly. The calibrator
learns it from how the records' mean ITL residuals covary with the time between the records
(``estimator.calibrate``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from estimator.catalog import GpuSpec, gpu_generation
from estimator.engines import DEFAULT_ENGINE, EngineProfile, get_profile
from estimator.memory import kv_bytes_per_token_per_gpu, routed_expert_bytes, weight_bytes
from estimator.modelarch import ModelArch

COEFFICIENT_NAMES: tuple[str, ...] = (
    "overhead_s",
    "prefill_s_per_token",
    "decode_s_per_seq",
    "kv_s_per_token",
)
DEFAULT_CHUNK_TOKENS = 8192
_ACTIVATION_BYTES = 2  # all-reduce payload is bf16 activations
_PCIE_FALLBACK_BPS = 64e9  # PCIe 4.0 x16, both directions, when the catalog gives no link


@dataclass(frozen=True, slots=True, kw_only=True)
class StepModel:
    """Coefficients of the step-time formula in the module docstring (seconds)."""

    overhead_s: float
    prefill_s_per_token: float
    decode_s_per_seq: float
    kv_s_per_token: float
    jitter_sigma: float = 0.0
    """Log-standard deviation of a mean-one lognormal factor on each step (module docstring)."""
    drift_sigma: float = 0.0
    """Log-standard deviation of the slowly varying speed factor (module docstring)."""
    drift_tau_s: float = 60.0
    """Correlation time of that factor, seconds."""
    prefill_attn_s_per_pair: float = 0.0
    """Seconds per (query, key) pair of prefill attention (module docstring)."""
    request_overhead_s: float = 0.0
    """Per-request fixed cost in TTFT outside the engine's steps (module docstring)."""
    api_service_s: float = 0.0
    """Of ``request_overhead_s``, the part the API server spends on one request at a time
    (tokenisation, detokenisation): under a burst, requests queue for it (module docstring)."""
    moe_weight_s: float = 0.0
    """Seconds to stream every routed expert's weights once (0: dense model)."""
    moe_topk: int = 0
    moe_experts: int = 0

    def __post_init__(self) -> None:
        extra = ("prefill_attn_s_per_pair", "request_overhead_s", "moe_weight_s", "api_service_s")
        for name in (*COEFFICIENT_NAMES, "jitter_sigma", "drift_sigma", *extra):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"StepModel.{name} must be finite and >= 0, got {value!r}")
        if not (math.isfinite(self.drift_tau_s) and self.drift_tau_s > 0.0):
            tau = self.drift_tau_s
            raise ValueError(f"StepModel.drift_tau_s must be finite and > 0, got {tau!r}")

    def step_time(
        self, prefill_tokens: int, decode_seqs: int, context_tokens: int, prefill_pairs: int = 0
    ) -> float:
        """Seconds for one engine step (see the module docstring)."""
        t = (
            self.overhead_s
            + self.prefill_s_per_token * prefill_tokens
            + self.decode_s_per_seq * decode_seqs
            + self.kv_s_per_token * context_tokens
            + self.prefill_attn_s_per_pair * prefill_pairs
        )
        if self.moe_weight_s and self.moe_experts:
            t += self.moe_weight_s * self.experts_touched(prefill_tokens + decode_seqs)
        return t

    def experts_touched(self, tokens: int) -> float:
        """Expected share of routed experts that ``tokens`` tokens reach (uniform routing)."""
        if tokens <= 0 or not self.moe_experts:
            return 0.0
        miss = 1.0 - min(self.moe_topk, self.moe_experts) / self.moe_experts
        return 1.0 - miss**tokens

    def ttft_alone(
        self,
        prompt_tokens: int,
        cached_tokens: int = 0,
        *,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> float:
        """Time to first token of one request on an idle engine in the four fitted
        coefficients only (``steps * overhead_s + prefill_s_per_token * uncached``; the
        form the advisor's calibration transfer relies on); :meth:`ttft_idle` adds the
        attention, MoE and per-request terms."""
        uncached = max(1, prompt_tokens - cached_tokens)
        steps = -(-uncached // max(1, chunk_tokens))
        return steps * self.overhead_s + self.prefill_s_per_token * uncached

    def ttft_idle(
        self,
        prompt_tokens: int,
        cached_tokens: int = 0,
        *,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> float:
        """Time to first token of one request on an idle engine (chunked prefill), every term
        included: per chunk ``step_time(c, 0, 0, pairs)``, plus ``request_overhead_s``."""
        uncached = max(1, prompt_tokens - cached_tokens)
        chunk = max(1, chunk_tokens)
        total, done = self.request_overhead_s, max(0, prompt_tokens - uncached)
        while uncached > 0:
            c = min(chunk, uncached)
            total += self.step_time(c, 0, 0, prefill_pairs(done, c))
            done, uncached = done + c, uncached - c
        return total

    def itl_at(self, decode_seqs: int, mean_context: float) -> float:
        """Inter-token latency of a pure-decode step with ``decode_seqs`` running sequences."""
        return self.step_time(0, decode_seqs, int(decode_seqs * mean_context))

    def coefficients(self) -> tuple[float, float, float, float]:
        """``(overhead_s, prefill_s_per_token, decode_s_per_seq, kv_s_per_token)``."""
        return (
            self.overhead_s,
            self.prefill_s_per_token,
            self.decode_s_per_seq,
            self.kv_s_per_token,
        )

    def extras(self) -> dict[str, float | int]:
        """The terms outside the four fitted coefficients (carried through calibration)."""
        return {
            "prefill_attn_s_per_pair": self.prefill_attn_s_per_pair,
            "request_overhead_s": self.request_overhead_s,
            "api_service_s": self.api_service_s,
            "moe_weight_s": self.moe_weight_s,
            "moe_topk": self.moe_topk,
            "moe_experts": self.moe_experts,
        }

    @classmethod
    def from_coefficients(cls, values: Sequence[float]) -> StepModel:
        if len(values) != len(COEFFICIENT_NAMES):
            raise ValueError(f"expected {len(COEFFICIENT_NAMES)} coefficients, got {len(values)}")
        return cls(
            **{n: max(0.0, float(v)) for n, v in zip(COEFFICIENT_NAMES, values, strict=True)}
        )


def prefill_pairs(start: int, new: int) -> int:
    """(query, key) pairs a prefill chunk of ``new`` tokens after ``start`` already prefilled
    ones attends to, causal: ``new * start + new * (new + 1) / 2``."""
    return new * start + new * (new + 1) // 2


@dataclass(frozen=True, slots=True, kw_only=True)
class Efficiency:
    """Assumed fractions of the datasheet peaks an engine reaches (the prior's assumptions).

    The defaults are the generic ones of earlier versions; :func:`efficiency_of` builds one
    from an engine profile (``estimator.engines``) for a GPU generation."""

    prefill_mfu: float = 0.5
    """End-to-end model FLOPs utilisation of the prefill matmuls (0.4-0.6 typical for vLLM; a
    bare bf16 GEMM of prefill shapes reached 0.65-0.79 of peak on an H200)."""
    attention_mfu: float | None = None
    """Utilisation of prefill attention (flash attention); None: ``prefill_mfu``."""
    decode_mfu: float = 1.0
    """Utilisation that prices the *marginal* decode compute of one more sequence. Decode
    matmuls overlap the weight streaming already paid in ``overhead_s``, so in this additive
    form one more sequence costs less than its FLOPs at a real MFU would say. Measured on an
    H200 (bf16, 4096 x 57344 weights): 115 us at batch 1, 137 at 128, 171 at 256, 316 at 512,
    i.e. a marginal cost of FLOPs / (1-2 x peak) up to batch 512; 1.0 keeps the sum
    conservative (at most about +50% at the roofline ridge)."""
    bandwidth: float = 0.75
    """End-to-end fraction of HBM bandwidth when streaming weights and KV (0.7-0.8 typical;
    a bare batch-1 GEMM streamed weights at 0.85 of the H200's 4.8 TB/s)."""
    interconnect: float = 0.7
    """Achieved fraction of the GPU-to-GPU link bandwidth in ring all-reduce."""
    step_overhead_s: float = 0.003
    """CPU-side scheduling, input preparation and kernel launches per step (a few ms)."""
    per_seq_overhead_s: float = 2e-5
    """CPU work per running sequence per step (sampling, detokenisation, output)."""
    allreduce_latency_s: float = 8e-6
    """Fixed latency of one all-reduce (two per layer per step with tensor parallelism)."""
    request_overhead_s: float = 0.0
    """Per-request fixed cost in TTFT (API server), see ``StepModel.request_overhead_s``."""
    api_service_s: float = 0.0
    """Its serialised part, see ``StepModel.api_service_s``."""
    moe_efficiency: float = 1.0
    """Routed experts' kernels relative to dense ones (``EngineProfile.moe_efficiency``)."""
    kv_efficiency: float = 1.0
    """KV reads relative to weight streaming (``EngineProfile.kv_efficiency``)."""


def efficiency_of(
    engine: str | EngineProfile, gpu: GpuSpec, *, enforce_eager: bool = False,
    offline: bool = False,
) -> Efficiency:  # fmt: skip
    """The :class:`Efficiency` an engine profile gives on ``gpu``'s generation. ``offline``:
    no API server in the path (``LLM.generate``, ``trtllm-bench``), so no per-request cost."""
    p = get_profile(engine)
    gen = gpu_generation(gpu)
    api, service = (p.cpu_api_ttft_s, 0.0) if gen == "cpu" else (p.api_ttft_s, p.api_service_s)
    return Efficiency(
        prefill_mfu=p.efficiency_for(p.prefill_mfu, gen),
        attention_mfu=p.efficiency_for(p.attention_mfu, gen),
        bandwidth=p.efficiency_for(p.decode_bandwidth, gen),
        interconnect=p.interconnect,
        step_overhead_s=p.step_overhead_s + (p.eager_step_overhead_s if enforce_eager else 0.0),
        per_seq_overhead_s=p.per_seq_overhead_s,
        allreduce_latency_s=p.allreduce_latency_s,
        request_overhead_s=0.0 if offline else api,
        api_service_s=0.0 if offline else service,
        moe_efficiency=p.moe_efficiency,
        kv_efficiency=p.kv_efficiency,
    )


def roofline_prior(
    arch: ModelArch,
    gpu: GpuSpec,
    *,
    tp: int = 1,
    quant: str = "bf16",
    kv_dtype: str = "auto",
    efficiency: Efficiency | None = None,
    engine: str | EngineProfile = DEFAULT_ENGINE,
    enforce_eager: bool = False,
    offline: bool = False,
    attention_dp: bool = False,
) -> StepModel:
    """A physical first guess of the step model from datasheet numbers (before any data).

    ``efficiency`` None (the default): from the ``engine``'s profile for the GPU's generation
    (:func:`efficiency_of`); an explicit ``Efficiency`` overrides the profile.

    Prefill matmuls are compute-bound: ``2 * active body params / (tp * peak(quant) * mfu)``
    per token; prefill attention ``4 * heads * head_dim * layers`` FLOPs per (query, key) pair
    at the 16-bit peak times ``attention_mfu``. Decode is bandwidth-bound: each GPU reads its
    dense weights once per step (in ``overhead_s``), its routed experts in the share the
    batch touches (``moe_weight_s``), and its share of every context token's KV bytes, at
    ``mem_bandwidth_bps * bandwidth``. With ``tp > 1`` each token costs two ring all-reduces
    per layer of ``hidden * 2`` bytes, ``2 (tp - 1) / tp`` of them on the wire per GPU, at
    half the (bidirectional) ``interconnect_bps`` times the ``interconnect`` efficiency.
    ``attention_dp`` (attention data parallel, MoE deployments): each GPU streams whole
    attention weights and reads the whole KV of its own sequences (``1 / tp`` of the
    context); the all-reduce cost is kept as the price of the experts' all-to-all.
    """
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    eff = efficiency or efficiency_of(engine, gpu, enforce_eager=enforce_eager, offline=offline)
    peak = gpu.peak_flops(quant) * tp
    bandwidth = gpu.mem_bandwidth_bps * eff.bandwidth
    body = arch.active_matmul_params - arch.lm_head_params
    active_experts = (
        arch.num_moe_layers
        * arch.experts_per_token
        * 3
        * arch.hidden_size
        * (arch.moe_intermediate_size)
    )
    moe_eff = eff.moe_efficiency if active_experts else 1.0
    # the active experts' FLOPs priced at the (lower) grouped-GEMM efficiency
    prefill_flops_per_token = 2.0 * (body - active_experts) + 2.0 * active_experts / moe_eff
    attn_flops_per_pair = arch.prefill_attn_flops_per_pair()
    attn_peak = gpu.bf16_flops * tp * (eff.attention_mfu or eff.prefill_mfu)
    decode_flops_per_token = arch.decode_flops_per_token(0)
    allreduce_s_per_token = 0.0
    allreduce_fixed_s = 0.0
    if tp > 1:
        wire_bytes = 2 * arch.num_layers * arch.hidden_size * _ACTIVATION_BYTES * 2 * (tp - 1) / tp
        # interconnect_bps is bidirectional; a ring sends and receives at once on each GPU
        link = (gpu.interconnect_bps or _PCIE_FALLBACK_BPS) / 2 * eff.interconnect
        allreduce_s_per_token = wire_bytes / link
        allreduce_fixed_s = 2 * arch.num_layers * eff.allreduce_latency_s
    experts_s = routed_expert_bytes(arch, quant, tp=tp) / (bandwidth * moe_eff)
    weights = weight_bytes(arch, quant, tp=tp, attention_dp=attention_dp)
    weights_s = (weights - routed_expert_bytes(arch, quant, tp=tp)) / bandwidth
    return StepModel(
        overhead_s=eff.step_overhead_s + weights_s + allreduce_fixed_s,
        prefill_s_per_token=prefill_flops_per_token / (peak * eff.prefill_mfu)
        + allreduce_s_per_token,
        decode_s_per_seq=decode_flops_per_token / (peak * eff.decode_mfu)
        + eff.per_seq_overhead_s
        + allreduce_s_per_token,
        kv_s_per_token=kv_bytes_per_token_per_gpu(arch, kv_dtype, tp=tp, attention_dp=attention_dp)
        / (bandwidth * eff.kv_efficiency),
        prefill_attn_s_per_pair=attn_flops_per_pair / attn_peak,
        request_overhead_s=eff.request_overhead_s,
        api_service_s=min(eff.api_service_s, eff.request_overhead_s),
        moe_weight_s=experts_s,
        moe_topk=arch.experts_per_token if experts_s > 0 else 0,
        moe_experts=arch.num_experts if experts_s > 0 else 0,
    )
