"""Model architecture from HF config.json: parameter counts against the published totals,
KV bytes per token, sliding windows, MoE and MLA fields, FLOPs, checkpoint cross-checks."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from estimator.modelarch import ArchError, ModelArch, _pairs, kv_dtype_bytes, load_model_arch

CONFIGS = Path(__file__).parent / "configs"


def arch(name: str) -> ModelArch:
    return load_model_arch(CONFIGS / f"{name}.json")


KNOWN = [
    # config, published total params, tolerance, active params (None: dense), bf16 KV bytes/token
    ("llama-3.1-8b", 8.03e9, 0.01, None, 131072),
    ("llama-2-7b", 6.74e9, 0.01, None, 524288),
    ("llama-2-70b", 68.98e9, 0.01, None, 327680),
    ("mistral-7b-v0.1", 7.24e9, 0.01, None, 131072),
    ("mixtral-8x7b-v0.1", 46.7e9, 0.01, 12.9e9, 131072),
    ("qwen2.5-7b", 7.62e9, 0.01, None, 57344),
    ("qwen3-8b", 8.19e9, 0.01, None, 147456),
    ("gemma-2-9b", 9.24e9, 0.01, None, 344064),
    ("qwen1.5-moe-a2.7b", 14.3e9, 0.01, 2.7e9, 196608),
    ("qwen3-30b-a3b", 30.5e9, 0.01, 3.3e9, 98304),
    ("deepseek-v3", 671e9, 0.03, 37e9, 61 * (512 + 64) * 2),
]


@pytest.mark.parametrize(("name", "total", "tol", "active", "kv"), KNOWN, ids=[k[0] for k in KNOWN])
def test_known_models(name: str, total: float, tol: float, active: float | None, kv: int) -> None:
    a = arch(name)
    assert a.total_params == pytest.approx(total, rel=tol)
    assert a.active_params == pytest.approx(active or total, rel=0.03 if active else tol)
    assert a.kv_bytes_per_token() == kv
    assert a.active_params <= a.total_params


EXACT = [
    # hand-computed from the architecture (see the module docstring's formulas)
    ("llama-3.1-8b", 8_030_261_248),  # = safetensors index total_size 16060522496 / 2
    ("llama-2-70b", 68_976_648_192),
    ("mixtral-8x7b-v0.1", 46_702_792_704),
    ("qwen2.5-7b", 7_615_616_512),
    ("qwen3-8b", 8_190_735_360),
    ("deepseek-v3", 671_026_419_200),  # without the MTP layer (685B with it)
]


@pytest.mark.parametrize(("name", "params"), EXACT, ids=[e[0] for e in EXACT])
def test_exact_parameter_counts(name: str, params: int) -> None:
    assert arch(name).total_params == params


SHAPES = [
    # config, layers, heads, kv heads, head_dim, tied, sliding window, windowed layers
    ("llama-3.1-8b", 32, 32, 8, 128, False, None, 0),
    ("mistral-7b-v0.1", 32, 32, 8, 128, False, 4096, 32),
    ("qwen2.5-7b", 28, 28, 4, 128, False, None, 0),  # use_sliding_window: false
    ("gemma-2-9b", 42, 16, 8, 256, True, 4096, 21),  # every other layer is local
    ("gemma-3-27b-it", 62, 32, 16, 128, True, 1024, 52),  # 5 local : 1 global
    ("mixtral-8x7b-v0.1", 32, 32, 8, 128, False, None, 0),  # sliding_window: null
]


@pytest.mark.parametrize(
    ("name", "layers", "heads", "kv_heads", "head_dim", "tied", "window", "windowed"),
    SHAPES,
    ids=[s[0] for s in SHAPES],
)
def test_shapes(
    name: str,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    tied: bool,
    window: int | None,
    windowed: int,
) -> None:
    a = arch(name)
    assert (a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim) == (
        layers,
        heads,
        kv_heads,
        head_dim,
    )
    assert a.tie_word_embeddings is tied
    assert (a.sliding_window, a.num_sliding_layers) == (window, windowed)


def test_gemma3_reads_text_config_and_class_defaults() -> None:
    a = arch("gemma-3-27b-it")
    assert a.model_type == "gemma3_text"
    assert a.vocab_size == 262208  # omitted in the file: Gemma3TextConfig's default
    assert a.max_position_embeddings == 131072
    assert a.torch_dtype == "bfloat16"  # from the top level
    assert a.total_params == pytest.approx(27.0e9, rel=0.01)  # text decoder only


MOE = [
    # config, experts, per token, expert width, shared experts, shared width, MoE layers
    ("mixtral-8x7b-v0.1", 8, 2, 14336, 0, 0, 32),
    ("qwen1.5-moe-a2.7b", 60, 4, 1408, 1, 5632, 24),
    ("qwen3-30b-a3b", 128, 8, 768, 0, 0, 48),
    ("deepseek-v3", 256, 8, 2048, 1, 2048, 58),  # first_k_dense_replace = 3
]


@pytest.mark.parametrize(
    ("name", "experts", "k", "width", "shared", "shared_width", "layers"),
    MOE,
    ids=[m[0] for m in MOE],
)
def test_moe_fields(
    name: str, experts: int, k: int, width: int, shared: int, shared_width: int, layers: int
) -> None:
    a = arch(name)
    assert a.is_moe
    assert (a.num_experts, a.experts_per_token, a.moe_intermediate_size) == (experts, k, width)
    assert (a.num_shared_experts, a.shared_expert_intermediate_size) == (shared, shared_width)
    assert a.num_moe_layers == layers


def test_deepseek_mla_fields_and_kv() -> None:
    a = arch("deepseek-v3")
    assert a.is_mla and not arch("llama-3.1-8b").is_mla
    assert (a.kv_lora_rank, a.q_lora_rank, a.qk_rope_head_dim) == (512, 1536, 64)
    assert (a.qk_nope_head_dim, a.v_head_dim, a.head_dim) == (128, 128, 192)
    assert a.kv_bytes_per_token() == 70272
    assert a.kv_bytes_per_token("fp8") == 35136
    assert a.quantization == "fp8"


@pytest.mark.parametrize(
    ("kv_dtype", "factor"),
    [("auto", 1.0), ("bf16", 1.0), ("fp16", 1.0), ("fp8", 0.5), ("fp8_e5m2", 0.5), ("fp32", 2.0)],
    ids=["auto", "bf16", "fp16", "fp8", "fp8_e5m2", "fp32"],
)
def test_kv_dtype_scales_bytes(kv_dtype: str, factor: float) -> None:
    assert arch("llama-3.1-8b").kv_bytes_per_token(kv_dtype) == 131072 * factor


def test_auto_kv_dtype_of_fp32_config_is_16bit() -> None:
    # gemma-2-9b ships torch_dtype float32; vLLM serves it in 16-bit by default.
    a = arch("gemma-2-9b")
    assert a.torch_dtype == "float32"
    assert a.kv_bytes_per_token("auto") == a.kv_bytes_per_token("bf16")


def test_unknown_kv_dtype() -> None:
    with pytest.raises(ValueError, match=r"unknown kv_dtype 'int2'"):
        kv_dtype_bytes("int2")


WINDOW = [
    # config, context, expected bytes
    ("mistral-7b-v0.1", 1000, 1000 * 131072),
    ("mistral-7b-v0.1", 10000, 4096 * 131072),  # every layer capped at the window
    ("gemma-2-9b", 2000, 2000 * 344064),
    ("gemma-2-9b", 8192, 8192 * 344064 / 2 + 4096 * 344064 / 2),  # half the layers capped
    ("llama-3.1-8b", 100000, 100000 * 131072),
]


@pytest.mark.parametrize(
    ("name", "ctx", "expected"), WINDOW, ids=[f"{n}-{c}" for n, c, _ in WINDOW]
)
def test_kv_bytes_for_context_caps_windowed_layers(name: str, ctx: int, expected: float) -> None:
    assert arch(name).kv_bytes_for_context(ctx) == expected


def test_prefill_flops_formula_for_llama() -> None:
    a = arch("llama-3.1-8b")
    n = 1000
    body = a.total_params - 2 * a.embedding_params
    linear = 2 * body * n + 2 * a.lm_head_params
    attention = 4 * a.num_heads * a.head_dim * a.num_layers * n * (n + 1) / 2
    assert a.prefill_flops(n) == pytest.approx(linear + attention)
    assert a.prefill_flops(n, cached_tokens=n) == 0.0


def test_decode_flops_are_two_per_active_matmul_param_plus_attention() -> None:
    a = arch("mixtral-8x7b-v0.1")
    matmul = a.active_params - a.embedding_params  # untied: lm_head counts once
    ctx = 4096
    attention = 4 * a.num_heads * a.head_dim * a.num_layers * ctx
    assert a.decode_flops_per_token(ctx) == pytest.approx(2 * matmul + attention)


@pytest.mark.parametrize("name", ["llama-3.1-8b", "gemma-2-9b", "mistral-7b-v0.1"])
@given(ctx=st.integers(min_value=1, max_value=20000))
def test_one_token_prefill_equals_decode(name: str, ctx: int) -> None:
    a = arch(name)
    assert a.prefill_flops(ctx, cached_tokens=ctx - 1) == pytest.approx(
        a.decode_flops_per_token(ctx)
    )


@given(
    prompt=st.integers(min_value=1, max_value=50000),
    cached=st.integers(min_value=0, max_value=50000),
    extra=st.integers(min_value=1, max_value=5000),
)
def test_prefill_flops_monotone(prompt: int, cached: int, extra: int) -> None:
    a = arch("gemma-2-9b")
    cached = min(cached, prompt)
    assert a.prefill_flops(prompt + extra, cached) > a.prefill_flops(prompt, cached)
    assert a.prefill_flops(prompt, cached) <= a.prefill_flops(prompt, 0)


def test_prefill_rejects_bad_cached_tokens() -> None:
    with pytest.raises(ValueError, match="cached_tokens"):
        arch("llama-3.1-8b").prefill_flops(10, cached_tokens=11)


@given(
    start=st.integers(min_value=0, max_value=3000),
    new=st.integers(min_value=0, max_value=3000),
    window=st.one_of(st.none(), st.integers(min_value=1, max_value=4000)),
)
def test_pairs_closed_form_matches_brute_force(start: int, new: int, window: int | None) -> None:
    positions = np.arange(start + 1, start + new + 1)
    capped = positions if window is None else np.minimum(positions, window)
    assert _pairs(start, new, window) == int(capped.sum())


@given(ctx=st.integers(min_value=0, max_value=200000))
def test_kv_for_context_never_exceeds_full_cost(ctx: int) -> None:
    for name in ("gemma-2-9b", "mistral-7b-v0.1", "gemma-3-27b-it"):
        a = arch(name)
        full = ctx * a.kv_bytes_per_token()
        got = a.kv_bytes_for_context(ctx)
        assert got <= full
        if a.sliding_window is None or ctx <= a.sliding_window:
            assert got == full


# --- unknown families, errors -----------------------------------------------------------

LLAMA_LIKE = {
    "model_type": "someday_lm",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "torch_dtype": "bfloat16",
}


def write_config(folder: Path, config: dict[str, object]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def tiny_llama_params() -> int:
    h, layers, i, v = 64, 2, 128, 256
    attn = h * h * 2 + h * 32 * 2  # q, o; k, v with 2 KV heads of 16
    return layers * (attn + 3 * h * i + 2 * h) + 2 * v * h + h


def test_unknown_model_type_falls_back_to_llama_math(tmp_path: Path) -> None:
    a = load_model_arch(write_config(tmp_path / "someday", LLAMA_LIKE))
    assert a.name == "someday"
    assert a.head_dim == 16
    assert a.total_params == tiny_llama_params()
    assert a.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 2


ARCH_ERRORS = [
    ("missing-hidden", {k: v for k, v in LLAMA_LIKE.items() if k != "hidden_size"}, "hidden_size",
     "missing field"),
    ("missing-vocab", {k: v for k, v in LLAMA_LIKE.items() if k != "vocab_size"}, "vocab_size",
     "missing field"),
    ("not-integer", {**LLAMA_LIKE, "num_hidden_layers": "two"}, "num_hidden_layers",
     "expected an integer"),
    ("negative", {**LLAMA_LIKE, "intermediate_size": -1}, "intermediate_size", ">= 0"),
    ("nested", {"model_type": "llava", "text_config": {"model_type": "llama"}},
     "text_config.hidden_size", "missing field"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("config", "key", "reason"), [e[1:] for e in ARCH_ERRORS], ids=[e[0] for e in ARCH_ERRORS]
)
def test_arch_errors_name_file_and_key(
    tmp_path: Path, config: dict[str, object], key: str, reason: str
) -> None:
    path = write_config(tmp_path, config)
    with pytest.raises(ArchError) as info:
        load_model_arch(path)
    assert info.value.key == key
    assert str(path) in str(info.value) and reason in str(info.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ArchError, match="cannot read"):
        load_model_arch(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope", encoding="utf-8")
    with pytest.raises(ArchError, match="invalid JSON"):
        load_model_arch(bad)


# --- checkpoint cross-check ---------------------------------------------------------------


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def tiny_llama_tensors() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (256, 64),
        "model.norm.weight": (64,),
        "lm_head.weight": (256, 64),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (64, 64),
            p + "self_attn.k_proj.weight": (32, 64),
            p + "self_attn.v_proj.weight": (32, 64),
            p + "self_attn.o_proj.weight": (64, 64),
            p + "mlp.gate_proj.weight": (128, 64),
            p + "mlp.up_proj.weight": (128, 64),
            p + "mlp.down_proj.weight": (64, 128),
            p + "input_layernorm.weight": (64,),
            p + "post_attention_layernorm.weight": (64,),
        }
    return shapes


def test_single_safetensors_file_is_counted(tmp_path: Path) -> None:
    write_config(tmp_path, {**LLAMA_LIKE, "model_type": "llama"})
    write_safetensors(tmp_path / "model.safetensors", tiny_llama_tensors())
    a = load_model_arch(tmp_path)  # the folder
    assert a.checked_params == tiny_llama_params() == a.total_params
    assert a.params_rel_diff == 0.0


def test_sharded_checkpoint_with_index_counts_headers(tmp_path: Path) -> None:
    write_config(tmp_path, {**LLAMA_LIKE, "model_type": "llama"})
    tensors = list(tiny_llama_tensors().items())
    shards = {
        "model-00001-of-00002.safetensors": tensors[:7],
        "model-00002-of-00002.safetensors": tensors[7:],
    }
    weight_map: dict[str, str] = {}
    for shard, part in shards.items():
        write_safetensors(tmp_path / shard, dict(part))
        weight_map |= {name: shard for name, _ in part}
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map}  # headers win
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    assert load_model_arch(tmp_path / "config.json").checked_params == tiny_llama_params()


def test_index_total_size_without_shards(tmp_path: Path) -> None:
    config = json.loads((CONFIGS / "llama-3.1-8b.json").read_text(encoding="utf-8"))
    write_config(tmp_path, config)
    index = {
        "metadata": {"total_size": 16060522496},
        "weight_map": {"x": "model-00001-of-00004.safetensors"},
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    a = load_model_arch(tmp_path)
    assert a.checked_params == 8_030_261_248
    assert a.params_rel_diff == 0.0


def test_mismatch_is_reported_not_fatal(tmp_path: Path) -> None:
    write_config(tmp_path, {**LLAMA_LIKE, "model_type": "llama", "tie_word_embeddings": True})
    write_safetensors(tmp_path / "model.safetensors", tiny_llama_tensors())  # has lm_head
    a = load_model_arch(tmp_path)
    assert a.checked_params == tiny_llama_params()
    assert a.params_rel_diff == pytest.approx(-256 * 64 / tiny_llama_params())


def test_arch_is_hashable_and_replaceable() -> None:
    a = arch("llama-3.1-8b")
    assert replace(a, num_kv_heads=16).kv_bytes_per_token() == 2 * a.kv_bytes_per_token()
    assert hash(a) == hash(arch("llama-3.1-8b"))


LAYOUTS = [
    # id, extra config fields, sliding window, windowed layers
    ("layer-types", {"sliding_window": 512, "layer_types": ["sliding_attention", "full_attention"]},
     512, 1),
    ("qwen2-swa-on", {"model_type": "qwen2", "sliding_window": 1024, "use_sliding_window": True,
                      "max_window_layers": 1}, 1024, 1),
    ("qwen2-swa-off", {"model_type": "qwen2", "sliding_window": 1024}, None, 0),
    ("mistral-null", {"model_type": "mistral", "sliding_window": None}, None, 0),
    ("mistral-default", {"model_type": "mistral"}, 4096, 2),  # MistralConfig's default
]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "window", "windowed"), [x[1:] for x in LAYOUTS], ids=[x[0] for x in LAYOUTS]
)
def test_sliding_layouts(
    tmp_path: Path, extra: dict[str, object], window: int | None, windowed: int
) -> None:
    a = load_model_arch(write_config(tmp_path, {**LLAMA_LIKE, **extra}))
    assert (a.sliding_window, a.num_sliding_layers) == (window, windowed)


def test_unreadable_checkpoint_files_are_named(tmp_path: Path) -> None:
    write_config(tmp_path, {**LLAMA_LIKE, "model_type": "llama"})
    (tmp_path / "model.safetensors").write_bytes(b"\x05")
    with pytest.raises(ArchError, match=r"model\.safetensors: <header>: unreadable"):
        load_model_arch(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{", encoding="utf-8")
    with pytest.raises(ArchError, match=r"index\.json: <file>: unreadable index"):
        load_model_arch(tmp_path)


# --- issue 14: quantization_config read as a weight format and unconverted modules --------


@pytest.mark.parametrize(
    ("qc", "fmt"),
    [({"quant_method": "fp8", "weight_block_size": [128, 128]}, "fp8"),
     ({"quant_method": "fbgemm_fp8"}, "fp8"),
     ({"quant_method": "modelopt", "quant_algo": "FP8"}, "fp8"),
     ({"quant_method": "gptq", "bits": 4}, "int4"),
     ({"quant_method": "awq", "bits": 4}, "int4"),
     ({"quant_method": "compressed-tensors", "config_groups": {"g": {
         "weights": {"num_bits": 8, "type": "float"}, "input_activations": {"num_bits": 8}}}},
      "fp8"),
     ({"quant_method": "compressed-tensors", "config_groups": {"g": {
         "weights": {"num_bits": 8, "type": "int"}, "input_activations": {"num_bits": 8}}}},
      "int8"),
     ({"quant_method": "compressed-tensors", "config_groups": {"g": {
         "weights": {"num_bits": 4, "type": "int"}}}}, "int4"),
     ({"quant_method": "bitsandbytes"}, None)],
    ids=["fp8-block", "fbgemm", "modelopt", "gptq", "awq", "ct-fp8", "ct-w8a8", "ct-w4a16", "bnb"],
)  # fmt: skip
def test_quantization_config_formats(qc: dict[str, object], fmt: str | None) -> None:
    from estimator.modelarch import read_quantization

    arch = load_model_arch(CONFIGS / "llama-3.1-8b.json")
    assert read_quantization(qc, arch) == (fmt, 0)


def test_ignore_lists_match_names_prefixes_and_regexes() -> None:
    from estimator.modelarch import module_params, read_quantization

    arch = load_model_arch(CONFIGS / "qwen3-30b-a3b.json")
    modules = dict(module_params(arch))
    router = sum(n for k, n in modules.items() if k.endswith(".mlp.gate"))
    qc = {"quant_method": "compressed-tensors", "ignore": ["lm_head", "re:.*mlp.gate$"]}
    assert read_quantization(qc, arch)[1] == router > 0
    layer0 = sum(n for k, n in modules.items() if k.startswith("model.layers.0."))
    assert read_quantization({"quant_method": "fp8", "modules_to_not_convert": [
        "model.layers.0"]}, arch)[1] == layer0  # fmt: skip
    # every linear module of the body is listed once
    body = arch.total_params - arch.embedding_params - arch.lm_head_params - arch.hidden_size
    norms_etc = arch.replicated_params - sum(modules[k] for k in modules if k.endswith(".gate"))
    assert sum(modules.values()) == pytest.approx(body - norms_etc, rel=0.01)
