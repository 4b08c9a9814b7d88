"""Engine profiles: one conformance test over every registered profile, and the defaults each
engine picks for a device (the engines' documented behaviour, not fitted numbers)."""

from __future__ import annotations

import pytest

from estimator.catalog import GpuSpec, get_gpu, gpu_generation, load_gpu_catalog
from estimator.engines import (
    DEFAULT_ENGINE,
    UnknownEngine,
    default_limits,
    get_profile,
    memory_semantics,
    profile_names,
)

CATALOG = load_gpu_catalog()


def gpu(key: str) -> GpuSpec:
    return get_gpu(CATALOG, key)


@pytest.mark.parametrize("name", profile_names())
def test_every_profile_is_complete_and_physical(name: str) -> None:
    p = get_profile(name)
    assert p.name == name and p.title and p.versions and p.sources and p.validation
    assert p.step_overhead_s > 0 and p.per_seq_overhead_s >= 0 and p.api_ttft_s >= 0
    assert p.eager_step_overhead_s >= 0
    for table in (p.prefill_mfu, p.attention_mfu, p.decode_bandwidth):
        assert "default" in table
        assert all(0.0 < v <= 1.0 for v in table.values())
    for limits in (p.limits, p.large_gpu_limits, p.cpu_limits):
        if limits is not None:
            assert limits.max_num_seqs >= 1 and limits.block_size >= 1
            assert limits.max_num_batched_tokens >= 1
    assert p.memory.kv_budget in ("fraction_of_total", "fraction_of_free", "fixed_space",
                                  "fixed_tokens")  # fmt: skip
    assert 0.0 < p.memory.default_fraction <= 1.0
    assert p.scheduler in ("fcfs", "guaranteed_no_evict")


def test_registry_names_aliases_and_errors() -> None:
    assert set(profile_names()) == {"vllm", "sglang", "trtllm", "tgi", "llamacpp"}
    assert get_profile("TensorRT-LLM") is get_profile("trtllm")
    assert get_profile("llama.cpp").name == "llamacpp"
    assert get_profile(get_profile("vllm")) is get_profile(DEFAULT_ENGINE)
    with pytest.raises(UnknownEngine, match="known: vllm"):
        get_profile("nope")


@pytest.mark.parametrize(
    ("key", "seqs", "batched", "block"),
    [("h100-sxm", 1024, 8192, 16), ("h200", 1024, 8192, 16), ("b200", 1024, 16384, 16), ("a100-80gb", 256, 2048, 16),
     ("l4", 256, 2048, 16), ("cpu", 128, 2048, 128)],
    ids=["h100", "h200", "b200", "a100-excluded", "small", "cpu-build"],
)  # fmt: skip
def test_vllm_default_limits_follow_the_device(
    key: str, seqs: int, batched: int, block: int
) -> None:
    lim = default_limits(get_profile("vllm"), gpu(key))
    assert (lim.max_num_seqs, lim.max_num_batched_tokens, lim.block_size) == (seqs, batched, block)


def test_cpu_build_sizes_kv_by_space_not_by_memory_fraction() -> None:
    sem = memory_semantics(get_profile("vllm"), gpu("cpu"))
    assert sem.kv_budget == "fixed_space" and sem.default_space_gib == 4.0
    assert memory_semantics(get_profile("vllm"), gpu("h100-sxm")).kv_budget == "fraction_of_total"


def test_trtllm_semantics() -> None:
    p = get_profile("trtllm")
    assert p.scheduler == "guaranteed_no_evict"
    assert p.memory.kv_budget == "fraction_of_free"
    assert p.memory.fraction_knob == "kv_cache_free_gpu_mem_fraction"


@pytest.mark.parametrize(
    ("key", "gen"),
    [("h100-sxm", "hopper"), ("h200", "hopper"), ("a100-80gb", "ampere"), ("a10g", "ampere"),
     ("l40s", "ada"), ("l4", "ada"), ("t4", "turing"), ("b200", "blackwell"), ("cpu", "cpu")],
)  # fmt: skip
def test_gpu_generation(key: str, gen: str) -> None:
    assert gpu_generation(gpu(key)) == gen
