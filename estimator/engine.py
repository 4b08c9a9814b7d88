"""Step-time model of a continuous-batching engine (vLLM-like, chunked prefill).

One engine *step* runs one forward pass over a batch made of ``prefill_tokens`` new prompt
tokens (chunks of one or more prompts) plus one new token for each of ``decode_seqs`` running
sequences whose summed context (tokens already in the KV cache) is ``context_tokens``.

Formula (seconds; every coefficient >= 0, base units)::

    step_time = overhead_s                                  # per step
              + prefill_s_per_token * prefill_tokens        # prefill: compute-bound
              + decode_s_per_seq    * decode_seqs           # per running sequence
              + kv_s_per_token      * context_tokens        # attention reads the KV cache

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
reference prompt length).

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

from estimator.catalog import GpuSpec
from estimator.memory import kv_bytes_per_token_per_gpu, weight_bytes
from estimator.modelarch import ModelArch

COEFFICIENT_NAMES: tuple[str, ...] = (
    "overhead_s",
    "prefill_s_per_token",
    "decode_s_per_seq",
    "kv_s_per_token",
)
DEFAULT_CHUNK_TOKENS = 8192
_ACTIVATION_BYTES = 2  # all-reduce payload is bf16 activations
_PREFILL_REFERENCE_TOKENS = 1024
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

    def __post_init__(self) -> None:
        for name in (*COEFFICIENT_NAMES, "jitter_sigma", "drift_sigma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"StepModel.{name} must be finite and >= 0, got {value!r}")
        if not (math.isfinite(self.drift_tau_s) and self.drift_tau_s > 0.0):
            tau = self.drift_tau_s
            raise ValueError(f"StepModel.drift_tau_s must be finite and > 0, got {tau!r}")

    def step_time(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        """Seconds for one engine step (see the module docstring)."""
        return (
            self.overhead_s
            + self.prefill_s_per_token * prefill_tokens
            + self.decode_s_per_seq * decode_seqs
            + self.kv_s_per_token * context_tokens
        )

    def ttft_alone(
        self,
        prompt_tokens: int,
        cached_tokens: int = 0,
        *,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> float:
        """Time to first token of one request on an idle engine (chunked prefill)."""
        uncached = max(1, prompt_tokens - cached_tokens)
        steps = -(-uncached // max(1, chunk_tokens))
        return steps * self.overhead_s + self.prefill_s_per_token * uncached

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

    @classmethod
    def from_coefficients(cls, values: Sequence[float]) -> StepModel:
        if len(values) != len(COEFFICIENT_NAMES):
            raise ValueError(f"expected {len(COEFFICIENT_NAMES)} coefficients, got {len(values)}")
        return cls(
            **{n: max(0.0, float(v)) for n, v in zip(COEFFICIENT_NAMES, values, strict=True)}
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Efficiency:
    """Assumed fractions of the datasheet peaks an engine reaches (the prior's assumptions)."""

    prefill_mfu: float = 0.5
    """End-to-end model FLOPs utilisation of prefill (0.4-0.6 typical for vLLM; a bare bf16
    GEMM of prefill shapes reached 0.65-0.79 of peak on an H200)."""
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


def roofline_prior(
    arch: ModelArch,
    gpu: GpuSpec,
    *,
    tp: int = 1,
    quant: str = "bf16",
    kv_dtype: str = "auto",
    efficiency: Efficiency = Efficiency(),
) -> StepModel:
    """A physical first guess of the step model from datasheet numbers (before any data).

    Prefill is compute-bound: ``prefill_flops / (tp * peak_flops(quant) * prefill_mfu)``.
    Decode is bandwidth-bound: each GPU reads its weights (``weight_bytes(tp=tp)``) once per
    step (in ``overhead_s``) and its share of every context token's KV bytes once per step, at
    ``mem_bandwidth_bps * bandwidth``. With ``tp > 1`` each token costs two ring all-reduces
    per layer of ``hidden * 2`` bytes, ``2 (tp - 1) / tp`` of them on the wire per GPU, at
    half the (bidirectional) ``interconnect_bps`` times the ``interconnect`` efficiency.
    """
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    peak = gpu.peak_flops(quant) * tp
    bandwidth = gpu.mem_bandwidth_bps * efficiency.bandwidth
    ref = _PREFILL_REFERENCE_TOKENS
    prefill_flops_per_token = arch.prefill_flops(ref, 0) / ref
    decode_flops_per_token = arch.decode_flops_per_token(0)
    allreduce_s_per_token = 0.0
    allreduce_fixed_s = 0.0
    if tp > 1:
        wire_bytes = 2 * arch.num_layers * arch.hidden_size * _ACTIVATION_BYTES * 2 * (tp - 1) / tp
        # interconnect_bps is bidirectional; a ring sends and receives at once on each GPU
        link = (gpu.interconnect_bps or _PCIE_FALLBACK_BPS) / 2 * efficiency.interconnect
        allreduce_s_per_token = wire_bytes / link
        allreduce_fixed_s = 2 * arch.num_layers * efficiency.allreduce_latency_s
    weights_s = weight_bytes(arch, quant, tp=tp) / bandwidth
    return StepModel(
        overhead_s=efficiency.step_overhead_s + weights_s + allreduce_fixed_s,
        prefill_s_per_token=prefill_flops_per_token / (peak * efficiency.prefill_mfu)
        + allreduce_s_per_token,
        decode_s_per_seq=decode_flops_per_token / (peak * efficiency.decode_mfu)
        + efficiency.per_seq_overhead_s
        + allreduce_s_per_token,
        kv_s_per_token=kv_bytes_per_token_per_gpu(arch, kv_dtype, tp=tp) / bandwidth,
    )
