"""Start-up wiring: builds the estimator and the emulator's timing model from config/flags.

Kept apart from ``cli.py`` (parsing only) and ``app.py`` (no logic)."""

from __future__ import annotations

import argparse

from .app import Deps
from .config import ProxyConfig
from .emulate import EmulatorConfig, FixedPace, TimingModel


def estimator_deps(config: ProxyConfig) -> Deps:
    """The app's dependencies, with the online estimator when it is enabled."""
    return Deps()


def add_emulator_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default="emulated", help="model id it serves")
    p.add_argument("--ttft", type=float, default=0.05, help="seconds per prefill step")
    p.add_argument("--itl", type=float, default=0.01, help="seconds per decode step")
    p.add_argument("--max-num-seqs", type=int, default=32, help="concurrent sequences")
    p.add_argument("--kv-tokens", type=int, default=262_144, help="KV cache capacity in tokens")
    p.add_argument("--max-tokens", type=int, default=64, help="output length when unset")


def emulator_from_args(args: argparse.Namespace) -> tuple[EmulatorConfig, TimingModel]:
    cfg = EmulatorConfig(
        model=args.served_model_name,
        max_num_seqs=args.max_num_seqs,
        kv_capacity_tokens=args.kv_tokens,
        default_max_tokens=args.max_tokens,
    )
    return cfg, FixedPace(ttft_s=args.ttft, itl_s=args.itl)
