"""llama.cpp ``llama-server``: ``-np`` parallel slots sharing a context of ``-c`` tokens.

Memory: the KV cache is ``-c`` tokens (``fixed_tokens``), whatever the device memory; each of
the ``-np`` slots holds at most ``c / np``. Limits: slots = ``max_num_seqs`` (``-np``, 4
here: recent servers' auto value), logical batch ``-b`` 2048 tokens, one sequence per slot,
no paging (block size 1). No CUDA graphs for batches > 1 and a per-step sampling loop on the
CPU make its step overhead larger than vLLM's.

Not validated: constants are vLLM's with a larger step overhead; the CPU server in this
repo's integration tests is the only llama.cpp measured (online calibration learns it).
"""

from estimator.engines.base import EngineProfile, LimitDefaults, MemorySemantics
from estimator.engines.vllm import PROFILE as _VLLM

PROFILE = EngineProfile(
    name="llamacpp",
    title="llama.cpp llama-server",
    versions="none (not validated)",
    step_overhead_s=_VLLM.step_overhead_s * 2,
    per_seq_overhead_s=_VLLM.per_seq_overhead_s * 3,
    eager_step_overhead_s=0.0,
    prefill_mfu={k: v * 0.7 for k, v in _VLLM.prefill_mfu.items()},
    attention_mfu=_VLLM.attention_mfu,
    decode_bandwidth=_VLLM.decode_bandwidth,
    api_ttft_s=0.002,
    memory=MemorySemantics(
        kv_budget="fixed_tokens",
        fraction_knob="-c (ctx-size)",
        default_tokens=8192,
        profiles_activations=False,
        sums_sampler_and_forward=False,
        cuda_graph_bytes=0,
        non_torch_bytes=0,
        moe_workspace=False,
    ),
    limits=LimitDefaults(max_num_seqs=4, max_num_batched_tokens=2048, block_size=1),
    cpu_limits=LimitDefaults(max_num_seqs=4, max_num_batched_tokens=2048, block_size=1),
    cpu_memory=MemorySemantics(
        kv_budget="fixed_tokens",
        fraction_knob="-c (ctx-size)",
        default_tokens=8192,
        profiles_activations=False,
    ),
    scheduler="fcfs",
    sources=("none: constants derived from the vllm profile",),
    validation="not validated (no published rows with full conditions)",
)
