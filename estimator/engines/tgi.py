"""Hugging Face Text Generation Inference (v2/v3, Rust router + Python shards).

Memory: TGI warms up with a batch of ``max_batch_prefill_tokens`` and gives the KV cache
what is left of ``cuda_memory_fraction`` (1.0) after it, less a safety margin; modelled as a
fraction of the total (0.95) with the profile peak subtracted. Limits: the router's
``max_concurrent_requests`` (128), ``max_batch_prefill_tokens`` (4096), paged blocks of 16
tokens. The router tokenises every request (validation) before the shard sees it, so the
per-request cost is larger than vLLM's.

Not validated: no published TGI benchmark with full conditions was found for the rows of
``bench/data/published.yaml``; the time constants are vLLM's fitted ones with the
per-request cost raised. Treat TGI estimates as vLLM-like with unknown error.
"""

from estimator.engines.base import EngineProfile, LimitDefaults, MemorySemantics
from estimator.engines.vllm import PROFILE as _VLLM

PROFILE = EngineProfile(
    name="tgi",
    title="Text Generation Inference",
    versions="none (not validated)",
    step_overhead_s=_VLLM.step_overhead_s,
    per_seq_overhead_s=_VLLM.per_seq_overhead_s,
    eager_step_overhead_s=_VLLM.eager_step_overhead_s,
    prefill_mfu=_VLLM.prefill_mfu,
    attention_mfu=_VLLM.attention_mfu,
    decode_bandwidth=_VLLM.decode_bandwidth,
    api_ttft_s=_VLLM.api_ttft_s * 1.5,
    memory=MemorySemantics(
        kv_budget="fraction_of_total",
        fraction_knob="cuda_memory_fraction",
        default_fraction=0.95,
        sums_sampler_and_forward=False,
    ),
    limits=LimitDefaults(max_num_seqs=128, max_num_batched_tokens=4096, block_size=16),
    scheduler="fcfs",
    sources=("none: constants copied from the vllm profile",),
    validation="not validated (no published rows with full conditions)",
)
