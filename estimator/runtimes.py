"""Which runtime? The same model, GPU and load under every engine profile, ranked.

:func:`compare_engines` plans memory and builds the prior under each registered profile
(``estimator.engines``), simulates the load (``estimator.loads``), and ranks the engines by
output throughput (burst, closed loop) or by mean TTFT then ITL (a Poisson rate, where the
throughput is the offered one). Each entry carries the profile's ``validation`` text: how
far that engine's constants were checked against published benchmarks, so an unvalidated
profile's estimate is never read as a measured one. Settings given (``max_num_seqs``,
``max_num_batched_tokens``, ``gpu_memory_utilization`` as each engine's own memory knob,
``enforce_eager``) apply to every engine; None leaves each engine its default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from estimator.catalog import GpuSpec
from estimator.engine import roofline_prior
from estimator.engines import get_profile, profile_names
from estimator.limits import engine_limits
from estimator.loads import Load, LoadResult, simulate_load
from estimator.memory import MemoryPlan, plan_memory
from estimator.modelarch import ModelArch
from estimator.simulate import Workload


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineChoice:
    """One engine's projection for the same deployment and load."""

    engine: str
    title: str
    plan: MemoryPlan
    result: LoadResult | None  # None when the model does not fit under this engine
    validation: str
    rank: int = 0


def compare_engines(
    arch: ModelArch,
    gpu: GpuSpec,
    workload: Workload,
    load: Load,
    *,
    tp: int = 1,
    quant: str = "bf16",
    kv_dtype: str = "auto",
    max_model_len: int | None = None,
    engines: Sequence[str] | None = None,
    n_requests: int = 1000,
    seed: int = 0,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    gpu_memory_utilization: float | None = None,
    enforce_eager: bool = False,
    prefix_cache_hit_ratio: float = 0.0,
) -> list[EngineChoice]:
    """Every engine (default: all registered) on the same deployment, best first."""
    out: list[EngineChoice] = []
    for name in engines or profile_names():
        profile = get_profile(name)
        plan = plan_memory(arch, gpu, tp=tp, quant=quant, kv_dtype=kv_dtype, engine=profile,
                           max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=max_num_batched_tokens,
                           gpu_memory_utilization=gpu_memory_utilization,
                           enforce_eager=enforce_eager)  # fmt: skip
        result = None
        if plan.fits:
            step = roofline_prior(arch, gpu, tp=tp, quant=quant, kv_dtype=kv_dtype,
                                  engine=profile, enforce_eager=enforce_eager)  # fmt: skip
            limits = engine_limits(
                gpu, engine=profile, plan=plan, prefix_cache_hit_ratio=prefix_cache_hit_ratio
            ).limits
            result = simulate_load(step, limits, workload, load, n_requests=n_requests,
                                   seed=seed)  # fmt: skip
        out.append(EngineChoice(engine=name, title=profile.title, plan=plan, result=result,
                                validation=profile.validation))  # fmt: skip

    def key(c: EngineChoice) -> tuple[float, ...]:
        if c.result is None:
            return (1.0, 0.0, 0.0)
        if load.kind == "poisson":
            return (0.0, c.result.ttft.mean, c.result.itl.mean)
        return (0.0, -c.result.output_tokens_per_s, c.result.ttft.mean)

    ranked = sorted(out, key=key)
    return [dataclasses.replace(c, rank=i + 1) for i, c in enumerate(ranked)]
