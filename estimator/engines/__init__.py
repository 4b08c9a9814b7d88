"""Engine profiles: one file per serving engine, registered by one line in ``_MODULES``.

``get_profile(name)`` returns an :class:`EngineProfile` (see ``estimator.engines.base`` for
every field); ``profile_names()`` lists them; ``default_limits(profile, gpu)`` and
``memory_semantics(profile, gpu)`` pick the engine's defaults for a device (its CPU build on
the ``cpu`` catalog entry). ``DEFAULT_ENGINE`` (vllm) is what callers that name no engine get.
"""

from __future__ import annotations

import importlib

from estimator.catalog import GpuSpec, gpu_generation
from estimator.engines.base import (
    GIB,
    EngineProfile,
    LimitDefaults,
    MemorySemantics,
    Scheduler,
)

__all__ = [
    "DEFAULT_ENGINE",
    "EngineProfile",
    "LimitDefaults",
    "MemorySemantics",
    "Scheduler",
    "UnknownEngine",
    "default_limits",
    "get_profile",
    "memory_semantics",
    "profile_names",
]

DEFAULT_ENGINE = "vllm"
# the registry: module name under estimator.engines -> its PROFILE (one line per engine)
_MODULES: tuple[str, ...] = ("vllm", "sglang", "trtllm", "tgi", "llamacpp")
_ALIASES = {
    "tensorrt-llm": "trtllm",
    "tensorrt_llm": "trtllm",
    "trt-llm": "trtllm",
    "llama.cpp": "llamacpp",
    "llama-cpp": "llamacpp",
    "text-generation-inference": "tgi",
}
_CACHE: dict[str, EngineProfile] = {}


class UnknownEngine(ValueError):
    """An engine name no profile is registered for (the message lists the known ones)."""


def profile_names() -> tuple[str, ...]:
    return _MODULES


def get_profile(name: str | EngineProfile) -> EngineProfile:
    """The profile called ``name`` (case-insensitive; aliases such as ``tensorrt-llm``)."""
    if isinstance(name, EngineProfile):
        return name
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _MODULES:
        raise UnknownEngine(f"unknown engine {name!r}; known: {', '.join(_MODULES)}")
    if key not in _CACHE:
        module = importlib.import_module(f"estimator.engines.{key}")
        profile = module.PROFILE
        if not isinstance(profile, EngineProfile) or profile.name != key:
            raise TypeError(f"estimator.engines.{key}.PROFILE is not the {key!r} profile")
        _CACHE[key] = profile
    return _CACHE[key]


def default_limits(profile: EngineProfile, gpu: GpuSpec) -> LimitDefaults:
    """The engine's default limits on ``gpu`` (its CPU build's on a CPU entry)."""
    if gpu_generation(gpu) == "cpu" and profile.cpu_limits is not None:
        return profile.cpu_limits
    big = profile.large_gpu_limits
    if big is not None and gpu.memory_bytes >= profile.large_gpu_min_gib * GIB:
        name = f"{gpu.key} {gpu.name}".lower()
        if not any(x in name for x in profile.large_gpu_exclude):
            if gpu.memory_bytes >= 160 * GIB and profile.name == "vllm":
                return LimitDefaults(
                    max_num_seqs=big.max_num_seqs,
                    max_num_batched_tokens=16384,
                    block_size=big.block_size,
                )
            return big
    return profile.limits


def memory_semantics(profile: EngineProfile, gpu: GpuSpec) -> MemorySemantics:
    """How the engine sizes its KV cache on ``gpu`` (its CPU build's on a CPU entry)."""
    if gpu_generation(gpu) == "cpu" and profile.cpu_memory is not None:
        return profile.cpu_memory
    return profile.memory
