"""SGLang (``sglang.launch_server``): radix cache, chunked prefill, FCFS-like scheduling.

Memory: ``mem_fraction_static`` of the total memory holds weights and the KV pool (0.88 at
TP 1 and 0.85 at TP 4 in v0.3, per sglang's benchmark_vllm_060 README); the rest is left
for activations and CUDA graphs, so no profile peak is subtracted from the pool. Limits:
``chunked_prefill_size`` 8192 on large GPUs (2048 on small ones), page size 1 (counted here
as blocks of 1 token), ``max_running_requests`` sized from the token pool (taken as 4096 here,
the pool then binds first).
"""

from estimator.engines.base import EngineProfile, LimitDefaults, MemorySemantics

PROFILE = EngineProfile(
    name="sglang",
    title="SGLang",
    versions="0.3.0 (sglang benchmark_vllm_060)",
    step_overhead_s=0.00125434,
    per_seq_overhead_s=2.74393e-05,
    eager_step_overhead_s=0.004,
    prefill_mfu={"default": 0.500, "hopper": 0.576, "ampere": 0.801},
    attention_mfu={"default": 0.400, "ampere": 0.534, "hopper": 0.460},
    decode_bandwidth={"default": 0.780, "ampere": 0.805, "hopper": 0.610},
    api_ttft_s=0.00170045,
    api_service_s=0.00200276,
    moe_efficiency=1.000,
    kv_efficiency=0.946,
    memory=MemorySemantics(
        kv_budget="fraction_of_total",
        fraction_knob="mem_fraction_static",
        default_fraction=0.88,
        profiles_activations=False,
        sums_sampler_and_forward=False,
        cuda_graph_bytes=0,
        non_torch_bytes=0,
        moe_workspace=False,
    ),
    limits=LimitDefaults(max_num_seqs=4096, max_num_batched_tokens=2048, block_size=1),
    large_gpu_limits=LimitDefaults(max_num_seqs=4096, max_num_batched_tokens=8192, block_size=1),
    large_gpu_min_gib=70.0,
    scheduler="fcfs",
    sources=("bench/data/published.yaml: rows with engine sglang (sglang benchmark_vllm_060)",),
    validation=(
        "10 published latency and throughput comparisons (SGLang 0.3; A100, "
        "H100): median error 1-3%, worst -5%; KV capacity of a large FP8 MoE at TP4 +13% "
        "(bench/README.md, 'Published benchmarks')"
    ),
)
