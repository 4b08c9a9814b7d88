"""Engine limits for the simulator, from what the engine exposes, else its profile's defaults.

The engine is the authority on its own limits: vLLM exports ``vllm:cache_config_info``
(``block_size``, ``num_gpu_blocks``) and, in newer versions, ``max_num_seqs``; TensorRT-LLM
and SGLang log theirs at start-up. :func:`engine_limits` takes whatever of those is known and
fills the rest from the engine profile's defaults for the device (``estimator.engines``:
e.g. vLLM's CPU build runs 128 sequences in blocks of 128 tokens, its KV cache sized by
``VLLM_CPU_KVCACHE_SPACE``, never by a GPU memory fraction), and from a memory plan for the KV
capacity when the engine did not say. Each value's origin is returned beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from estimator.catalog import GpuSpec
from estimator.engines import (
    DEFAULT_ENGINE,
    EngineProfile,
    LimitDefaults,
    default_limits,
    get_profile,
)
from estimator.memory import MemoryPlan
from estimator.simulate import EngineLimits


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedLimits:
    """The limits and where each came from (``engine``, ``profile``, ``plan`` or ``caller``)."""

    limits: EngineLimits
    origin: dict[str, str]


def assumed_limits(
    engine: str | EngineProfile = DEFAULT_ENGINE, gpu: GpuSpec | None = None
) -> LimitDefaults:
    """The engine's default limits on ``gpu``; its profile's general ones when the GPU is
    unknown (vLLM: 256 sequences, 2048 batched tokens)."""
    profile = get_profile(engine)
    return default_limits(profile, gpu) if gpu is not None else profile.limits


def engine_limits(
    gpu: GpuSpec,
    *,
    engine: str | EngineProfile = DEFAULT_ENGINE,
    plan: MemoryPlan | None = None,
    block_size: int | None = None,
    num_blocks: int | None = None,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    prefix_cache_hit_ratio: float = 0.0,
) -> ResolvedLimits:
    """Limits from the engine's own figures (keyword arguments, e.g. parsed from
    ``cache_config_info``), else the ``plan``, else the profile's defaults for ``gpu``."""
    profile = get_profile(engine)
    defaults = default_limits(profile, gpu)
    origin: dict[str, str] = {}

    def pick(name: str, given: int | None, planned: int | None, default: int) -> int:
        if given:
            origin[name] = "engine"
            return given
        if planned:
            origin[name] = "plan"
            return planned
        origin[name] = "profile"
        return default

    bs = pick("block_size", block_size, plan.block_size if plan else None, defaults.block_size)
    seqs = pick("max_num_seqs", max_num_seqs, plan.max_num_seqs if plan else None,
                defaults.max_num_seqs)  # fmt: skip
    batched = pick("max_num_batched_tokens", max_num_batched_tokens,
                   plan.max_num_batched_tokens if plan else None,
                   defaults.max_num_batched_tokens)  # fmt: skip
    if num_blocks:
        kv, origin["kv_capacity_tokens"] = num_blocks * bs, "engine"
    elif plan is not None:
        kv, origin["kv_capacity_tokens"] = plan.kv_capacity_tokens, "plan"
    else:
        raise ValueError("engine_limits needs num_blocks (from the engine) or a memory plan")
    limits = EngineLimits(
        max_num_seqs=seqs,
        kv_capacity_tokens=max(kv, bs),
        block_size=bs,
        max_num_batched_tokens=max(batched, seqs),
        prefix_cache_hit_ratio=prefix_cache_hit_ratio,
        reserve_output=profile.scheduler == "guaranteed_no_evict",
    )
    return ResolvedLimits(limits=limits, origin=origin)
