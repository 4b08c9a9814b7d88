"""GPU memory of a deployment: weights, runtime overheads, KV cache, OOM risk.

Each engine sizes its KV cache its own way (``estimator.engines``, ``MemorySemantics``):
vLLM and SGLang give it a fraction of the *total* memory less weights and runtime (vLLM
subtracts its profile run's peaks; SGLang's ``mem_fraction_static`` covers weights and pool),
TensorRT-LLM a fraction of the memory *free after* weights and activations
(``kv_cache_free_gpu_mem_fraction``), vLLM's CPU build a fixed ``VLLM_CPU_KVCACHE_SPACE``
(no GPU memory arithmetic: :func:`cpu_plan`), llama.cpp a fixed ``-c`` tokens. What follows
is vLLM's, the default engine. Mixed-precision checkpoints: the parameters a checkpoint's
``quantization_config`` leaves unconverted (``modules_to_not_convert``, ``ignore``) are
counted at 16 bits. Attention data parallel (``attention_dp``): whole attention weights on
every GPU, each GPU the whole KV of its own sequences.

This module runs past 400 lines: the engines' sizing rules sit beside the one plan they fill.

Weights (``weight_bytes``)::

    bytes = quantized_params * bytes_per_param(quant) + embeddings_and_lm_head * 2

with ``bytes_per_param`` from :data:`estimator.catalog.QUANTIZATIONS`: bf16/fp16 2; fp8 1;
int8 1 + 4/H (one fp32 scale per output channel, H = input width ~ hidden size); int4
GPTQ/AWQ 0.5 + 2.5/128 = 0.5195 (per group of 128 input rows and per output column an fp16
scale and a packed 4-bit zero point). Embeddings and lm_head stay 16-bit for every quantized
format (vLLM does not quantize them). Under tensor parallelism ``tp`` every sharded weight is
split by ``tp`` (embeddings and lm_head too: vLLM shards the vocabulary); norms, MoE routers
and MLA's down-projections stay whole on every GPU, and when ``tp`` exceeds the KV heads each
GPU keeps one whole KV head.

Per GPU, vLLM (V1's profiler) gives the KV cache what is left of
``gpu_memory_utilization * memory`` (memory as the driver reports it) after::

    weights + activation peak + CUDA graphs + non-torch memory

- activation peak: the profile run's forward pass over ``max_num_batched_tokens`` tokens, per
  token 2 bytes * (3*H residual/norm/output copies + the wider of the attention (q, k, v, o)
  and MLP (gate+up, activation) widths / tp [+ k*H for MoE]), *plus* the sampler's dummy run,
  ``max_num_seqs * vocab * 16 bytes`` (fp32 logits, fp32 probabilities and int64 sort
  indices for top-k/top-p): V1 profiles both in one run and both peaks stay allocated (issue
  14: taking the larger one under-counted a large FP8 MoE by GiBs); plus, for MoE, the fused
  kernel's intermediate caches (``M * topk * (max(2N, H) + N)`` 16-bit values).
- CUDA graphs: 256 MiB + the activations of the largest captured batch
  (``min(max_num_seqs, 512)`` tokens); vLLM profiles and subtracts this by default.
- non-torch: 128 MiB (cuBLAS workspaces and the like), + 512 MiB with tp > 1 (NCCL and
  custom all-reduce buffers). The CUDA context lives in the ``1 - utilization`` slack.

``max_num_batched_tokens`` and ``max_num_seqs`` default to what vLLM's OpenAI server picks
for the GPU (:func:`vllm_default_limits`): 16384 / 1024 on GPUs with >= 160 GiB, 8192 / 1024
on >= 70 GiB GPUs other than the A100, 2048 / 256 elsewhere.

These overheads are estimates read from vLLM's profiler code, not yet measured against a GPU
vLLM (expect errors up to about a GiB per GPU); the KV figure is what they leave. (The CPU
backend's sizing, :func:`cpu_plan`, matches a real vllm-cpu 0.32.0 server block for block.)
KV capacity::

    kv_bytes_per_token_per_gpu = kv_bytes_per_token * ceil(kv_heads / tp) / kv_heads
                                 (MLA: the whole latent on every GPU)
    num_blocks = kv_bytes_per_gpu // (block_size * kv_bytes_per_token_per_gpu)
    kv_capacity_tokens = num_blocks * block_size   (tokens for the whole deployment)

Every GPU holds a slice of every token, so the deployment's capacity is one GPU's. Windowed
(sliding) layers are counted at full cost in ``kv_capacity_tokens`` (a lower bound);
:func:`max_concurrent_seqs` caps them at the window. (For models mixing windowed and full
layers vLLM's block is one layer group's page, so its ``num_gpu_blocks`` is this
``num_blocks`` times the number of groups; the bytes agree.)

Risk (``oom_risk`` and ``reasons``): ``certain`` when vLLM would not start (weights and runtime
exceed the budget, the KV cache holds less than one ``max_model_len`` sequence, the heads do
not split over ``tp``); ``high`` when ``gpu_memory_utilization > 0.95``; ``low`` when the KV
cache cannot hold ``max_num_seqs`` sequences of ``typical_context_tokens`` (preemption under
full load); else ``none``. ``headroom_bytes`` is the KV memory per GPU beyond one
``max_model_len`` sequence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from estimator.catalog import QUANTIZATIONS, GpuSpec, Quantization, get_quantization
from estimator.engines import (
    DEFAULT_ENGINE,
    EngineProfile,
    MemorySemantics,
    get_profile,
    memory_semantics,
)
from estimator.engines import default_limits as engine_limits
from estimator.modelarch import ModelArch, module_params

__all__ = [
    "QUANTIZATIONS",
    "MemoryPlan",
    "Quantization",
    "checkpoint_quant",
    "cpu_plan",
    "kv_bytes_per_token_per_gpu",
    "max_concurrent_seqs",
    "plan_memory",
    "routed_expert_bytes",
    "vllm_default_limits",
    "weight_bytes",
]

MIB = 1 << 20
GIB = 1 << 30
_GRAPH_FIXED_BYTES = 256 * MIB
_MAX_GRAPH_BATCH = 512
_NON_TORCH_BYTES = 128 * MIB
_NCCL_BYTES = 512 * MIB
_SAMPLER_BYTES_PER_LOGIT = 16  # fp32 logits + fp32 probabilities + int64 sort indices
_TYPICAL_CONTEXT = 2048  # default "typical" sequence length for the preemption check
_FUSED_MOE_CHUNK = 32768  # vLLM's VLLM_FUSED_MOE_CHUNK_SIZE: tokens per fused-MoE call


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryPlan:
    """How one deployment (``tp`` GPUs serving one model replica) uses memory, per GPU."""

    gpu: str  # catalog key
    tp: int
    quant: str
    kv_dtype: str
    gpu_memory_utilization: float
    block_size: int
    max_num_seqs: int
    max_model_len: int
    max_num_batched_tokens: int
    typical_context_tokens: int
    memory_bytes: int  # one GPU's memory
    budget_bytes_per_gpu: int  # gpu_memory_utilization * memory_bytes
    weight_bytes_per_gpu: int
    activation_bytes_per_gpu: int
    cuda_graph_bytes_per_gpu: int
    non_torch_bytes_per_gpu: int
    kv_bytes_per_gpu: int  # what is left for the KV cache (0 when nothing is)
    kv_bytes_per_token_per_gpu: float
    kv_capacity_tokens: int  # the whole deployment
    num_blocks: int
    sliding_window: int | None = None
    sliding_kv_fraction: float = 0.0  # share of KV bytes in windowed layers
    seqs_at_typical_context: int  # sequences of typical_context_tokens that fit at once
    fits: bool  # vLLM would start: weights fit and KV holds one max_model_len sequence
    headroom_bytes: int  # KV bytes per GPU beyond one max_model_len sequence (< 0: no fit)
    oom_risk: str  # "none", "low", "high" or "certain"
    reasons: tuple[str, ...] = ()


_CHECKPOINT_QUANT = {"fp8": "fp8", "gptq": "int4", "awq": "int4", "gptq_marlin": "int4"}


def checkpoint_quant(arch: ModelArch) -> str:
    """The weight format a checkpoint ships in, from its ``quantization_config`` (fp8,
    fbgemm_fp8, modelopt FP8 -> ``fp8``; GPTQ/AWQ -> ``int4``; compressed-tensors by its
    config groups); ``auto`` (16-bit) when none or not recognised."""
    if arch.quant_format:
        return arch.quant_format
    return _CHECKPOINT_QUANT.get((arch.quantization or "").lower(), "auto")


def _mixed_extra(arch: ModelArch, q: Quantization) -> float:
    """Extra bytes of the parameters a checkpoint in format ``q`` leaves in 16-bit
    (``modules_to_not_convert`` / ``ignore``): only when ``q`` is the checkpoint's own format
    (quantizing at load time converts every linear layer)."""
    if not arch.quant_skipped_params or arch.quant_format is None:
        return 0.0
    if get_quantization(arch.quant_format).name != q.name:
        return 0.0
    return arch.quant_skipped_params * (2.0 - q.bytes_per_param(arch.hidden_size))


def routed_expert_bytes(arch: ModelArch, quant: str = "bf16", *, tp: int = 1) -> float:
    """Bytes of routed-expert weights on one GPU (split over ``tp`` GPUs, by tensor or expert
    parallelism alike); 0 for a dense model."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    q = get_quantization(quant)
    return arch.routed_expert_params * q.bytes_per_param(arch.hidden_size) / tp


def weight_bytes(
    arch: ModelArch, quant: str = "bf16", *, tp: int = 1, attention_dp: bool = False
) -> int:
    """Bytes of weights on one GPU of a ``tp``-way tensor-parallel deployment (tp=1: total).
    ``attention_dp``: attention data parallel (TensorRT-LLM ``enable_attention_dp``, SGLang
    ``--enable-dp-attention``): every GPU keeps whole attention weights, the rest is split."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    q = get_quantization(quant)
    per_param = q.bytes_per_param(arch.hidden_size)
    outer = arch.embedding_params + (0 if arch.tie_word_embeddings else arch.lm_head_params)
    outer_bytes = outer * (2.0 if q.embeddings_16bit else per_param)
    body = arch.total_params - outer
    replicated = min(arch.replicated_params, body)
    per_gpu = (body - replicated) * per_param / tp + replicated * per_param + outer_bytes / tp
    per_gpu += _kv_proj_replication(arch, tp) * per_param
    per_gpu += _mixed_extra(arch, q) / tp
    if attention_dp and tp > 1:
        per_gpu += attention_params(arch) * per_param * (1.0 - 1.0 / tp)
    return math.ceil(per_gpu)


def attention_params(arch: ModelArch) -> int:
    """Parameters of the attention projections of all layers (q, k, v, o)."""
    return sum(n for name, n in module_params(arch) if ".self_attn." in name)


def _kv_proj_replication(arch: ModelArch, tp: int) -> float:
    """Extra k/v projection parameters per GPU when tp exceeds the KV heads (one whole head
    per GPU instead of a fraction)."""
    if arch.is_mla or tp <= arch.num_kv_heads:
        return 0.0
    per_head = 2 * arch.hidden_size * arch.head_dim * arch.num_layers
    return per_head * (1.0 - arch.num_kv_heads / tp)


def kv_bytes_per_token_per_gpu(
    arch: ModelArch, kv_dtype: str = "auto", *, tp: int = 1, attention_dp: bool = False
) -> float:
    """KV bytes one token takes on each GPU: KV heads split by tp (at least one per GPU);
    MLA's latent is whole on every GPU. With ``attention_dp`` each GPU holds the whole KV of
    its own sequences: per token of the deployment, ``1 / tp`` of the full bytes per GPU."""
    full = arch.kv_bytes_per_token(kv_dtype)
    if attention_dp:
        return full / tp
    if arch.is_mla:
        return full
    heads = arch.num_kv_heads
    return full * math.ceil(heads / tp) / heads


def vllm_default_limits(gpu: GpuSpec) -> tuple[int, int]:
    """``(max_num_batched_tokens, max_num_seqs)`` that vLLM's OpenAI server picks for ``gpu``
    (``EngineArgs.get_batch_defaults``; the vllm engine profile's limits)."""
    lim = engine_limits(get_profile("vllm"), gpu)
    return lim.max_num_batched_tokens, lim.max_num_seqs


def _activation_per_token(arch: ModelArch, tp: int) -> float:
    """Bytes of live activations per batched token at the forward pass's peak, per GPU."""
    h, d = arch.num_heads, arch.head_dim
    if arch.is_mla:
        latent = (arch.kv_lora_rank or 0) + (arch.qk_rope_head_dim or 0)
        v = arch.v_head_dim or 0
        attn = h * d + latent + h * (d - (arch.qk_rope_head_dim or 0) + v) + h * v
    else:
        attn = (2 * h + 2 * arch.num_kv_heads) * d
    dense_width = arch.intermediate_size if arch.num_moe_layers < arch.num_layers else 0
    moe_width = arch.experts_per_token * arch.moe_intermediate_size
    moe_width += arch.shared_expert_intermediate_size
    mlp = 3 * max(dense_width, moe_width)
    moe_out = arch.experts_per_token * arch.hidden_size * (1 if arch.is_moe else 0)
    return 2.0 * (3 * arch.hidden_size + max(attn, mlp) / tp + moe_out)


def _moe_workspace(arch: ModelArch, tp: int, tokens: int) -> int:
    """Fused-MoE intermediate caches for ``tokens`` batched tokens (vLLM's triton kernel:
    ``M * topk * (max(2 N, H) + N)`` 16-bit values, ``N`` the expert width per GPU)."""
    if not arch.is_moe:
        return 0
    n = arch.moe_intermediate_size / tp
    m = min(tokens, _FUSED_MOE_CHUNK)
    return math.ceil(m * arch.experts_per_token * (max(2 * n, arch.hidden_size) + n) * 2)


def _runtime_bytes(
    arch: ModelArch,
    *,
    tp: int,
    batched_tokens: int,
    max_num_seqs: int,
    sem: MemorySemantics | None = None,
    enforce_eager: bool = False,
) -> tuple[int, int, int]:
    """(activation peak, CUDA graphs, non-torch) bytes per GPU under the engine's memory
    semantics (vLLM's by default)."""
    sem = sem or get_profile(DEFAULT_ENGINE).memory
    per_token = _activation_per_token(arch, tp)
    activation = 0
    if sem.profiles_activations:
        forward = batched_tokens * per_token
        sampler = max_num_seqs * arch.vocab_size * _SAMPLER_BYTES_PER_LOGIT
        peak = forward + sampler if sem.sums_sampler_and_forward else max(forward, sampler)
        if sem.moe_workspace:
            peak += _moe_workspace(arch, tp, batched_tokens)
        activation = math.ceil(peak)
    graphs = 0
    if sem.cuda_graph_bytes and not enforce_eager:
        graphs = math.ceil(sem.cuda_graph_bytes + min(max_num_seqs, _MAX_GRAPH_BATCH) * per_token)
    non_torch = sem.non_torch_bytes + (_NCCL_BYTES if tp > 1 and sem.non_torch_bytes else 0)
    return activation, graphs, non_torch


def _sliding_fraction(arch: ModelArch) -> float:
    if not arch.sliding_window or arch.num_layers == 0:
        return 0.0
    return arch.num_sliding_layers / arch.num_layers


def _effective_blocks(
    ctx: npt.NDArray[np.int64], *, block_size: int, window: int | None, fraction: float
) -> npt.NDArray[np.float64]:
    """KV blocks per sequence, windowed layers capped at the window, in full-layer blocks."""
    full = np.ceil(ctx / block_size)
    if window is None or fraction == 0.0:
        return full
    capped = np.ceil(np.minimum(ctx, window) / block_size)
    return full * (1.0 - fraction) + capped * fraction


def _seqs_fitting(
    ctx: npt.NDArray[np.int64],
    *,
    num_blocks: int,
    block_size: int,
    max_num_seqs: int,
    window: int | None,
    fraction: float,
) -> int:
    blocks = _effective_blocks(ctx, block_size=block_size, window=window, fraction=fraction)
    mean = float(blocks.mean())
    if mean <= 0.0:
        return max_num_seqs
    return int(min(math.floor(num_blocks / mean + 1e-9), max_num_seqs))


def max_concurrent_seqs(plan: MemoryPlan, context_tokens: npt.ArrayLike | Sequence[int]) -> int:
    """How many sequences drawn from the ``context_tokens`` mix fit in the KV cache at once.

    Each sequence takes whole blocks (``ceil(context / block_size)``, windowed layers capped at
    the window); the count is ``num_blocks / mean blocks per sequence``, capped at
    ``max_num_seqs``.
    """
    ctx = np.asarray(context_tokens, dtype=np.int64).ravel()
    if ctx.size == 0:
        raise ValueError("context_tokens is empty")
    if (ctx < 0).any():
        raise ValueError("context_tokens must be >= 0")
    return _seqs_fitting(
        ctx,
        num_blocks=plan.num_blocks,
        block_size=plan.block_size,
        max_num_seqs=plan.max_num_seqs,
        window=plan.sliding_window,
        fraction=plan.sliding_kv_fraction,
    )


def _check_args(arch: ModelArch, tp: int, util: float, block_size: int, max_num_seqs: int) -> None:
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    if not 0.0 < util <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util}")
    if block_size < 1 or max_num_seqs < 1:
        raise ValueError(f"block_size and max_num_seqs must be >= 1 ({block_size}, {max_num_seqs})")


def plan_memory(
    arch: ModelArch,
    gpu: GpuSpec,
    *,
    tp: int = 1,
    quant: str = "bf16",
    kv_dtype: str = "auto",
    gpu_memory_utilization: float | None = None,
    max_num_seqs: int | None = None,
    max_model_len: int | None = None,
    max_num_batched_tokens: int | None = None,
    block_size: int | None = None,
    typical_context_tokens: int | None = None,
    engine: str | EngineProfile = DEFAULT_ENGINE,
    enforce_eager: bool = False,
    kv_cache_space_bytes: int | None = None,
    kv_cache_tokens: int | None = None,
    attention_dp: bool = False,
) -> MemoryPlan:
    """Plan one deployment's memory as ``engine`` would size it (module docstring; vLLM by
    default). Longer than ~50 lines only by the flat constructor call at its end.

    ``gpu_memory_utilization`` is the engine's memory fraction (vLLM's
    ``gpu_memory_utilization``, SGLang's ``mem_fraction_static``, TensorRT-LLM's
    ``kv_cache_free_gpu_mem_fraction``: a fraction of the memory *free after* weights and
    activations); None: the engine's default. On a CPU entry the engine's CPU build is planned
    (vLLM: ``kv_cache_space_bytes``, default ``VLLM_CPU_KVCACHE_SPACE`` = 4 GiB; no GPU memory
    arithmetic); ``kv_cache_tokens`` sets a fixed-token KV cache (llama.cpp's ``-c``);
    ``attention_dp``: attention data parallel (whole attention weights on every GPU, each
    GPU the full KV of its own sequences).
    ``max_model_len`` defaults to, and is capped at, the model's ``max_position_embeddings``;
    ``max_num_batched_tokens``, ``max_num_seqs`` and ``block_size`` to the engine's defaults
    for the GPU; ``typical_context_tokens`` (for the preemption check) to
    ``min(max_model_len, 2048)``.
    """
    profile = get_profile(engine)
    sem = memory_semantics(profile, gpu)
    limits = engine_limits(profile, gpu)
    max_num_seqs = max_num_seqs or limits.max_num_seqs
    block_size = block_size if block_size is not None else limits.block_size
    if sem.kv_budget == "fixed_space":
        space = kv_cache_space_bytes
        return cpu_plan(arch, kv_cache_space_bytes=space if space is not None
                        else int(sem.default_space_gib * GIB), block_size=block_size,
                        kv_dtype=kv_dtype, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                        max_num_batched_tokens=max_num_batched_tokens
                        or limits.max_num_batched_tokens)  # fmt: skip
    util = gpu_memory_utilization if gpu_memory_utilization is not None else sem.default_fraction
    _check_args(arch, tp, util, block_size, max_num_seqs)
    # vLLM refuses a longer max_model_len (unless VLLM_ALLOW_LONG_MAX_MODEL_LEN): plan the
    # longest it would accept, visible in the plan's max_model_len.
    max_len = min(max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)
    batched = max_num_batched_tokens or limits.max_num_batched_tokens
    typical = typical_context_tokens or min(max_len, _TYPICAL_CONTEXT)
    weights = weight_bytes(arch, quant, tp=tp, attention_dp=attention_dp)
    activation, graphs, non_torch = _runtime_bytes(arch, tp=tp, batched_tokens=batched,
                                                   max_num_seqs=max_num_seqs, sem=sem,
                                                   enforce_eager=enforce_eager)  # fmt: skip
    per_token = kv_bytes_per_token_per_gpu(arch, kv_dtype, tp=tp, attention_dp=attention_dp)
    runtime = weights + activation + graphs + non_torch
    if sem.kv_budget == "fraction_of_free":
        budget = gpu.memory_bytes
        kv_bytes = max(int(util * (gpu.memory_bytes - runtime)), 0)
    elif sem.kv_budget == "fixed_tokens":
        budget = gpu.memory_bytes
        tokens = kv_cache_tokens or sem.default_tokens
        kv_bytes = int(min(tokens * per_token, max(budget - runtime, 0)))
    else:
        budget = int(util * gpu.memory_bytes)
        kv_bytes = max(budget - runtime, 0)
    return _finish_plan(
        arch,
        MemoryPlan(
            gpu=gpu.key,
            tp=tp,
            quant=quant,
            kv_dtype=kv_dtype,
            gpu_memory_utilization=util,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_model_len=max_len,
            max_num_batched_tokens=batched,
            typical_context_tokens=typical,
            memory_bytes=gpu.memory_bytes,
            budget_bytes_per_gpu=budget,
            weight_bytes_per_gpu=weights,
            activation_bytes_per_gpu=activation,
            cuda_graph_bytes_per_gpu=graphs,
            non_torch_bytes_per_gpu=non_torch,
            kv_bytes_per_gpu=kv_bytes,
            kv_bytes_per_token_per_gpu=per_token,
            kv_capacity_tokens=0,
            num_blocks=0,
            seqs_at_typical_context=0,
            fits=False,
            headroom_bytes=0,
            oom_risk="certain",
        ),
    )


def _finish_plan(arch: ModelArch, plan: MemoryPlan) -> MemoryPlan:
    """Fill in the KV capacity, fit, headroom and risk of a plan whose budget is known."""
    per_block = plan.block_size * plan.kv_bytes_per_token_per_gpu
    num_blocks = int(plan.kv_bytes_per_gpu // per_block) if per_block > 0 else 0
    window, fraction = arch.sliding_window, _sliding_fraction(arch)
    typical = np.array([plan.typical_context_tokens], dtype=np.int64)
    seqs = _seqs_fitting(
        typical,
        num_blocks=num_blocks,
        block_size=plan.block_size,
        max_num_seqs=plan.max_num_seqs,
        window=window,
        fraction=fraction,
    )
    one_seq = math.ceil(plan.max_model_len / plan.block_size) * per_block
    plan = replace(
        plan,
        num_blocks=num_blocks,
        kv_capacity_tokens=num_blocks * plan.block_size,
        sliding_window=window,
        sliding_kv_fraction=fraction,
        seqs_at_typical_context=seqs,
        headroom_bytes=math.floor(plan.kv_bytes_per_gpu - one_seq),
    )
    risk, reasons = _assess(arch, plan)
    return replace(plan, oom_risk=risk, reasons=reasons, fits=risk != "certain")


def _assess(arch: ModelArch, p: MemoryPlan) -> tuple[str, tuple[str, ...]]:
    """OOM risk level and the reasons behind it."""
    certain: list[str] = []
    other: list[str] = []
    need = (
        p.weight_bytes_per_gpu
        + p.activation_bytes_per_gpu
        + p.cuda_graph_bytes_per_gpu
        + p.non_torch_bytes_per_gpu
    )
    if need > 0 and need >= p.budget_bytes_per_gpu:
        certain.append(
            f"weights ({p.weight_bytes_per_gpu / GIB:.2f} GiB/GPU) + runtime "
            f"({(need - p.weight_bytes_per_gpu) / GIB:.2f} GiB) exceed the budget "
            f"{p.budget_bytes_per_gpu / GIB:.2f} GiB ({p.gpu_memory_utilization:g} x memory)"
        )
    elif p.kv_capacity_tokens < p.max_model_len:
        certain.append(
            f"KV cache holds {p.kv_capacity_tokens} tokens, less than one max_model_len "
            f"({p.max_model_len}) sequence: vLLM refuses to start"
        )
    if arch.num_heads % p.tp:
        certain.append(f"{arch.num_heads} attention heads do not split over tp={p.tp}")
    if p.gpu_memory_utilization > 0.95:
        other.append(
            f"gpu_memory_utilization {p.gpu_memory_utilization:g} > 0.95 leaves too little for "
            "allocator fragmentation and other processes"
        )
    if not certain and p.seqs_at_typical_context < p.max_num_seqs:
        other.append(
            f"KV holds {p.seqs_at_typical_context} sequences of {p.typical_context_tokens} "
            f"tokens, fewer than max_num_seqs={p.max_num_seqs}: preemption under full load"
        )
    if certain:
        return "certain", tuple(certain + other)
    if p.gpu_memory_utilization > 0.95:
        return "high", tuple(other)
    return ("low" if other else "none"), tuple(other)


def cpu_plan(
    arch: ModelArch,
    *,
    kv_cache_space_bytes: int,
    block_size: int = 128,
    kv_dtype: str = "auto",
    max_num_seqs: int = 128,
    max_model_len: int | None = None,
    max_num_batched_tokens: int = 2048,
) -> MemoryPlan:
    """The KV cache of vLLM's CPU backend, sized by ``VLLM_CPU_KVCACHE_SPACE`` (GiB) rather than
    by a memory fraction: ``num_blocks = space // (block_size * kv_bytes_per_token)``; this is
    the ``num_gpu_blocks`` a vLLM CPU server reports in ``cache_config_info``.

    Defaults are the CPU backend's own: block_size 128, max_num_seqs 128 (OpenAI server).
    """
    if kv_cache_space_bytes < 0:
        raise ValueError(f"kv_cache_space_bytes must be >= 0, got {kv_cache_space_bytes}")
    _check_args(arch, 1, 1.0, block_size, max_num_seqs)
    max_len = max_model_len or arch.max_position_embeddings
    plan = MemoryPlan(
        gpu="cpu",
        tp=1,
        quant="auto",
        kv_dtype=kv_dtype,
        gpu_memory_utilization=1.0,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_model_len=max_len,
        max_num_batched_tokens=max_num_batched_tokens,  # 2048: the CPU OpenAI server's default
        typical_context_tokens=min(max_len, _TYPICAL_CONTEXT),
        memory_bytes=kv_cache_space_bytes,
        budget_bytes_per_gpu=kv_cache_space_bytes,
        weight_bytes_per_gpu=0,  # weights live outside the KV space on CPU
        activation_bytes_per_gpu=0,
        cuda_graph_bytes_per_gpu=0,
        non_torch_bytes_per_gpu=0,
        kv_bytes_per_gpu=kv_cache_space_bytes,
        kv_bytes_per_token_per_gpu=arch.kv_bytes_per_token(kv_dtype),
        kv_capacity_tokens=0,
        num_blocks=0,
        seqs_at_typical_context=0,
        fits=False,
        headroom_bytes=0,
        oom_risk="certain",
    )
    return _finish_plan(arch, plan)
