"""``rightsizer estimate``: offline projection of one model on one GPU type, before deploying.

Prints the model (parameters, KV bytes per token), the memory plan per GPU, the KV capacity,
capacity at the SLO (simulated on the roofline prior of the --engine's profile), latency and
cost at the offered rate, advice and the ranked alternatives; then one replica under a
benchmark load (the offered rate per replica, --concurrency N clients in a closed loop, or a
--burst of N requests at once) with the mean and p50/p90/p95/p99 of TTFT, ITL, TPOT and
end-to-end latency and the output tokens/s, each with its band, and "which runtime?": every
engine profile under the same load, ranked, each with its validation caveat. Optionally a plot
(PNG or self-contained HTML) or JSON. The figures come from the same
``estimator.projection.project`` the online estimator uses, with the same SLO default; this
module only parses and prints.

--model takes a config.json, a folder holding one, a packaged name (see the error for the
list) or a Hugging Face id already in the local cache ($HF_HOME); nothing is downloaded.
Without --traffic the default given under --traffic is used (and said so). Without
--replicas the deployment shown is the recommended one: the replicas the rate needs plus the
spare (N+1).

Exit codes: 0 done; 2 a bad argument (the message names the flag); 3 the table was printed
but --plot could not be written because matplotlib is missing (pip install 'rightsizer[plot]').
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from estimator import plot
from estimator.capacity import Slo
from estimator.catalog import GpuSpec, get_gpu, load_gpu_catalog
from estimator.engine import roofline_prior
from estimator.engines import UnknownEngine, get_profile, profile_names
from estimator.loads import Load
from estimator.modelarch import load_model_arch
from estimator.projection import BenchRequest, DeploymentInputs, project, traffic_from_profile
from estimator.report import (
    Alternative,
    DeploymentReport,
    EngineChoiceReport,
    LatencyStats,
    LoadReport,
    MemoryReport,
    SloReport,
    to_dict,
)
from estimator.settings import (
    EstimatorConfig,
    EstimatorConfigError,
    describe_slo,
    resolve_model_config,
    validate,
)
from estimator.traffic import TrafficProfile

EXIT_USAGE = 2
EXIT_PLOT_UNAVAILABLE = 3
DEFAULT_TRAFFIC = "rate=1,prompt=512,output=128"
_CURVE_POINTS = 10
_DEFAULTS = EstimatorConfig()
_FLAGS = {  # EstimatorConfig key -> the flag that sets it
    "estimator.gpu": "--gpu", "estimator.quant": "--quant", "estimator.kv_dtype": "--kv-dtype",
    "estimator.advisor_gpus": "--alternatives", "estimator.gpus_per_backend": "--gpus-per-replica",
    "estimator.gpu_memory_utilization": "--gpu-memory-utilization",
    "estimator.slo_ttft_p95_s": "--slo", "estimator.slo_itl_p95_s": "--slo",
    "estimator.max_num_seqs": "--max-num-seqs",
    "estimator.max_num_batched_tokens": "--max-num-batched-tokens",
    "estimator.advisor_max_simulated": "--max-simulated", "estimator.engine": "--engine",
}  # fmt: skip


class UsageError(ValueError):
    """A bad argument; the message names the flag."""


def parse_slo(text: str) -> Slo:
    """``ttft_p95=0.5,itl_p95=0.05`` (seconds; either may be left out: the default stays)."""
    values = {"ttft_p95": _DEFAULTS.slo_ttft_p95_s, "itl_p95": _DEFAULTS.slo_itl_p95_s}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in values:
            raise argparse.ArgumentTypeError(f"bad item {item!r}: use ttft_p95=S,itl_p95=S")
        try:
            values[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key}={value!r}: not a number") from None
    try:
        return Slo(ttft_p95_s=values["ttft_p95"], itl_p95_s=values["itl_p95"])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _traffic(text: str) -> TrafficProfile:
    try:
        return TrafficProfile.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return n


def _engine(text: str) -> str:
    """An engine profile's name (aliases such as ``tensorrt-llm`` accepted)."""
    try:
        return get_profile(text).name
    except UnknownEngine as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``rightsizer estimate`` (defaults: ``EstimatorConfig``'s)."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    d, a = _DEFAULTS, parser.add_argument
    a("--model", required=True, metavar="MODEL",
      help="config.json, a folder holding one, a packaged name (llama-3.1-8b) or a Hugging "
      "Face id in the local cache")  # fmt: skip
    a("--gpu", required=True, help="GPU catalog key, e.g. a100-80gb, h100-sxm, l4")
    a("--gpus-per-replica", type=_positive_int, default=d.gpus_per_backend,
      help=f"tensor-parallel GPUs (default {d.gpus_per_backend})")  # fmt: skip
    a(
        "--replicas",
        type=_positive_int,
        help="replicas to evaluate (default: the recommended count, N+1, which meets the SLO)",
    )
    a("--engine", type=_engine, choices=profile_names(), default=d.engine,
      help=f"serving engine whose profile to use (default {d.engine})")  # fmt: skip
    a("--quant", default=d.quant, help=f"weight format: bf16, fp8, int8, int4 (default {d.quant})")
    a("--kv-dtype", default=d.kv_dtype, help=f"KV-cache dtype: auto or fp8 (default {d.kv_dtype})")
    src = parser.add_mutually_exclusive_group()
    src.add_argument(
        "--traffic",
        type=_traffic,
        metavar="SPEC",
        help="rate=R,prompt=DIST,output=DIST[,cached=F][,trend=R_PER_H]; DIST: N, "
        f"lognormal:MEDIAN:SIGMA or uniform:LO:HI (default {DEFAULT_TRAFFIC})",
    )
    src.add_argument("--traffic-log", metavar="JSONL", help="a recorded request log (JSON lines)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_positive_int, metavar="N",
                      help="benchmark N clients in a closed loop (vllm bench serve "
                      "--max-concurrency N) instead of the offered rate")  # fmt: skip
    load.add_argument("--burst", type=_positive_int, metavar="N",
                      help="benchmark N requests sent at once (--request-rate inf, "
                      "trtllm-bench throughput) instead of the offered rate")  # fmt: skip
    a("--slo", type=parse_slo, default=d.slo, metavar="SPEC",
      help=f"ttft_p95=S,itl_p95=S in seconds, ITL over all token gaps (default "
      f"ttft_p95={d.slo_ttft_p95_s:g},itl_p95={d.slo_itl_p95_s:g}, as the proxy's)")  # fmt: skip
    a("--catalog", help="extra GPU catalog YAML merged over the packaged one")
    a("--max-model-len", type=_positive_int, help="engine max_model_len (default: model max)")
    a(
        "--max-num-seqs",
        type=_positive_int,
        default=d.max_num_seqs,
        help="engine max_num_seqs (default: the engine's for the GPU)",
    )
    a(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=d.max_num_batched_tokens,
        help="engine max_num_batched_tokens (default: the engine's for the GPU)",
    )
    a(
        "--enforce-eager",
        action="store_true",
        default=d.enforce_eager,
        help="the engine runs without CUDA graphs (longer steps, no graph memory)",
    )
    a("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
      help="the engine's memory fraction: vLLM gpu_memory_utilization, SGLang "
      "mem_fraction_static, TensorRT-LLM kv_cache_free_gpu_mem_fraction (default: the "
      "engine's)")  # fmt: skip
    a(
        "--alternatives",
        default="",
        metavar="KEYS",
        help="comma-separated GPU keys to consider (default: the catalog but CPUs)",
    )
    a("--max-simulated", type=_positive_int, default=d.advisor_max_simulated,
      help=f"alternatives simulated (default {d.advisor_max_simulated})")  # fmt: skip
    a("--spare-replicas", type=int, default=d.spare_replicas,
      help=f"spare replicas, N+1 (default {d.spare_replicas})")  # fmt: skip
    a("--plot", metavar="FILE", help="write a plot: FILE.png or FILE.html (needs the plot "
      "extra: pip install 'rightsizer[plot]')")  # fmt: skip
    a("--json", action="store_true", help="print JSON instead of tables")


def run_estimate(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """Run the estimate for parsed ``args``; see the module docstring for exit codes."""
    out = out or sys.stdout
    try:
        inputs = estimate_inputs(args)
    except UsageError as e:
        print(f"rightsizer estimate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    report = project(inputs).report
    slo = SloReport(ttft_p95_s=inputs.config.slo_ttft_p95_s, itl_p95_s=inputs.config.slo_itl_p95_s)
    if args.json:
        json.dump({"slo": to_dict(slo), **report.to_dict()}, out, indent=2)
        out.write("\n")
    else:
        print_estimate(
            report,
            inputs.config,
            out,
            replicas_asked=args.replicas is not None,
            default_traffic=args.traffic is None and args.traffic_log is None,
        )
    if not args.plot:
        return 0
    where = sys.stderr if args.json else out
    if not plot.available():
        print(f"--plot {args.plot}: not written: matplotlib is missing; install the plot extra: "
              "pip install 'rightsizer[plot]'", file=where)  # fmt: skip
        return EXIT_PLOT_UNAVAILABLE
    _write_plot(args.plot, report, inputs.config)
    print(f"plot written to {args.plot}", file=where)
    return 0


def estimate_inputs(args: argparse.Namespace) -> DeploymentInputs:
    """Everything ``project`` needs from the flags; ``UsageError`` naming the flag."""
    try:
        catalog = load_gpu_catalog(extra=args.catalog)
    except (OSError, ValueError) as e:
        raise UsageError(f"--catalog: {e}") from None
    try:
        arch = load_model_arch(resolve_model_config(args.model))
    except (OSError, ValueError) as e:
        raise UsageError(f"--model: {e}") from None
    try:
        gpu = get_gpu(catalog, args.gpu)
    except ValueError as e:
        raise UsageError(f"--gpu: {e}") from None
    config = _config(args, catalog)
    profile = _profile(args)
    if args.plot:
        try:
            plot.check_path(args.plot)
        except ValueError as e:
            raise UsageError(f"--plot: {e}") from None
    try:
        prior = roofline_prior(arch, gpu, tp=config.gpus_per_backend, quant=config.quant,
                               kv_dtype=config.kv_dtype, engine=config.engine,
                               enforce_eager=config.enforce_eager)  # fmt: skip
    except ValueError as e:
        raise UsageError(f"--gpus-per-replica: {e}") from None
    return DeploymentInputs(
        model=arch.name, now=0.0, config=config, catalog=catalog, arch=arch, gpu=gpu,
        replicas=args.replicas, running=False, requests_observed=profile.requests,
        traffic=traffic_from_profile(profile, 0.0, config.forecast_horizon_s), prior=prior,
        curve_points=_CURVE_POINTS if args.plot else 0, bench=BenchRequest(load=_load(args)),
    )  # fmt: skip


def _load(args: argparse.Namespace) -> Load | None:
    """--concurrency N or --burst N; None: the offered rate (Poisson) per replica."""
    if args.concurrency is not None:
        return Load.concurrency(args.concurrency)
    if args.burst is not None:
        return Load.burst(args.burst)
    return None


def _config(args: argparse.Namespace, catalog: dict[str, GpuSpec]) -> EstimatorConfig:
    slo: Slo = args.slo
    keys = tuple(k.strip() for k in args.alternatives.split(",") if k.strip())
    try:
        return validate(EstimatorConfig(
            slo_ttft_p95_s=slo.ttft_p95_s, slo_itl_p95_s=slo.itl_p95_s, gpu=args.gpu,
            gpus_per_backend=args.gpus_per_replica, quant=args.quant, kv_dtype=args.kv_dtype,
            catalog=args.catalog, gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
            engine=args.engine, max_num_batched_tokens=args.max_num_batched_tokens,
            enforce_eager=args.enforce_eager,
            advisor_gpus=keys, advisor_max_simulated=args.max_simulated,
            spare_replicas=max(0, args.spare_replicas),
        ), catalog)  # fmt: skip
    except EstimatorConfigError as e:
        raise UsageError(f"{_FLAGS.get(e.key, e.key)}: {e.reason}") from None


def _profile(args: argparse.Namespace) -> TrafficProfile:
    if args.traffic_log is not None:
        try:
            return TrafficProfile.from_log(args.traffic_log)
        except (OSError, ValueError) as e:
            raise UsageError(f"--traffic-log: {e}") from None
    return args.traffic if args.traffic is not None else TrafficProfile.parse(DEFAULT_TRAFFIC)


def _write_plot(path: str, report: DeploymentReport, config: EstimatorConfig) -> None:
    t = report.traffic
    title = (f"{report.model} on {report.replicas}x {report.gpus_per_replica}x {report.gpu} "
             f"({report.quant}): "
             f"{t.description if t else ''}")  # fmt: skip
    rate = t.rate_rps / max(1, report.replicas) if t else None
    fig = plot.figure(report.latency_curve, config.slo, report.alternatives, title=title,
                      rate_rps=rate, capacity_rps=report.capacity_rps_per_replica)  # fmt: skip
    buf = _Buffer()
    print_estimate(report, config, buf, rich_ok=False)
    plot.write(fig, path, title=title, summary=buf.text())


class _Buffer:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, s: str) -> int:
        self.parts.append(s)
        return len(s)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(self.parts)


# ---- printing ---------------------------------------------------------------------------------
_GIB = float(1 << 30)


def _fmt(x: Any, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}{unit}"
    return f"{x}{unit}"


def _gib(x: float) -> str:
    return f"{x / _GIB:.1f}"


def summary_rows(d: DeploymentReport, config: EstimatorConfig, *, replicas_asked: bool = False,
                 default_traffic: bool = False) -> list[tuple[str, str]]:  # fmt: skip
    """The estimate as (label, text) rows, every figure with its unit and basis."""
    m, t, c, cc = d.memory, d.traffic, d.cost, d.cost_at_capacity
    rows = [("SLO", describe_slo(config.slo))]
    if m is not None:
        rows.append(("model", f"{d.model}: {m.params / 1e9:.2f} B parameters"
                     + (f" ({m.active_params / 1e9:.2f} B active)" if m.active_params != m.params
                        else "")
                     + f", KV cache {m.kv_bytes_per_token / 1024:.0f} KiB per token "
                     f"(kv {d.kv_dtype})"))  # fmt: skip
    how = "as asked" if replicas_asked else "recommended: N+1 for the rate"
    engine = f", {get_profile(d.engine).title}" if d.engine else ""
    eager = " (eager)" if config.enforce_eager else ""
    rows.append(("configuration", f"{d.replicas}x {d.gpus_per_replica}x {d.gpu}, {d.quant}, "
                 f"kv {d.kv_dtype}{engine}{eager} ({how})"))  # fmt: skip
    if t is not None:
        rows.append(("traffic", t.description + (" (the default: give --traffic for yours)"
                                                  if default_traffic else "")))  # fmt: skip
    if m is not None:
        rows += _memory_rows(m)
    if d.status != "ok":
        rows.append(("status", f"{d.status.replace('_', ' ')}: " + "; ".join(d.notes)))
        return rows
    band = d.capacity_band
    per_band = (f" (+-{band.rel_error:.0%}: {band.low / d.replicas:.2f}-"
                f"{band.high / d.replicas:.2f}, {band.source})") if band else ""  # fmt: skip
    rows.append(("capacity at SLO", f"{_fmt(d.capacity_rps_per_replica)} req/s per replica"
                 f"{per_band}, limited by {d.limiting or '-'}; {_fmt(d.capacity_rps)} req/s "
                 f"on {d.replicas}"))  # fmt: skip
    if t is not None:
        rows.append(("at the offered rate", f"{t.rate_rps:g} req/s: utilization "
                     f"{_pct(d.utilization)}, TTFT p95 {_ms(d.projected_ttft_p95_s)}, ITL p95 "
                     f"{_ms(d.projected_itl_p95_s)}, meets SLO "
                     f"{_yes(d.meets_slo_at_rate)}"))  # fmt: skip
    if c is not None:
        rows.append(("cost", f"${c.usd_per_hour:.2f}/h, ${c.usd_per_month:,.0f}/month"))
        for fig in (c, cc):
            if fig is not None:
                rows.append((f"  {fig.label()}", f"${_fmt(fig.usd_per_1m_input_tokens)}/1M input, "
                             f"${_fmt(fig.usd_per_1m_output_tokens)}/1M output tokens, "
                             f"${_fmt(fig.usd_per_request)}/request"))  # fmt: skip
    return rows


def _memory_rows(m: MemoryReport) -> list[tuple[str, str]]:
    return [
        ("memory per GPU", f"{_gib(m.memory_bytes_per_gpu)} GiB x{m.gpus}, budget "
         f"{_gib(m.budget_bytes_per_gpu)}: weights {_gib(m.weight_bytes_per_gpu)}, activations "
         f"{_gib(m.activation_bytes_per_gpu)}, CUDA graphs {_gib(m.cuda_graph_bytes_per_gpu)}, "
         f"non-torch {_gib(m.non_torch_bytes_per_gpu)}, KV cache {_gib(m.kv_bytes_per_gpu)} GiB"),
        ("KV capacity", f"{m.kv_capacity_tokens} tokens ({m.num_blocks} blocks), "
         f"{m.seqs_at_typical_context} typical sequences; max_model_len {m.max_model_len}, "
         f"max_num_seqs {m.max_num_seqs}"),
        ("fits", f"{'yes' if m.fits else 'no'}, OOM risk {m.oom_risk}"
         + (f" ({'; '.join(m.reasons)})" if m.reasons else "")),
    ]  # fmt: skip


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f} ms" if x >= 0.1 else f"{x * 1e3:.1f} ms"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _yes(x: bool | None) -> str:
    return "-" if x is None else "yes" if x else "no"


def alternative_header(alts: tuple[Alternative, ...]) -> tuple[str, ...]:
    at = next((a.priced_at_rps for a in alts if a.priced_at_rps), None)
    where = f" @ {at:.2f} req/s" if at else ""
    return ("#", "option", "verdict", "req/s per replica (band)", "limit", "KV tokens",
            "$/hour", f"$/1M output tok{where}", "OOM")  # fmt: skip


def alternative_rows(alts: tuple[Alternative, ...]) -> list[tuple[str, ...]]:
    """Options that serve nothing show their verdict, never a rate or a price."""
    rows: list[tuple[str, ...]] = []
    for i, a in enumerate(alts, 1):
        u = a.uncertainty
        ok = a.meets_slo
        band = f" ({u.low:.2f}-{u.high:.2f})" if u and ok else ""
        rows.append((str(i), a.label() + (" (now)" if a.current else ""), a.verdict(),
                     f"{a.capacity_rps_per_replica:.2f}{band}" if ok else "-",
                     a.limiting or "-" if ok else "-", str(a.kv_capacity_tokens) if a.fits else "-",
                     f"{a.usd_per_hour:.2f}" if ok else "-",
                     _fmt(a.usd_per_1m_output_tokens) if ok else "-", a.oom_risk))  # fmt: skip
    return rows


LOAD_HEADER = ("metric", "mean", "p50", "p90", "p95", "p99", "band of the mean")
_BAND_NOTE = (
    "band: the 10th-90th percentile of published / predicted on the validation rows of "
    "bench/data/published.yaml (an ~80% interval for this uncalibrated prior); the same "
    "factors hold for each percentile"
)


def _msv(x: float | None) -> str:
    """Milliseconds without the unit (the header has it)."""
    if x is None or x != x:
        return "-"
    ms = x * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def load_title(r: LoadReport, d: DeploymentReport) -> str:
    return (f"benchmark: {r.load} on one replica of {get_profile(r.engine).title} on "
            f"{d.gpus_per_replica}x {d.gpu} {d.quant}; {r.requests} requests simulated, "
            f"{r.counted} counted")  # fmt: skip


def load_rows(r: LoadReport) -> list[tuple[str, ...]]:
    """TTFT, ITL (every token gap), TPOT (per request), e2e in ms, then output tokens/s; each
    with the band of its mean (``LoadReport.bands``)."""

    def row(name: str, s: LatencyStats, band: tuple[float, float]) -> tuple[str, ...]:
        stats = (s.mean, s.p50, s.p90, s.p95, s.p99)
        return (name, *(_msv(v) for v in stats), f"{_msv(band[0])}-{_msv(band[1])}")

    lo, hi = r.bands["throughput"]
    return [
        row("TTFT (ms)", r.ttft, r.bands["ttft"]),
        row("ITL (ms)", r.itl, r.bands["itl"]),
        row("TPOT (ms)", r.tpot, r.bands["tpot"]),
        row("e2e (ms)", r.e2e, r.bands["e2e"]),
        ("output tok/s", f"{r.output_tokens_per_s:.0f}", "-", "-", "-", "-", f"{lo:.0f}-{hi:.0f}"),
    ]


def load_footer(r: LoadReport) -> str:
    return (f"{r.requests_per_s:.3g} req/s, {r.input_tokens_per_s:.0f} input tok/s; "
            f"{r.mean_running:.1f} sequences running on average (peak {r.peak_running}), "
            f"{r.preemptions} preemptions\n{_BAND_NOTE}")  # fmt: skip


ENGINE_HEADER = ("#", "engine", "output tok/s", "TTFT mean ms", "TTFT p99 ms", "ITL mean ms",
                 "e2e mean ms", "KV tokens")  # fmt: skip


def engines_title(d: DeploymentReport) -> str:
    load = d.load.load if d.load is not None else "the offered rate"
    by = ("mean TTFT (at a Poisson rate every engine serves the same tokens/s)"
          if d.load is None or d.load.kind == "poisson" else "output tokens/s")  # fmt: skip
    return (f"which runtime? every engine profile on {d.gpus_per_replica}x {d.gpu} {d.quant} "
            f"under {load}, each with its own defaults but for the settings given, "
            f"ranked by {by}; uncalibrated priors")  # fmt: skip


def engine_rows(choices: tuple[EngineChoiceReport, ...]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for c in choices:
        name = c.title + (" (this estimate)" if c.current else "")
        if not c.fits:
            rows.append((str(c.rank), name, "does not fit", "-", "-", "-", "-", "-"))
            continue
        tps = c.output_tokens_per_s
        rows.append((str(c.rank), name, f"{tps:.0f}" if tps is not None else "-",
                     _msv(c.ttft_mean_s), _msv(c.ttft_p99_s), _msv(c.itl_mean_s),
                     _msv(c.e2e_mean_s), str(c.kv_capacity_tokens)))  # fmt: skip
    return rows


def engines_footer(choices: tuple[EngineChoiceReport, ...]) -> str:
    """Each profile's validation caveat: how far its constants were checked."""
    return "how far each profile was validated:\n" + "\n".join(
        f"  {c.title}: {c.validation}" for c in choices
    )


def print_estimate(d: DeploymentReport, config: EstimatorConfig, out: Any, *,
                   rich_ok: bool = True, replicas_asked: bool = False,
                   default_traffic: bool = False) -> None:  # fmt: skip
    """Tables with rich when it is installed, aligned plain text otherwise."""
    summary = summary_rows(d, config, replicas_asked=replicas_asked,
                           default_traffic=default_traffic)  # fmt: skip
    recs = [f"[{r.severity}] {r.message}" for r in d.recommendations]
    title = "alternatives, sized for the forecast peak (N+1), cheapest meeting the SLO first"
    tables = [(title, alternative_header(d.alternatives), alternative_rows(d.alternatives), "")]
    if d.load is not None:
        tables.append((load_title(d.load, d), LOAD_HEADER, load_rows(d.load), load_footer(d.load)))
    if d.engines:
        tables.append((engines_title(d), ENGINE_HEADER, engine_rows(d.engines),
                       engines_footer(d.engines)))  # fmt: skip
    if rich_ok:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            rich_ok = False
    if not rich_ok:
        width = max(len(k) for k, _ in summary)
        out.write("".join(f"{k:<{width}}  {v}\n" for k, v in summary))
        out.write("\nadvice:\n" + "".join(f"  {r}\n" for r in recs))
        for name, header, rows, footer in tables:
            out.write(f"\n{name}:\n" + _plain_table(header, rows))
            out.write(f"{footer}\n" if footer else "")
        return
    console = Console(file=out, width=max(120, Console(file=out).width), highlight=False)
    t = Table(title=f"rightsizer estimate: {d.model}", show_header=False)
    for k, v in summary:
        t.add_row(k, v)
    console.print(t)
    console.print("advice:", *(f"  {r}" for r in recs), sep="\n", markup=False)
    for name, header, rows, footer in tables:
        a = Table(title=name)
        for h in header:
            a.add_column(h)
        for row in rows:
            a.add_row(*row)
        console.print(a)
        if footer:
            console.print(footer, markup=False)


def _plain_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True))
             for r in [header, *rows]]  # fmt: skip
    return "\n".join(lines) + "\n"
