"""A model's architecture, read from its Hugging Face ``config.json``: sizes, parameter
counts, KV-cache bytes and FLOPs.

Families: Llama 1/2/3/3.1, Mistral (sliding window), Qwen2/2.5 (q/k/v biases), Qwen3 (q/k
norms), Gemma 1/2/3 (explicit head_dim, tied embeddings, interleaved sliding layers),
Mixtral and Qwen2-MoE/Qwen3-MoE (routed + shared experts), DeepSeek-V2/V3 (MLA, dense first
layers). Multimodal configs are read through their ``text_config`` (the text decoder only).
An unknown ``model_type`` is read with Llama math when the needed fields exist.

Parameter count, per decoder layer (H hidden, h heads, g KV heads, d head_dim, I MLP width)::

    attention  = H*h*d (q) + 2*H*g*d (k, v) + h*d*H (o)  [+ biases, + q/k norms]
    MLA        = H*r_q + r_q*h*(d_nope+d_rope) + H*(r_kv+d_rope) + r_kv*h*(d_nope+d_v) + h*d_v*H
    dense MLP  = 3*H*I (gate, up, down)
    MoE MLP    = E*3*H*I_e + H*E (router) + 3*H*I_shared  (active: k of the E experts)
    model      = layers + V*H (embeddings) + V*H (lm_head, unless tied) + norms

KV cache per token (what vLLM allocates): ``2 * layers * g * d * bytes``; with MLA, the
compressed latent ``layers * (r_kv + d_rope) * bytes``. Layers with a sliding window hold at
most ``window`` tokens (:meth:`ModelArch.kv_bytes_for_context`).

FLOPs: a matmul costs 2 FLOPs per parameter per token. Per new token: ``2 * matmul params``
(active body; the input embedding is a gather, not a matmul) plus attention ``4 * h * d`` per
layer per attended token (QK^T and AV), causal. A prefill computes logits for its last token
only (as vLLM does); decode computes them for every token.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Longer than the house's ~400 lines: the per-family knowledge (HF defaults, sliding-window
# layouts, MoE layouts) sits beside the parameter counts it feeds, and nowhere else.

_KV_DTYPE_BYTES: Mapping[str, int] = {
    "auto": 2,  # vLLM: the model's 16-bit dtype; fp32 configs are cast to 16-bit by default
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "half": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "fp32": 4,
    "float32": 4,
}
_DTYPE_BYTES: Mapping[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1}


class ArchError(ValueError):
    """A model config that cannot be read or lacks a field the estimator needs."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        super().__init__(f"{file}: {key}: {reason}")


def kv_dtype_bytes(kv_dtype: str) -> int:
    """Bytes per KV-cache element for vLLM's ``--kv-cache-dtype`` (``auto`` = 16-bit)."""
    try:
        return _KV_DTYPE_BYTES[kv_dtype.lower()]
    except KeyError:
        known = ", ".join(_KV_DTYPE_BYTES)
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}; known: {known}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelArch:
    """A decoder-only transformer's shape and the counts derived from it."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # q/k head dim (MLA: qk_nope_head_dim + qk_rope_head_dim)
    intermediate_size: int  # dense MLP width
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: str = "bfloat16"
    quantization: str | None = None  # the checkpoint's quantization_config.quant_method
    quant_format: str | None = None  # that config read as a weight format (fp8, int4, ...)
    quant_skipped_params: int = 0  # parameters the checkpoint leaves in 16-bit (not converted)
    sliding_window: int | None = None
    num_sliding_layers: int = 0  # layers that attend within ``sliding_window`` only
    # mixture of experts (num_experts == 0: dense)
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0  # total width of the shared experts
    num_moe_layers: int = 0
    # multi-head latent attention (DeepSeek-V2/V3); None elsewhere
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    # parameter counts
    total_params: int
    active_params: int  # used per token: dense parts + shared + routed-active experts
    embedding_params: int  # the input embedding table (V * H)
    replicated_params: int = 0  # kept whole on every GPU under tensor parallelism
    checked_params: int | None = None  # from the checkpoint beside the config, when present
    params_rel_diff: float | None = None  # (total_params - checked_params) / checked_params
    source: str = field(default="", compare=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def lm_head_params(self) -> int:
        """Parameters of the output projection (shared with the embeddings when tied)."""
        return self.vocab_size * self.hidden_size

    @property
    def active_matmul_params(self) -> int:
        """Parameters a decode token multiplies through: active body plus the lm_head."""
        untied_head = 0 if self.tie_word_embeddings else self.lm_head_params
        return self.active_params - self.embedding_params - untied_head + self.lm_head_params

    def kv_bytes_per_token(self, kv_dtype: str = "auto") -> float:
        """KV-cache bytes one token occupies across all layers (all GPUs together)."""
        return float(self.num_layers * self._kv_elems_per_layer() * kv_dtype_bytes(kv_dtype))

    def kv_bytes_for_context(self, context_tokens: int, kv_dtype: str = "auto") -> float:
        """KV-cache bytes of one sequence of ``context_tokens``; windowed layers hold at most
        ``sliding_window`` tokens."""
        per_layer = self._kv_elems_per_layer() * kv_dtype_bytes(kv_dtype)
        full = self.num_layers - self.num_sliding_layers
        windowed = min(context_tokens, self.sliding_window or context_tokens)
        return float(per_layer * (full * context_tokens + self.num_sliding_layers * windowed))

    def prefill_flops(self, prompt_tokens: int, cached_tokens: int = 0) -> float:
        """FLOPs to prefill ``prompt_tokens`` of which the first ``cached_tokens`` hit the prefix
        cache: matmuls for the new tokens, logits for the last one, causal attention."""
        if cached_tokens < 0 or prompt_tokens < cached_tokens:
            raise ValueError(f"need 0 <= cached_tokens <= prompt_tokens, got {cached_tokens}")
        new = prompt_tokens - cached_tokens
        if new == 0:
            return 0.0
        body = self.active_matmul_params - self.lm_head_params
        linear = 2.0 * body * new + 2.0 * self.lm_head_params
        return linear + self._attn_flops(cached_tokens, new, decode=False)

    def decode_flops_per_token(self, context_tokens: int) -> float:
        """FLOPs to generate one token attending to ``context_tokens`` (itself included)."""
        ctx = max(context_tokens, 1)
        attn = self._attn_flops(ctx - 1, 1, decode=True)
        return 2.0 * self.active_matmul_params + attn

    def prefill_attn_flops_per_pair(self) -> float:
        """Attention FLOPs of one (query, key) pair in a prefill, all layers (QK^T and AV;
        windowed layers counted as full, an upper bound past the window)."""
        if self.kv_lora_rank is not None:
            per_pair = 2 * self.num_heads * (self.head_dim + (self.v_head_dim or 0))
        else:
            per_pair = 4 * self.num_heads * self.head_dim
        return float(per_pair * self.num_layers)

    @property
    def routed_expert_params(self) -> int:
        """Parameters of all routed experts (0 for a dense model)."""
        return (
            self.num_moe_layers
            * self.num_experts
            * 3
            * self.hidden_size
            * (self.moe_intermediate_size)
        )

    def _kv_elems_per_layer(self) -> int:
        if self.kv_lora_rank is not None:
            return self.kv_lora_rank + (self.qk_rope_head_dim or 0)
        return 2 * self.num_kv_heads * self.head_dim

    def _attn_flops(self, start: int, new: int, *, decode: bool) -> float:
        """Attention FLOPs for queries at positions start+1 .. start+new (causal)."""
        if self.kv_lora_rank is not None:
            rope = self.qk_rope_head_dim or 0
            if decode:  # absorbed MLA: scores over the latent + rope, values in the latent
                per_pair = 2 * self.num_heads * (2 * self.kv_lora_rank + rope)
            else:
                per_pair = 2 * self.num_heads * (self.head_dim + (self.v_head_dim or 0))
        else:
            per_pair = 4 * self.num_heads * self.head_dim
        full_layers = self.num_layers - self.num_sliding_layers
        pairs = full_layers * _pairs(start, new, None)
        pairs += self.num_sliding_layers * _pairs(start, new, self.sliding_window)
        return float(per_pair) * pairs


def _pairs(start: int, new: int, window: int | None) -> int:
    """Sum over positions p = start+1 .. start+new of min(p, window): attended keys."""
    if window is None or start + new <= window:
        return new * start + new * (new + 1) // 2
    below = max(0, window - start)  # positions still within the window
    return below * start + below * (below + 1) // 2 + (new - below) * window


def load_model_arch(path: str | Path) -> ModelArch:
    """Read a HF ``config.json`` (the file, or a folder holding it) into a :class:`ModelArch`.

    When the folder also holds safetensors files (or their index), the parameter count is
    cross-checked against them (``checked_params``, ``params_rel_diff``).
    """
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ArchError(str(file), "<file>", f"cannot read: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ArchError(str(file), "<file>", f"invalid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ArchError(str(file), "<root>", "expected a JSON object")
    name = raw.get("_name_or_path") or (file.parent.name if file.name == "config.json" else "")
    arch = parse_config(raw, file=str(file), name=str(name or file.stem))
    if file.name != "config.json":
        return arch
    checked = checkpoint_params(file.parent, arch)
    if checked is None:
        return arch
    return _with_check(arch, checked)


def _with_check(arch: ModelArch, checked: int) -> ModelArch:
    diff = (arch.total_params - checked) / checked if checked else None
    return replace(arch, checked_params=checked, params_rel_diff=diff)


def checkpoint_params(folder: Path, arch: ModelArch) -> int | None:
    """Parameters stored in the safetensors checkpoint in ``folder``, or None if there is none.

    Counts tensor elements from the file headers when every shard is present; otherwise
    divides the index's ``metadata.total_size`` (bytes) by the checkpoint's bytes per value.
    An unreadable index or header is an :class:`ArchError` naming the file.
    """
    files = {f.name: f for f in folder.glob("*.safetensors")}
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
            shards = set(index.get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            raise ArchError(str(index_file), "<file>", f"unreadable index: {exc}") from exc
        if shards and shards <= set(files):
            return sum(safetensors_elements(files[s]) for s in sorted(shards))
        total_size = index.get("metadata", {}).get("total_size")
        if isinstance(total_size, int | float) and total_size > 0:
            per_value = 1 if arch.quantization == "fp8" else _DTYPE_BYTES.get(arch.torch_dtype, 2)
            return int(total_size) // per_value
        return None
    if files:
        return sum(safetensors_elements(f) for f in files.values())
    return None


def safetensors_elements(file: Path) -> int:
    """Number of tensor elements in a safetensors file, read from its header only."""
    try:
        with file.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100_000_000:
                raise ValueError(f"implausible header length {length}")
            header = json.loads(fh.read(length))
        return sum(
            math.prod(int(d) for d in info["shape"])
            for key, info in header.items()
            if key != "__metadata__"
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        raise ArchError(str(file), "<header>", f"unreadable safetensors header: {exc}") from exc


# --- reading config.json ------------------------------------------------------------------
# Below: the per-family knowledge. Defaults are the Hugging Face config classes' own, for the
# fields real checkpoints leave out (Gemma 3's text_config omits vocab_size, for one).


@dataclass(frozen=True, slots=True, kw_only=True)
class _Family:
    qkv_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3, Gemma 3)
    norms_per_layer: int = 2  # Gemma 2/3 add post-attention and post-MLP norms
    defaults: Mapping[str, Any] = field(default_factory=dict)


_GEMMA3 = _Family(
    qk_norm=True,
    norms_per_layer=4,
    defaults={
        "tie_word_embeddings": True,
        "vocab_size": 262208,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 131072,
        "sliding_window": 4096,
        "sliding_window_pattern": 6,
    },
)
_GEMMA = {"tie_word_embeddings": True, "head_dim": 256}
_FAMILIES: Mapping[str, _Family] = {
    "llama": _Family(),
    "mistral": _Family(defaults={"sliding_window": 4096}),
    "mixtral": _Family(),
    "qwen2": _Family(qkv_bias=True),
    "qwen2_moe": _Family(qkv_bias=True),
    "qwen3": _Family(qk_norm=True),
    "qwen3_moe": _Family(qk_norm=True),
    "gemma": _Family(defaults=_GEMMA),
    "gemma2": _Family(norms_per_layer=4, defaults={**_GEMMA, "sliding_window": 4096}),
    "gemma3": _GEMMA3,
    "gemma3_text": _GEMMA3,
    "deepseek_v2": _Family(),
    "deepseek_v3": _Family(),
}


@dataclass(frozen=True, slots=True)
class _Cfg:
    d: Mapping[str, Any]
    file: str
    prefix: str  # "text_config." when the decoder's fields are nested

    def int(self, *keys: str, default: int | None = None) -> int:
        for key in keys:
            value = self.d.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
                raise ArchError(self.file, self.prefix + key, f"expected an integer, got {value!r}")
            if value < 0:
                raise ArchError(self.file, self.prefix + key, f"must be >= 0, got {value!r}")
            return int(value)
        if default is not None:
            return default
        raise ArchError(self.file, self.prefix + keys[0], "missing field needed for the estimate")


def _decoder_fields(raw: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The text decoder's fields: ``text_config`` over the top level for multimodal configs."""
    text = raw.get("text_config")
    if not isinstance(text, Mapping):
        return dict(raw), ""
    outer = {k: v for k, v in raw.items() if not k.endswith("_config") and k != "model_type"}
    merged = {**outer, **text}
    if "model_type" not in text and "model_type" in raw:
        merged["model_type"] = raw["model_type"]
    return merged, "text_config."


def parse_config(raw: Mapping[str, Any], *, file: str, name: str) -> ModelArch:
    """Build a :class:`ModelArch` from a parsed ``config.json`` mapping."""
    fields, prefix = _decoder_fields(raw)
    model_type = str(fields.get("model_type") or "unknown")
    family = _FAMILIES.get(model_type, _Family())
    c = _Cfg({**family.defaults, **fields}, file, prefix)
    hidden = c.int("hidden_size", "n_embd", "d_model")
    heads = c.int("num_attention_heads", "n_head")
    if heads == 0 or hidden == 0:
        raise ArchError(file, prefix + "num_attention_heads", "hidden size and heads must be > 0")
    quant = raw.get("quantization_config")
    arch = ModelArch(
        name=name,
        model_type=model_type,
        hidden_size=hidden,
        num_layers=c.int("num_hidden_layers", "n_layer", "num_layers"),
        num_heads=heads,
        num_kv_heads=c.int("num_key_value_heads", default=heads),
        head_dim=c.int("head_dim", default=hidden // heads),
        intermediate_size=c.int("intermediate_size", "ffn_dim", "n_inner"),
        vocab_size=c.int("vocab_size"),
        max_position_embeddings=c.int(
            "max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"
        ),
        tie_word_embeddings=bool(c.d.get("tie_word_embeddings", False)),
        torch_dtype=str(c.d.get("torch_dtype") or c.d.get("dtype") or "bfloat16"),
        quantization=str(quant["quant_method"]) if isinstance(quant, Mapping) else None,
        total_params=0,
        active_params=0,
        embedding_params=0,
        source=file,
    )
    arch = replace(arch, **_mla_fields(c), **_moe_fields(c, arch), **_sliding_fields(c, arch))
    arch = _with_counts(arch, family, c)
    if isinstance(quant, Mapping):
        fmt, skipped = read_quantization(quant, arch)
        arch = replace(arch, quant_format=fmt, quant_skipped_params=skipped)
    return arch


def _mla_fields(c: _Cfg) -> dict[str, Any]:
    if c.d.get("kv_lora_rank") is None:
        return {}
    nope, rope = c.int("qk_nope_head_dim"), c.int("qk_rope_head_dim")
    q_rank = c.d.get("q_lora_rank")
    return {
        "kv_lora_rank": c.int("kv_lora_rank"),
        "q_lora_rank": None if q_rank is None else c.int("q_lora_rank"),
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": nope,
        "v_head_dim": c.int("v_head_dim"),
        "head_dim": nope + rope,
    }


def _moe_fields(c: _Cfg, arch: ModelArch) -> dict[str, Any]:
    layers = arch.num_layers
    experts = c.int("num_local_experts", "n_routed_experts", "num_experts", default=0)
    if experts == 0:
        return {}
    if c.d.get("n_routed_experts") is not None:  # DeepSeek: dense first k layers
        first_dense = min(c.int("first_k_dense_replace", default=0), layers)
        freq = max(c.int("moe_layer_freq", default=1), 1)
        moe_layers = sum(1 for i in range(first_dense, layers) if i % freq == 0)
        shared = c.int("n_shared_experts", default=0)
        shared_width = shared * c.int("moe_intermediate_size")
    else:  # Mixtral, Qwen MoE: every `decoder_sparse_step`-th layer unless listed dense
        step = max(c.int("decoder_sparse_step", default=1), 1)
        dense = set(c.d.get("mlp_only_layers") or ())
        moe_layers = sum(1 for i in range(layers) if (i + 1) % step == 0 and i not in dense)
        shared_width = c.int("shared_expert_intermediate_size", default=0)
        shared = 1 if shared_width else 0
    return {
        "num_experts": experts,
        "experts_per_token": c.int("num_experts_per_tok"),
        "moe_intermediate_size": c.int("moe_intermediate_size", "intermediate_size"),
        "num_shared_experts": shared,
        "shared_expert_intermediate_size": shared_width,
        "num_moe_layers": moe_layers,
    }


def _sliding_fields(c: _Cfg, arch: ModelArch) -> dict[str, Any]:
    window = c.d.get("sliding_window")
    layers, kind = arch.num_layers, arch.model_type
    if not window or kind == "gemma":
        return {}
    types = c.d.get("layer_types")
    if isinstance(types, list):
        count = sum(1 for t in types if t == "sliding_attention")
    elif kind.startswith(("qwen2", "qwen3")):
        use = bool(c.d.get("use_sliding_window", False))
        count = max(layers - c.int("max_window_layers", default=layers), 0) if use else 0
    elif kind == "gemma2":
        count = (layers + 1) // 2  # even-indexed layers are local
    elif kind.startswith("gemma3"):
        pattern = c.int("sliding_window_pattern", "_sliding_window_pattern", default=6)
        count = sum(1 for i in range(layers) if (i + 1) % pattern != 0) if pattern > 1 else 0
    else:
        count = layers  # Mistral: every layer
    if count == 0:
        return {}
    return {"sliding_window": c.int("sliding_window"), "num_sliding_layers": count}


def _attention_params(arch: ModelArch, family: _Family, c: _Cfg) -> tuple[int, int]:
    """(parameters, of which replicated under TP) of one attention block, norms included."""
    h, hidden = arch.num_heads, arch.hidden_size
    norms = family.norms_per_layer * hidden
    if arch.kv_lora_rank is not None:
        rope, v_dim, kv_rank = arch.qk_rope_head_dim or 0, arch.v_head_dim or 0, arch.kv_lora_rank
        q_rank, qk = arch.q_lora_rank, arch.head_dim
        q = hidden * h * qk if q_rank is None else hidden * q_rank + q_rank + q_rank * h * qk
        q_down = 0 if q_rank is None else hidden * q_rank + q_rank
        kv_down = hidden * (kv_rank + rope) + kv_rank
        kv_up = kv_rank * h * (qk - rope + v_dim)
        return q + kv_down + kv_up + h * v_dim * hidden + norms, q_down + kv_down + norms
    q, kv = h * arch.head_dim, arch.num_kv_heads * arch.head_dim
    params = hidden * (q + 2 * kv) + q * hidden + norms
    if family.qkv_bias or c.d.get("attention_bias"):
        params += q + 2 * kv
    if c.d.get("attention_bias"):  # Llama's flag also puts a bias on o_proj
        params += hidden
    if family.qk_norm:
        params += 2 * arch.head_dim
    return params, norms


def _with_counts(arch: ModelArch, family: _Family, c: _Cfg) -> ModelArch:
    hidden, layers = arch.hidden_size, arch.num_layers
    attn, attn_replicated = _attention_params(arch, family, c)
    dense_mlp = 3 * hidden * arch.intermediate_size
    expert = 3 * hidden * arch.moe_intermediate_size
    router = hidden * arch.num_experts
    if c.d.get("topk_method") == "noaux_tc":  # DeepSeek-V3's e_score_correction_bias
        router += arch.num_experts
    shared = 3 * hidden * arch.shared_expert_intermediate_size
    if arch.shared_expert_intermediate_size and arch.model_type == "qwen2_moe":
        shared += hidden  # shared_expert_gate
    moe_common = router + shared
    dense_layers = layers - arch.num_moe_layers
    embed = arch.vocab_size * hidden
    outer = embed + (0 if arch.tie_word_embeddings else embed) + hidden  # + final norm
    body = layers * attn + dense_layers * dense_mlp
    moe = arch.num_moe_layers
    total = outer + body + moe * (arch.num_experts * expert + moe_common)
    active = outer + body + moe * (arch.experts_per_token * expert + moe_common)
    replicated = layers * attn_replicated + moe * router + hidden
    return replace(
        arch,
        total_params=total,
        active_params=active,
        embedding_params=embed,
        replicated_params=replicated,
    )


# --- quantization_config ------------------------------------------------------------------


def module_params(arch: ModelArch) -> list[tuple[str, int]]:
    """Linear modules by their Hugging Face names (Llama-style layout) and parameter counts,
    for matching ``modules_to_not_convert`` / ``ignore`` lists. Routed experts are one module
    per layer (``model.layers.N.mlp.experts``); the router is ``model.layers.N.mlp.gate``."""
    h, hidden = arch.num_heads, arch.hidden_size
    q, kv = h * arch.head_dim, arch.num_kv_heads * arch.head_dim
    out: list[tuple[str, int]] = []
    first_moe = arch.num_layers - arch.num_moe_layers
    for i in range(arch.num_layers):
        pre = f"model.layers.{i}"
        if arch.kv_lora_rank is None:
            attn = f"{pre}.self_attn"
            out += [(f"{attn}.q_proj", hidden * q), (f"{attn}.k_proj", hidden * kv),
                    (f"{attn}.v_proj", hidden * kv), (f"{attn}.o_proj", q * hidden)]  # fmt: skip
        if arch.num_moe_layers and i >= first_moe:
            out.append((f"{pre}.mlp.experts", 3 * hidden * arch.moe_intermediate_size
                        * arch.num_experts))  # fmt: skip
            out.append((f"{pre}.mlp.gate", hidden * arch.num_experts))
            if arch.shared_expert_intermediate_size:
                out.append((f"{pre}.mlp.shared_expert", 3 * hidden
                            * arch.shared_expert_intermediate_size))  # fmt: skip
        else:
            mlp = hidden * arch.intermediate_size
            out += [(f"{pre}.mlp.gate_proj", mlp), (f"{pre}.mlp.up_proj", mlp),
                    (f"{pre}.mlp.down_proj", mlp)]  # fmt: skip
    return out


def _format_of(q: Mapping[str, Any]) -> str | None:
    method = str(q.get("quant_method", "")).lower()
    if method in ("fp8", "fbgemm_fp8", "modelopt") or "fp8" in str(q.get("quant_algo", "")).lower():
        return "fp8"
    if method in ("gptq", "awq", "gptq_marlin", "awq_marlin"):
        return "int4" if int(q.get("bits", 4) or 4) == 4 else "w8a16"
    if method == "compressed-tensors":
        for group in (q.get("config_groups") or {}).values():
            w = group.get("weights") or {} if isinstance(group, Mapping) else {}
            bits, kind = int(w.get("num_bits", 16) or 16), str(w.get("type", "int"))
            acts = group.get("input_activations") if isinstance(group, Mapping) else None
            if bits == 8 and kind == "float":
                return "fp8"
            if bits == 8:
                return "int8" if acts else "w8a16"
            if bits == 4:
                return "int4"
    return None


def _skipped(patterns: list[str], modules: list[tuple[str, int]]) -> int:
    """Parameters of the modules a not-convert / ignore list names: exact names or prefixes
    (``model.layers.0``), ``re:`` regular expressions (compressed-tensors)."""
    plain = [p for p in patterns if not p.startswith("re:")]
    regex = [re.compile(p[3:]) for p in patterns if p.startswith("re:")]
    total = 0
    for name, n in modules:
        hit = any(name == p or name.startswith(p + ".") for p in plain)
        if hit or any(r.fullmatch(name) or r.fullmatch(name + ".weight") for r in regex):
            total += n
    return total


def read_quantization(q: Mapping[str, Any], arch: ModelArch) -> tuple[str | None, int]:
    """``(format, parameters left in 16-bit)`` from a checkpoint's ``quantization_config``:
    ``quant_method`` fp8 / fbgemm_fp8 / modelopt FP8 / GPTQ / AWQ / compressed-tensors
    (``config_groups``) and the modules it leaves unconverted (``modules_to_not_convert``,
    ``ignore``, ``ignored_layers``; the lm_head is 16-bit anyway and not counted)."""
    patterns: list[str] = []
    for key in ("modules_to_not_convert", "ignore", "ignored_layers", "exclude_modules"):
        value = q.get(key)
        if isinstance(value, list):
            patterns += [str(v) for v in value if str(v) != "lm_head"]
    skipped = _skipped(patterns, module_params(arch)) if patterns else 0
    return _format_of(q), skipped
