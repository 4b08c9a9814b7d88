"""TensorRT-LLM (C++ runtime / ``trtllm-bench`` / Triton backend / ``trtllm-serve``).

Memory: weights and activations first, then ``kv_cache_free_gpu_mem_fraction`` (0.9 by
default, 0.95 in NVIDIA's published throughput runs) of what is *free* after them goes to
the KV cache; 32 tokens per block. Scheduling: the default capacity scheduler policy
``GUARANTEED_NO_EVICT`` admits a request only when the blocks of its prompt and its maximum
output fit, so no request is ever evicted; in-flight batching with chunked context.
Limits: ``max_batch_size`` 2048 and ``max_num_tokens`` 8192 (the LLM API defaults of 1.0;
``trtllm-bench build`` picks its own from the dataset). With an FP8 checkpoint NVIDIA's
published runs also use an FP8 KV cache (``trtllm-bench build --quantization FP8``).
"""

from estimator.engines.base import EngineProfile, LimitDefaults, MemorySemantics

PROFILE = EngineProfile(
    name="trtllm",
    title="TensorRT-LLM",
    versions="0.14 (Triton serving table), 0.17 (trtllm-bench throughput table), 1.0",
    step_overhead_s=0.000754565,
    per_seq_overhead_s=7.6975e-06,
    eager_step_overhead_s=0.003,
    prefill_mfu={"default": 0.600, "hopper": 0.657, "ampere": 0.693, "ada": 0.336},
    attention_mfu={"default": 0.450, "ada": 0.253, "ampere": 0.480, "hopper": 0.493},
    decode_bandwidth={"default": 0.800, "ada": 0.782, "ampere": 0.788, "hopper": 0.688},
    api_ttft_s=0.00225016,
    api_service_s=0.001,
    moe_efficiency=0.722,
    kv_efficiency=1.298,
    memory=MemorySemantics(
        kv_budget="fraction_of_free",
        fraction_knob="kv_cache_free_gpu_mem_fraction",
        default_fraction=0.9,
        profiles_activations=True,
        sums_sampler_and_forward=False,
        cuda_graph_bytes=0,
        non_torch_bytes=256 << 20,
        moe_workspace=True,
    ),
    limits=LimitDefaults(max_num_seqs=2048, max_num_batched_tokens=8192, block_size=32),
    scheduler="guaranteed_no_evict",
    sources=(
        "bench/data/published.yaml: rows with engine trtllm (TensorRT-LLM perf-overview "
        "0.17 and 1.0, its Triton serving table at 0.14, NVIDIA NIM 1.8.0)",
    ),
    validation=(
        "112 published latency and throughput comparisons (0.14-1.0; A100, "
        "H100, H200, L40S): median error 4-7% per GPU, worst +55% (TTFT at concurrency 50, "
        "NIM) and -31% (Qwen3-235B with expert parallelism) (bench/README.md, 'Published "
        "benchmarks')"
    ),
)
