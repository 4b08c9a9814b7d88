"""What an engine profile holds: a small, documented set of constants per serving engine.

A profile says how one serving engine turns the datasheet roofline into step times, how it
sizes its KV cache, which limits it starts with and how it schedules. The constants are the
ones the validation suite (``bench/published.py``) fits on published benchmark rows; every
profile names the rows (``sources``) and says how it was validated (``validation``).

Fields, in the step-time formula of :mod:`estimator.engine`:

- ``step_overhead_s``: CPU-side cost of one engine step (scheduling, input preparation,
  kernel launches, sampling set-up), with CUDA graphs where the engine uses them;
  ``eager_step_overhead_s`` is added without them (``--enforce-eager``).
- ``per_seq_overhead_s``: CPU work per running sequence per step (sampling, detokenisation,
  output processing).
- ``prefill_mfu[generation]``: fraction of the dense peak FLOP/s the prompt's matmuls reach;
  ``attention_mfu[generation]`` the same for the prompt's attention (flash attention).
- ``decode_bandwidth[generation]``: fraction of HBM bandwidth reached streaming weights and
  KV in a decode step.
- ``kv_efficiency``: decode attention's KV reads relative to weight streaming.
- ``moe_efficiency``: the routed experts' kernels relative to a dense layer's (prefill
  FLOPs and weight streaming of the experts divided by it).
- ``api_ttft_s``: per-request fixed cost in TTFT outside the engine's steps (HTTP, chat
  template, tokenisation, detokenisation in the API server); zero for offline benchmarks;
  ``api_service_s`` is its serialised part (the API server works on one request at a time:
  a burst queues there, and it caps the request rate).
- ``memory``: how the engine sizes its KV cache (:class:`MemorySemantics`).
- ``limits``: default batching limits (:class:`LimitDefaults`); ``large_gpu_limits`` replace
  them on GPUs with at least ``large_gpu_min_gib`` of memory (vLLM's defaults depend on it).
- ``scheduler``: ``fcfs`` (admit while prompt blocks fit; preempt by recompute when decode
  runs out of blocks: vLLM, SGLang, TGI) or ``guaranteed_no_evict`` (admit only when the
  blocks of prompt + maximum output fit: TensorRT-LLM's default capacity scheduler).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Scheduler = Literal["fcfs", "guaranteed_no_evict"]
KvBudget = Literal["fraction_of_total", "fraction_of_free", "fixed_space", "fixed_tokens"]
GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class MemorySemantics:
    """How an engine decides its KV cache size.

    ``kv_budget``:

    - ``fraction_of_total``: ``fraction * total memory - weights - runtime`` (vLLM's
      ``gpu_memory_utilization``; SGLang's ``mem_fraction_static``);
    - ``fraction_of_free``: ``fraction * (total - weights - runtime)``: a fraction of what is
      free after the model is loaded (TensorRT-LLM's ``kv_cache_free_gpu_mem_fraction``);
    - ``fixed_space``: a fixed number of bytes whatever the device (vLLM's CPU backend:
      ``VLLM_CPU_KVCACHE_SPACE`` GiB, default ``default_space_gib``);
    - ``fixed_tokens``: a fixed number of tokens (llama.cpp's ``-c``, shared by its slots).
    """

    kv_budget: KvBudget
    fraction_knob: str
    """The engine's name for the fraction (or space) setting."""
    default_fraction: float = 0.9
    default_space_gib: float = 4.0
    default_tokens: int = 4096
    profiles_activations: bool = True
    """The engine runs a profiling forward pass and subtracts its peak (vLLM, SGLang)."""
    sums_sampler_and_forward: bool = True
    """The sampler's dummy run and the forward pass's peak add up (vLLM V1 profiles both in
    one run and keeps both peaks' tensors alive) rather than the larger of the two."""
    cuda_graph_bytes: int = 256 * MIB
    non_torch_bytes: int = 128 * MIB
    """cuBLAS/cuDNN workspaces and the like, beside the CUDA context."""
    moe_workspace: bool = True
    """Fused-MoE kernels allocate intermediate caches sized by the batched tokens."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitDefaults:
    """Batching limits an engine starts with (vLLM names)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    chunked_prefill: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineProfile:
    """One serving engine's constants; see the module docstring."""

    name: str
    title: str
    versions: str
    """Engine versions the constants were fitted or checked on."""
    step_overhead_s: float
    per_seq_overhead_s: float
    eager_step_overhead_s: float
    prefill_mfu: Mapping[str, float]
    attention_mfu: Mapping[str, float]
    decode_bandwidth: Mapping[str, float]
    api_ttft_s: float
    memory: MemorySemantics
    api_service_s: float = 0.0
    """Of ``api_ttft_s``, the part the API server spends on one request at a time (a burst
    queues for it; it caps the request rate at ``1 / api_service_s``)."""
    cpu_api_ttft_s: float = 0.0
    """The per-request cost of the engine's CPU build, whose API server shares the host's
    cores: not measured, so 0 and the online calibration learns it (``request_overhead_s``)."""
    limits: LimitDefaults
    large_gpu_limits: LimitDefaults | None = None
    large_gpu_min_gib: float = 70.0
    large_gpu_exclude: tuple[str, ...] = ()
    """GPU name fragments that keep ``limits`` even when large (vLLM: the A100)."""
    cpu_limits: LimitDefaults | None = None
    """Limits of the engine's CPU build, where it has one."""
    cpu_memory: MemorySemantics | None = None
    scheduler: Scheduler = "fcfs"
    kv_efficiency: float = 1.0
    """Bandwidth of decode attention's paged KV reads relative to ``decode_bandwidth`` (weight
    streaming): > 1 where the attention kernels read the cache better than the weights are
    streamed (TensorRT-LLM's XQA with an FP8 cache), < 1 where worse."""
    moe_efficiency: float = 1.0
    """Efficiency of the routed experts' grouped GEMMs relative to a dense layer's (prefill
    FLOPs and weight streaming of the experts; < 1: MoE kernels reach less of the peaks)."""
    interconnect: float = 0.7
    allreduce_latency_s: float = 8e-6
    sources: tuple[str, ...] = ()
    validation: str = ""
    """How far the constants were validated: rows, held-out error, caveats."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def efficiency_for(self, table: Mapping[str, float], generation: str) -> float:
        """The value for ``generation``, else the table's ``default``."""
        return float(table.get(generation, table["default"]))
