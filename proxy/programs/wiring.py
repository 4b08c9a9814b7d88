"""Start-up wiring: builds the estimator and the emulator's timing model from config/flags.

Kept apart from ``cli.py`` (parsing only) and ``app.py`` (no logic)."""

from __future__ import annotations

import argparse

from estimator.catalog import CatalogError
from estimator.compare import ExperimentSpec, ExperimentsSpec, GroupSpec
from estimator.service import Estimator
from estimator.settings import EstimatorConfigError
from proxy.app import Deps
from proxy.config import ConfigError, ProxyConfig
from proxy.estimation import EstimatorProcess, EstimatorRunner, InProcessEstimator
from proxy.gpu import GpuSampler
from proxy.programs.emulator import EmulatorConfig, FixedPace, TimingModel


def build_estimator(config: ProxyConfig, source: str = "config") -> Estimator:
    """The online estimator from the ``estimator`` section (an ``EstimatorConfig`` as it is)
    and the groups and experiments; a bad setting becomes a config error naming its key
    (``estimator.gpu``, ``groups[0].gpu``)."""
    try:
        est = Estimator(config.estimator, experiments=experiments_spec(config))
    except EstimatorConfigError as exc:
        raise ConfigError(source, exc.key, exc.reason) from None
    except (CatalogError, OSError) as exc:  # the extra catalog file itself
        raise ConfigError(source, "estimator.catalog", str(exc)) from None
    for i, g in enumerate(config.groups):
        if g.gpu is not None and g.gpu not in est.catalog:
            known = ", ".join(sorted(est.catalog))
            raise ConfigError(source, f"groups[{i}].gpu", f"unknown GPU {g.gpu!r} (known: {known})")
    return est


def experiments_spec(config: ProxyConfig) -> ExperimentsSpec | None:
    """The groups and experiments as the estimator takes them (None without groups)."""
    if not config.groups:
        return None
    groups = tuple(
        GroupSpec(name=g.name, backends=g.backends, engine=g.engine, gpu=g.gpu,
                  gpus_per_backend=g.gpus_per_backend, quant=g.quant, max_num_seqs=g.max_num_seqs,
                  settings=dict(g.settings), usd_per_hour=g.usd_per_hour,
                  usd_per_1m_input_tokens=g.usd_per_1m_input_tokens,
                  usd_per_1m_output_tokens=g.usd_per_1m_output_tokens,
                  model_config=g.model_config)
        for g in config.groups
    )  # fmt: skip
    experiments = tuple(
        ExperimentSpec(name=x.name, baseline=x.baseline, candidate=x.candidate, models=x.models,
                       min_requests=x.min_requests)
        for x in config.experiments
    )  # fmt: skip
    return ExperimentsSpec(groups=groups, experiments=experiments)


def estimator_deps(
    config: ProxyConfig, source: str = "config", *, in_process: bool = False
) -> Deps:
    """The app's dependencies: the online estimator when enabled (in its own process unless
    ``in_process``), the GPU sampler. The estimator is built once here so a bad estimator
    section fails at start-up, naming its key."""
    gpu = GpuSampler() if config.gpu.enabled else None
    if not config.estimator.enabled:
        return Deps(gpu=gpu, source=source)
    est = build_estimator(config, source)
    runner: EstimatorRunner
    if in_process:
        runner = InProcessEstimator(est, config.estimator.refresh_interval_s)
    else:
        runner = EstimatorProcess(est.config, experiments_spec(config))
    return Deps(estimator=runner, gpu=gpu, source=source)


def add_emulator_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default="emulated", help="model id it serves")
    p.add_argument("--ttft", type=float, default=0.05, help="seconds per prefill step (fixed pace)")
    p.add_argument("--itl", type=float, default=0.01, help="seconds per decode step (fixed pace)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="concurrent sequences")
    p.add_argument("--kv-tokens", type=int, default=None, help="KV cache capacity in tokens")
    p.add_argument("--max-tokens", type=int, default=64, help="output length when unset")
    p.add_argument("--max-model-len", type=int, default=8192, help="longest prompt + output")
    p.add_argument(
        "--hide-max-num-seqs",
        action="store_true",
        help="leave max_num_seqs out of /metrics, as vLLM does (the proxy must learn it)",
    )
    g = p.add_argument_group(
        "engine model",
        "emulate a real model on a real GPU: step times from the estimator's "
        "roofline model, KV capacity from its memory plan (replaces --ttft/--itl/--kv-tokens)",
    )
    g.add_argument("--model", help="path to the model's Hugging Face config.json")
    g.add_argument("--gpu", help="GPU catalog key, e.g. h100-sxm (see configs/gpus.yaml)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    g.add_argument("--quant", default="bf16", help="bf16, fp8, int8, int4")
    g.add_argument("--time-scale", type=float, default=1.0, help="run this many times faster")


def emulator_from_args(args: argparse.Namespace) -> tuple[EmulatorConfig, TimingModel]:
    """Fixed pace, or (``--model`` + ``--gpu``) the estimator's physical engine model."""
    if bool(args.model) != bool(args.gpu):
        raise SystemExit("rightsizer emulate: --model and --gpu go together")
    timing: TimingModel = FixedPace(ttft_s=args.ttft, itl_s=args.itl)
    kv_tokens, max_seqs = args.kv_tokens or 262_144, args.max_num_seqs or 32
    if args.model:
        from estimator.catalog import get_gpu, load_gpu_catalog
        from estimator.engine import roofline_prior
        from estimator.memory import plan_memory
        from estimator.modelarch import load_model_arch

        arch = load_model_arch(args.model)
        gpu = get_gpu(load_gpu_catalog(), args.gpu)
        plan = plan_memory(
            arch, gpu, tp=args.tp, quant=args.quant,
            max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        )  # fmt: skip
        if not plan.fits:
            raise SystemExit(f"rightsizer emulate: does not fit: {'; '.join(plan.reasons)}")
        timing = roofline_prior(arch, gpu, tp=args.tp, quant=args.quant)
        kv_tokens = args.kv_tokens or plan.kv_capacity_tokens
        max_seqs = args.max_num_seqs or plan.max_num_seqs
    cfg = EmulatorConfig(
        model=args.served_model_name,
        max_num_seqs=max_seqs,
        kv_capacity_tokens=kv_tokens,
        default_max_tokens=args.max_tokens,
        max_model_len=args.max_model_len,
        time_scale=args.time_scale,
        expose_max_num_seqs=not args.hide_max_num_seqs,
    )
    return cfg, timing
