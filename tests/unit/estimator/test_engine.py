"""Step-time model: the formula, its helpers, and the roofline prior's physics."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estimator.catalog import GpuSpec, get_gpu, load_gpu_catalog
from estimator.engine import Efficiency, StepModel, roofline_prior
from estimator.memory import weight_bytes
from estimator.modelarch import ModelArch, load_model_arch

CONFIGS = Path(__file__).parent / "configs"
STEP = StepModel(overhead_s=0.005, prefill_s_per_token=1e-4, decode_s_per_seq=2e-4,
                 kv_s_per_token=1e-7)  # fmt: skip


@pytest.fixture(scope="module")
def catalog() -> dict[str, GpuSpec]:
    return load_gpu_catalog()


def arch(name: str) -> ModelArch:
    return load_model_arch(CONFIGS / f"{name}.json")


@pytest.mark.parametrize(
    ("prefill", "decode", "context", "want"),
    [
        (0, 0, 0, 0.005),
        (1000, 0, 0, 0.005 + 0.1),
        (0, 10, 0, 0.005 + 0.002),
        (0, 10, 20_000, 0.005 + 0.002 + 0.002),
        (512, 32, 64_000, 0.005 + 0.0512 + 0.0064 + 0.0064),
    ],
    ids=["idle", "prefill-only", "decode-no-context", "decode", "mixed"],
)
def test_step_time(prefill: int, decode: int, context: int, want: float) -> None:
    assert STEP.step_time(prefill, decode, context) == pytest.approx(want)


@pytest.mark.parametrize(
    ("prompt", "cached", "chunk", "want"),
    [
        (1000, 0, 8192, 0.005 + 0.1),
        (1000, 400, 8192, 0.005 + 0.06),
        (1000, 1000, 8192, 0.005 + 1e-4),  # a full hit still computes one token
        (20_000, 0, 8192, 3 * 0.005 + 2.0),  # three chunks, three step overheads
    ],
    ids=["plain", "cached", "all-cached", "chunked"],
)
def test_ttft_alone(prompt: int, cached: int, chunk: int, want: float) -> None:
    assert STEP.ttft_alone(prompt, cached, chunk_tokens=chunk) == pytest.approx(want)


def test_itl_at_is_a_pure_decode_step() -> None:
    assert STEP.itl_at(16, 1000) == pytest.approx(STEP.step_time(0, 16, 16_000))


@pytest.mark.parametrize("field", ["overhead_s", "prefill_s_per_token", "decode_s_per_seq",
                                   "kv_s_per_token"])  # fmt: skip
@pytest.mark.parametrize("bad", [-1e-9, float("nan"), float("inf")], ids=["neg", "nan", "inf"])
def test_rejects_bad_coefficients(field: str, bad: float) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(STEP, **{field: bad})


def test_coefficients_round_trip() -> None:
    assert StepModel.from_coefficients(STEP.coefficients()) == STEP
    assert StepModel.from_coefficients([-1.0, 1.0, 2.0, 3.0]).overhead_s == 0.0
    with pytest.raises(ValueError, match="4 coefficients"):
        StepModel.from_coefficients([1.0])


@pytest.mark.parametrize(
    ("model", "gpu", "itl1_ms", "itl64_ms", "ttft1k_ms"),
    [
        ("llama-3.1-8b", "h100-sxm", (5, 15), (8, 30), (20, 80)),
        ("llama-3.1-8b", "a10g", (25, 80), (30, 150), (100, 500)),
        ("qwen2.5-7b", "l40s", (10, 40), (12, 60), (30, 200)),
    ],
    ids=["llama8b-h100", "llama8b-a10g", "qwen7b-l40s"],
)
def test_roofline_prior_is_in_the_range_of_published_numbers(
    catalog: dict[str, GpuSpec],
    model: str,
    gpu: str,
    itl1_ms: tuple[float, float],
    itl64_ms: tuple[float, float],
    ttft1k_ms: tuple[float, float],
) -> None:
    p = roofline_prior(arch(model), get_gpu(catalog, gpu))
    assert itl1_ms[0] <= p.itl_at(1, 1000) * 1e3 <= itl1_ms[1]
    assert itl64_ms[0] <= p.itl_at(64, 1000) * 1e3 <= itl64_ms[1]
    assert ttft1k_ms[0] <= p.ttft_alone(1000) * 1e3 <= ttft1k_ms[1]


def test_roofline_prior_terms(catalog: dict[str, GpuSpec]) -> None:
    a, g = arch("llama-3.1-8b"), get_gpu(catalog, "h100-sxm")
    eff = Efficiency()
    p = roofline_prior(a, g, efficiency=eff)
    bw = g.mem_bandwidth_bps * eff.bandwidth
    assert p.overhead_s == pytest.approx(eff.step_overhead_s + weight_bytes(a, "bf16") / bw)
    assert p.kv_s_per_token == pytest.approx(a.kv_bytes_per_token("auto") / bw)
    body = a.active_matmul_params - a.lm_head_params
    assert p.prefill_s_per_token == pytest.approx(2 * body / (g.bf16_flops * eff.prefill_mfu))
    # the attention term prices exactly what prefill_flops counts beyond the matmuls
    pairs = 1024 * 1025 // 2
    attn = a.prefill_flops(1024, 0) - 2 * body * 1024 - 2 * a.lm_head_params
    assert p.prefill_attn_s_per_pair * pairs == pytest.approx(
        attn / (g.bf16_flops * eff.prefill_mfu)
    )


def test_tensor_parallel_splits_work_and_adds_allreduce(catalog: dict[str, GpuSpec]) -> None:
    a, g = arch("llama-2-70b"), get_gpu(catalog, "h100-sxm")
    p1, p4 = roofline_prior(a, g, tp=1), roofline_prior(a, g, tp=4)
    assert p4.overhead_s < p1.overhead_s  # a quarter of the weights per GPU
    assert p4.kv_s_per_token < p1.kv_s_per_token
    assert p4.prefill_s_per_token < p1.prefill_s_per_token
    no_link = roofline_prior(a, dataclasses.replace(g, interconnect_bps=1e15), tp=4)
    assert no_link.prefill_s_per_token < p4.prefill_s_per_token  # all-reduce costs time
    with pytest.raises(ValueError, match="tp"):
        roofline_prior(a, g, tp=0)


def test_quantized_weights_and_kv_are_cheaper(catalog: dict[str, GpuSpec]) -> None:
    a, g = arch("llama-3.1-8b"), get_gpu(catalog, "h100-sxm")
    base = roofline_prior(a, g)
    assert roofline_prior(a, g, quant="int4").overhead_s < base.overhead_s
    assert roofline_prior(a, g, quant="fp8").prefill_s_per_token < base.prefill_s_per_token
    assert roofline_prior(a, g, kv_dtype="fp8").kv_s_per_token < base.kv_s_per_token


@settings(max_examples=40, deadline=None)
@given(
    model=st.sampled_from(["llama-3.1-8b", "mixtral-8x7b-v0.1", "qwen3-8b", "gemma-2-9b"]),
    gpu=st.sampled_from(["a10g", "l40s", "a100-80gb", "h100-sxm", "mi300x"]),
    factor=st.floats(1.0, 8.0),
    tp=st.sampled_from([1, 2, 4]),
)
def test_more_bandwidth_or_flops_never_slows_a_step(
    catalog: dict[str, GpuSpec], model: str, gpu: str, factor: float, tp: int
) -> None:
    a, g = arch(model), get_gpu(catalog, gpu)
    base = roofline_prior(a, g, tp=tp)
    faster_mem = roofline_prior(a, dataclasses.replace(g, mem_bandwidth_bps=g.mem_bandwidth_bps
                                                       * factor), tp=tp)  # fmt: skip
    faster_fl = roofline_prior(a, dataclasses.replace(g, bf16_flops=g.bf16_flops * factor), tp=tp)
    for p in (faster_mem, faster_fl):
        for args in [(0, 1, 1000), (2048, 0, 0), (512, 64, 64_000)]:
            assert p.step_time(*args) <= base.step_time(*args) * (1 + 1e-12)


# --- issue 14: prefill attention, per-request cost, MoE, engine profiles ------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40_000), chunk=st.integers(1, 9000))
def test_chunking_never_changes_the_attention_work(n: int, chunk: int) -> None:
    from estimator.engine import prefill_pairs

    done, pairs = 0, 0
    while done < n:
        c = min(chunk, n - done)
        pairs += prefill_pairs(done, c)
        done += c
    assert pairs == prefill_pairs(0, n) == n * (n + 1) // 2


def test_long_prompts_cost_more_per_token(catalog: dict[str, GpuSpec]) -> None:
    p = roofline_prior(arch("llama-3.1-8b"), get_gpu(catalog, "h100-sxm"), offline=True)
    # the marginal cost of a prompt token grows with the tokens before it
    t = [p.ttft_idle(n) for n in (8192, 16_384, 24_576, 32_768)]
    assert t[1] - t[0] < t[2] - t[1] < t[3] - t[2]
    # at 32k the attention adds more than a third to the matmuls (issue 14: ~1.5x)
    linear = p.prefill_s_per_token * 32_768
    assert p.ttft_idle(32_768) > 1.3 * linear


def test_request_overhead_is_in_ttft_only(catalog: dict[str, GpuSpec]) -> None:
    a, g = arch("llama-3.1-8b"), get_gpu(catalog, "h100-sxm")
    online, offline = roofline_prior(a, g), roofline_prior(a, g, offline=True)
    assert online.request_overhead_s > 0 == offline.request_overhead_s
    assert online.ttft_idle(100) - offline.ttft_idle(100) == pytest.approx(
        online.request_overhead_s
    )
    assert online.itl_at(8, 1000) == offline.itl_at(8, 1000)


def test_moe_decode_reads_only_the_experts_it_touches(catalog: dict[str, GpuSpec]) -> None:
    a, g = arch("mixtral-8x7b-v0.1"), get_gpu(catalog, "h100-sxm")
    p = roofline_prior(a, g, tp=2)
    assert p.moe_experts == 8 and p.moe_topk == 2 and p.moe_weight_s > p.overhead_s
    assert p.experts_touched(1) == pytest.approx(2 / 8)
    assert p.experts_touched(1) < p.experts_touched(4) < p.experts_touched(64) <= 1.0
    # batch 1 streams a quarter of the experts, a big batch nearly all of them
    one = p.step_time(0, 1, 1000) - p.step_time(0, 0, 0)
    assert one < 0.5 * p.moe_weight_s
    dense = roofline_prior(arch("llama-3.1-8b"), g)
    assert dense.moe_weight_s == 0.0 and dense.experts_touched(100) == 0.0


def test_enforce_eager_adds_step_overhead(catalog: dict[str, GpuSpec]) -> None:
    a, g = arch("llama-3.1-8b"), get_gpu(catalog, "a100-80gb")
    assert roofline_prior(a, g, enforce_eager=True).overhead_s > roofline_prior(a, g).overhead_s


@pytest.mark.parametrize("engine", ["vllm", "sglang", "trtllm", "tgi", "llamacpp"])
def test_every_engine_gives_a_physical_prior(catalog: dict[str, GpuSpec], engine: str) -> None:
    a, g = arch("llama-3.1-8b"), get_gpu(catalog, "h100-sxm")
    p = roofline_prior(a, g, engine=engine)
    weights_s = weight_bytes(a, "bf16") / g.mem_bandwidth_bps
    assert p.overhead_s > weights_s  # at most the full bandwidth
    assert p.itl_at(64, 1000) > p.itl_at(1, 1000) > 0
    assert p.ttft_idle(2000) > p.ttft_idle(1000) > 0
