"""``rightsizer estimate``: offline projection from a model config.json and a traffic profile.

Prints the memory plan, KV capacity, capacity at the SLO (simulated on the roofline prior),
latency at the offered rate, cost, advice and the ranked alternatives; optionally a plot
(PNG or self-contained HTML) and JSON. Bad arguments: a message naming the flag, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from typing import Any, TextIO

import numpy as np

from estimator import advisor, plot
from estimator.capacity import CapacityResult, Slo, latency_curve, max_rate_at_slo
from estimator.catalog import GpuSpec, get_gpu, get_quantization, load_gpu_catalog
from estimator.cost import CostFigures, cost_figures, deployment_usd_per_hour, token_times
from estimator.memory import MemoryPlan
from estimator.modelarch import ModelArch, load_model_arch
from estimator.report import Alternative, Recommendation, to_dict
from estimator.simulate import SimResult, Workload, simulate
from estimator.traffic import TrafficProfile

EXIT_USAGE = 2
_CURVE_POINTS = 10


class UsageError(ValueError):
    """A bad argument; the message names the flag."""


def parse_slo(text: str) -> Slo:
    """``ttft_p95=0.5,itl_p95=0.05`` (seconds; either may be left out)."""
    values: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in ("ttft_p95", "itl_p95"):
            raise argparse.ArgumentTypeError(f"bad item {item!r}: use ttft_p95=S,itl_p95=S")
        try:
            values[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key}={value!r}: not a number") from None
    try:
        return Slo(ttft_p95_s=values.get("ttft_p95", 1.0), itl_p95_s=values.get("itl_p95", 0.1))
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


def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``rightsizer estimate``."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    a = parser.add_argument
    a("--model", required=True, help="path to the model's Hugging Face config.json")
    a("--gpu", required=True, help="GPU catalog key, e.g. a100-80gb, h100-sxm, l4")
    a("--gpus-per-replica", type=_positive_int, default=1, help="tensor-parallel GPUs (default 1)")
    a("--replicas", type=_positive_int, help="replicas now (default: as many as the rate needs)")
    a("--quant", default="bf16", help="weight format: bf16, fp8, int8, int4 (default bf16)")
    a("--kv-dtype", default="auto", help="KV-cache dtype: auto or fp8 (default auto)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--traffic", type=_traffic, metavar="SPEC",
                     help="rate=R,prompt=DIST,output=DIST[,cached=F]; DIST is N, "
                     "lognormal:MEDIAN:SIGMA or uniform:LO:HI")  # fmt: skip
    src.add_argument("--traffic-log", metavar="JSONL", help="a recorded request log (JSON lines)")
    a("--slo", type=parse_slo, default=Slo(ttft_p95_s=1.0, itl_p95_s=0.1), metavar="SPEC",
      help="ttft_p95=S,itl_p95=S in seconds (default ttft_p95=1,itl_p95=0.1)")  # fmt: skip
    a("--catalog", help="extra GPU catalog YAML merged over the packaged one")
    a("--max-model-len", type=_positive_int, help="engine max_model_len (default: model max)")
    a("--max-num-seqs", type=_positive_int, default=256, help="engine max_num_seqs (256)")
    a("--gpu-memory-utilization", type=float, default=0.9, help="vLLM setting (default 0.9)")
    a("--alternatives", default="", metavar="KEYS",
      help="comma-separated GPU keys to consider (default: the catalog but CPUs)")  # fmt: skip
    a("--max-simulated", type=_positive_int, default=12, help="alternatives simulated (12)")
    a("--spare-replicas", type=int, default=1, help="spare replicas, N+1 (default 1)")
    a("--plot", metavar="FILE", help="write a plot: FILE.png or FILE.html (self-contained)")
    a("--json", action="store_true", help="print JSON instead of tables")


@dataclass(frozen=True, slots=True, kw_only=True)
class Estimate:
    """Everything ``rightsizer estimate`` computed (``to_dict()`` is the JSON output)."""

    model: str
    gpu: str
    gpus_per_replica: int
    quant: str
    kv_dtype: str
    traffic: str
    rate_rps: float
    slo_ttft_p95_s: float
    slo_itl_p95_s: float
    memory: dict[str, Any]
    capacity_rps_per_replica: float | None
    limiting: str | None
    replicas: int
    projected_ttft_p95_s: float | None
    projected_itl_p95_s: float | None
    meets_slo_at_rate: bool | None
    cost: CostFigures | None
    recommendations: tuple[Recommendation, ...]
    alternatives: tuple[Alternative, ...]

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def run_estimate(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """Run the estimate for parsed ``args``; 0 on success, 2 on a bad argument."""
    out = out or sys.stdout
    try:
        inputs = _inputs(args)
        est, curve = estimate(args, *inputs)
    except UsageError as e:
        print(f"rightsizer estimate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.plot:
        _write_plot(args.plot, est, curve, args.slo)
    if args.json:
        json.dump(est.to_dict(), out, indent=2)
        out.write("\n")
    else:
        print_estimate(est, out)
    if args.plot:
        print(f"plot written to {args.plot}", file=sys.stderr if args.json else out)
    return 0


def _inputs(
    args: argparse.Namespace,
) -> tuple[ModelArch, GpuSpec, TrafficProfile, dict[str, GpuSpec]]:
    try:
        catalog = load_gpu_catalog(extra=args.catalog)
    except (OSError, ValueError) as e:
        raise UsageError(f"--catalog: {e}") from None
    try:
        arch = load_model_arch(args.model)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model: {e}") from None
    try:
        gpu = get_gpu(catalog, args.gpu)
    except ValueError as e:
        raise UsageError(f"--gpu: {e}") from None
    try:
        get_quantization(args.quant)
    except ValueError as e:
        raise UsageError(f"--quant: {e}") from None
    if args.kv_dtype not in ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bf16", "fp16"):
        raise UsageError(f"--kv-dtype: unknown {args.kv_dtype!r}; use auto or fp8")
    keys = tuple(k.strip() for k in args.alternatives.split(",") if k.strip())
    for k in keys:
        if k not in catalog:
            known = ", ".join(sorted(catalog))
            raise UsageError(f"--alternatives: unknown GPU {k!r}; known: {known}")
    if args.traffic_log is not None:
        try:
            profile = TrafficProfile.from_log(args.traffic_log)
        except (OSError, ValueError) as e:
            raise UsageError(f"--traffic-log: {e}") from None
    else:
        profile = args.traffic
    if not 0.0 < args.gpu_memory_utilization <= 1.0:
        raise UsageError("--gpu-memory-utilization: must be in (0, 1]")
    if args.plot:
        try:
            plot.check_path(args.plot)
        except ValueError as e:
            raise UsageError(f"--plot: {e}") from None
    return arch, gpu, profile, catalog


def workload_of(profile: TrafficProfile, *, n: int = 4096, seed: int = 0) -> Workload:
    """Paired lengths from a recorded log; independent draws from synthetic distributions."""
    p, o = profile.prompt, profile.output
    if p.values is not None and o.values is not None and p.values.size == o.values.size:
        return Workload(prompt_tokens=p.values, output_tokens=o.values)
    return Workload.from_distributions(p, o, n=n, seed=seed)


def estimate(
    args: argparse.Namespace, arch: ModelArch, gpu: GpuSpec, profile: TrafficProfile,
    catalog: dict[str, GpuSpec],
) -> tuple[Estimate, list[SimResult]]:  # fmt: skip
    """The projection for one configuration and its alternatives (pure but for its inputs)."""
    slo: Slo = args.slo
    workload = workload_of(profile)
    setup = advisor.Setup(gpu=gpu.key, gpus_per_replica=args.gpus_per_replica, quant=args.quant,
                          kv_dtype=args.kv_dtype)  # fmt: skip
    settings = advisor.SearchSettings(
        slo=slo, peak_rps=profile.rate_rps, spare_replicas=max(0, args.spare_replicas),
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        prefix_cache_hit_ratio=profile.cached_ratio,
        gpus=tuple(k.strip() for k in args.alternatives.split(",") if k.strip()),
        max_simulated=args.max_simulated,
    )  # fmt: skip
    transfer = advisor.Transfer()
    cand = advisor.make_candidate(arch, gpu, setup, settings, transfer)
    cap: CapacityResult | None = None
    at_rate: SimResult | None = None
    curve: list[SimResult] = []
    replicas = args.replicas or 1
    if cand.plan.fits:
        cap = max_rate_at_slo(cand.step, cand.limits, workload, slo, n_requests=1000)
        per = cap.per_replica_rps
        if args.replicas is None and per > 0:
            replicas = max(1, math.ceil(profile.rate_rps / per - 1e-9))
        if profile.rate_rps > 0:
            at_rate = simulate(cand.step, cand.limits, workload, profile.rate_rps / replicas,
                               n_requests=1000)  # fmt: skip
        top = max(per, profile.rate_rps / replicas, 0.05) * 1.3
        rates = [top * (k + 1) / _CURVE_POINTS for k in range(_CURVE_POINTS)]
        curve = latency_curve(cand.step, cand.limits, workload, rates, n_requests=800)
    suggested = advisor.suggested_max_model_len(_total_p999(profile), arch)
    alt_settings = replace(settings, max_model_len=args.max_model_len or suggested)
    alts = advisor.search(arch, catalog, workload, alt_settings, transfer, current=setup)
    cost = _cost(gpu, args, replicas, profile, workload, cand, cap)
    recs = _advice(arch, cand, cap, profile, settings, alts, replicas, transfer)
    est = Estimate(
        model=arch.name, gpu=gpu.key, gpus_per_replica=args.gpus_per_replica, quant=args.quant,
        kv_dtype=args.kv_dtype, traffic=profile.describe(), rate_rps=profile.rate_rps,
        slo_ttft_p95_s=slo.ttft_p95_s, slo_itl_p95_s=slo.itl_p95_s, memory=_memory(cand.plan),
        capacity_rps_per_replica=cap.per_replica_rps if cap else None,
        limiting=cap.limiting if cap else None, replicas=replicas,
        projected_ttft_p95_s=_finite(at_rate.ttft_q_s) if at_rate else None,
        projected_itl_p95_s=_finite(at_rate.itl_q_s) if at_rate else None,
        meets_slo_at_rate=slo.met_by(at_rate) if at_rate else None, cost=cost,
        recommendations=tuple(recs), alternatives=alts,
    )  # fmt: skip
    return est, curve


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _memory(plan: MemoryPlan) -> dict[str, Any]:
    return {
        "fits": plan.fits, "oom_risk": plan.oom_risk, "max_model_len": plan.max_model_len,
        "weight_bytes_per_gpu": plan.weight_bytes_per_gpu,
        "kv_bytes_per_gpu": plan.kv_bytes_per_gpu,
        "kv_capacity_tokens": plan.kv_capacity_tokens, "num_blocks": plan.num_blocks,
        "seqs_at_typical_context": plan.seqs_at_typical_context, "reasons": list(plan.reasons),
    }  # fmt: skip


def _cost(gpu: GpuSpec, args: argparse.Namespace, replicas: int, profile: TrafficProfile,
          workload: Workload, cand: advisor.Candidate,
          cap: CapacityResult | None) -> CostFigures:  # fmt: skip
    usd = deployment_usd_per_hour(gpu.price_per_hour, args.gpus_per_replica, replicas)
    batch = round(cap.at_capacity.mean_running) if cap else 1
    times = token_times(cand.step, decode_batch=max(1, batch),
                        mean_context=workload.mean_prompt + workload.mean_output / 2)  # fmt: skip
    per = cap.per_replica_rps if cap else 0.0
    return cost_figures(usd_per_hour=usd, rate_rps=profile.rate_rps,
                        mean_prompt_tokens=workload.mean_prompt,
                        mean_output_tokens=workload.mean_output, times=times,
                        cached_ratio=profile.cached_ratio,
                        capacity_rps=per * replicas)  # fmt: skip


def _advice(
    arch: ModelArch, cand: advisor.Candidate, cap: CapacityResult | None,
    profile: TrafficProfile, settings: advisor.SearchSettings, alts: tuple[Alternative, ...],
    replicas: int, transfer: advisor.Transfer,
) -> list[Recommendation]:  # fmt: skip
    total = _total_p999(profile)
    obs = advisor.Observed(rate_rps=profile.rate_rps, rate_1h_rps=profile.rate_rps,
                           peak_rps=profile.rate_rps, total_tokens_p999=total, replicas=replicas,
                           max_num_seqs=settings.max_num_seqs,
                           max_model_len=cand.plan.max_model_len,
                           kv_dtype=cand.setup.kv_dtype)  # fmt: skip
    out: list[Recommendation | None] = [advisor.advise_oom(cand.plan)]
    if cap is not None and cap.per_replica_rps > 0:
        out.append(advisor.advise_replicas(cap.per_replica_rps, obs, settings.spare_replicas,
                                           transfer.band()))  # fmt: skip
        out.append(advisor.advise_max_num_seqs(cap, cand.plan, obs))
        fp8 = None
        if cap.limiting == "kv" or cap.at_capacity.kv_bound:
            c8 = advisor.make_candidate(arch, cand.gpu, advisor.with_kv_dtype(cand.setup, "fp8"),
                                        settings, transfer)  # fmt: skip
            if c8.plan.fits:
                fp8 = advisor.evaluate(c8, workload_of(profile), settings, transfer)
        out.append(advisor.advise_kv_dtype(cap, fp8, obs))
    out.append(advisor.advise_max_model_len(obs, arch))
    return [r for r in out if r is not None] + advisor.advise_alternatives(alts)


def _total_p999(profile: TrafficProfile) -> float:
    rng = np.random.default_rng(0)
    p, o = profile.prompt, profile.output
    if p.values is not None and o.values is not None and p.values.size == o.values.size:
        return float(np.quantile(p.values + o.values, 0.999))
    return float(np.quantile(p.sample(20000, rng) + o.sample(20000, rng), 0.999))


def _write_plot(path: str, est: Estimate, curve: list[SimResult], slo: Slo) -> None:
    title = f"{est.model} on {est.gpus_per_replica}x {est.gpu} ({est.quant}): {est.traffic}"
    fig = plot.figure(curve, slo, est.alternatives, title=title,
                      rate_rps=est.rate_rps / max(1, est.replicas),
                      capacity_rps=est.capacity_rps_per_replica)  # fmt: skip
    buf = _Buffer()
    print_estimate(est, buf, rich_ok=False)
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


def _fmt(x: Any, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}{unit}"
    return f"{x}{unit}"


def _summary_rows(est: Estimate) -> list[tuple[str, str]]:
    m, c = est.memory, est.cost
    gib = 1 << 30
    return [
        ("configuration", f"{est.replicas}x {est.gpus_per_replica}x {est.gpu}, {est.quant}, "
                          f"kv {est.kv_dtype}"),
        ("traffic", est.traffic),
        ("SLO", f"TTFT p95 <= {est.slo_ttft_p95_s}s, ITL p95 <= {est.slo_itl_p95_s}s"),
        ("memory", f"fits {m['fits']}, OOM risk {m['oom_risk']}, weights "
                   f"{m['weight_bytes_per_gpu'] / gib:.1f} GiB/GPU, "
                   f"KV {m['kv_bytes_per_gpu'] / gib:.1f} GiB/GPU, "
                   f"max_model_len {m['max_model_len']}"),
        ("KV capacity", f"{m['kv_capacity_tokens']} tokens ({m['num_blocks']} blocks), "
                        f"{m['seqs_at_typical_context']} typical sequences"),
        ("capacity at SLO", f"{_fmt(est.capacity_rps_per_replica)} req/s per replica "
                            f"(limited by {est.limiting or '-'})"),
        ("at the offered rate", f"TTFT p95 {_fmt(est.projected_ttft_p95_s, 's')}, ITL p95 "
                                f"{_fmt(est.projected_itl_p95_s, 's')}, meets SLO "
                                f"{_fmt(est.meets_slo_at_rate)}"),
        ("cost", "-" if c is None else
         f"${c.usd_per_hour:.2f}/h, ${c.usd_per_month:,.0f}/month, "
         f"${_fmt(c.usd_per_1m_input_tokens)}/1M in, ${_fmt(c.usd_per_1m_output_tokens)}/1M out, "
         f"${_fmt(c.usd_per_request)}/request, utilization {_fmt(c.utilization)}"),
    ]  # fmt: skip


_ALT_HEADER = ("#", "option", "meets SLO", "req/s/replica (band)", "limit", "KV tokens",
               "$/hour", "$/1M tok", "OOM")  # fmt: skip


def _alt_rows(alts: tuple[Alternative, ...]) -> list[tuple[str, ...]]:
    rows = []
    for i, a in enumerate(alts, 1):
        u = a.uncertainty
        band = f" ({u.low:.2f}-{u.high:.2f})" if u else ""
        rows.append((str(i), a.label() + (" (now)" if a.current else ""),
                     "yes" if a.meets_slo else "no", f"{a.capacity_rps_per_replica:.2f}{band}",
                     a.limiting or "-", str(a.kv_capacity_tokens), f"{a.usd_per_hour:.2f}",
                     _fmt(a.usd_per_1m_tokens), a.oom_risk))  # fmt: skip
    return rows


def print_estimate(est: Estimate, out: Any, *, rich_ok: bool = True) -> None:
    """Tables with rich when it is installed, aligned plain text otherwise."""
    summary, alts = _summary_rows(est), _alt_rows(est.alternatives)
    recs = [f"[{r.severity}] {r.message}" for r in est.recommendations]
    if rich_ok:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            rich_ok = False
    if not rich_ok:
        width = max(len(k) for k, _ in summary)
        for k, v in summary:
            out.write(f"{k:<{width}}  {v}\n")
        out.write("\nadvice:\n" + "".join(f"  {r}\n" for r in recs))
        out.write("\nalternatives (cheapest meeting the SLO first):\n")
        out.write(_plain_table(_ALT_HEADER, alts))
        return
    console = Console(file=out, width=max(120, Console(file=out).width), highlight=False)
    t = Table(title=f"rightsizer estimate: {est.model}", show_header=False)
    for k, v in summary:
        t.add_row(k, v)
    console.print(t)
    console.print("advice:", *(f"  {r}" for r in recs), sep="\n", markup=False)
    a = Table(title="alternatives (cheapest meeting the SLO first)")
    for h in _ALT_HEADER:
        a.add_column(h)
    for row in alts:
        a.add_row(*row)
    console.print(a)


def _plain_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True))
             for r in [header, *rows]]  # fmt: skip
    return "\n".join(lines) + "\n"
