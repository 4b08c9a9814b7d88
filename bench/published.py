"""The estimator's prior against published GPU benchmarks (issue 14's validation suite).

Every row of ``bench/data/published.yaml`` is a published figure with its full conditions
(engine and version, GPU, TP, weight and KV format, input/output lengths, load: a burst of N
requests, N closed-loop clients or a Poisson rate; the source of each table is in the file).
For each row this script builds what ``rightsizer estimate`` would build before anything is
deployed: the model's architecture from ``estimator/data/models``, the engine's profile
(``estimator.engines``), its memory plan and limits, the roofline prior, and a simulation of
the row's load (``estimator.loads``); then it prints one line per comparison (predicted,
published, error) and a summary: median absolute error and worst row per metric, per engine
and per GPU, for all rows and for the held-out rows separately, and how often the printed
uncertainty band holds the published value.

Held-out rows: every row whose id hashes to 0 mod 3 (a fixed, content-independent split,
about a third). ``--fit`` fits the profiles' time constants on the *other* rows only (per
engine: step and per-sequence overheads, prefill MFU, decode bandwidth and, where rows have
TTFT, the per-request cost; log-error least squares, Nelder-Mead) and prints them for the
profile files; the band (10th-90th percentile of published / predicted per metric) is
printed from the training rows too. Unit tests check the physics, never these numbers.

    python3 bench/published.py                 # all rows, one line each, then the summary
    python3 bench/published.py --json out.json # also the rows as JSON
    python3 bench/published.py --fit           # refit the constants on the training rows
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from estimator.catalog import GpuSpec, get_gpu, gpu_generation, load_gpu_catalog  # noqa: E402
from estimator.engine import roofline_prior  # noqa: E402
from estimator.engines import EngineProfile, get_profile  # noqa: E402
from estimator.engines.bands import BANDS  # noqa: E402
from estimator.loads import Load, LoadResult, simulate_load  # noqa: E402
from estimator.memory import plan_memory, weight_bytes  # noqa: E402
from estimator.modelarch import ModelArch, load_model_arch  # noqa: E402
from estimator.simulate import EngineLimits, Workload  # noqa: E402

DATA = ROOT / "bench" / "data" / "published.yaml"
MODELS = ROOT / "estimator" / "data" / "models"
GIB = 1 << 30
METRICS = ("output_tps", "ttft_mean_ms", "ttft_median_ms", "itl_mean_ms", "itl_median_ms",
           "e2e_mean_ms", "weights_gib", "kv_tokens")  # fmt: skip
GROUP = {"output_tps": "throughput", "ttft_mean_ms": "ttft", "ttft_median_ms": "ttft",
         "itl_mean_ms": "itl", "itl_median_ms": "itl", "e2e_mean_ms": "e2e",
         "weights_gib": "weights", "kv_tokens": "kv"}  # fmt: skip
SIM_CAP = 12000  # requests simulated per row at most (bursts of 30,000: the tail is the same)


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    id: str
    table: str
    engine: str
    model: str
    gpu: str | None
    tp: int
    quant: str
    kv_dtype: str
    isl: int = 0
    osl: int = 0
    load: str = ""  # "burst", "concurrency", "rate"
    load_value: float = 0.0
    n: int = 0
    offline: bool = False
    settings: Mapping[str, Any] = field(default_factory=dict)
    published: Mapping[str, float] = field(default_factory=dict)
    source: str = ""

    @property
    def held_out(self) -> bool:
        return int(hashlib.sha256(self.id.encode()).hexdigest(), 16) % 3 == 0


def load_rows(path: Path = DATA) -> list[Row]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    rows: list[Row] = []
    for t in doc["tables"]:
        cols = t["columns"]
        for k, values in enumerate(t["rows"]):
            r = dict(zip(cols, values, strict=True))
            rows.append(_row(t, r, f"{t['id']}#{k}"))
    return rows


def _row(t: Mapping[str, Any], r: dict[str, Any], rid: str) -> Row:
    engine = r.pop("engine", t.get("engine"))
    load, value = "", 0.0
    for kind in ("burst", "concurrency", "rate"):
        if kind in r:
            load, value = kind, float(r.pop(kind))
    if "load" in r:
        text = str(r.pop("load"))
        load, _, v = text.partition(" ")
        value = float(v) if v else float(r.get("n", 0))
    n = int(r.pop("n", value if load in ("burst", "concurrency") else 0) or 0)
    published = {m: float(r.pop(m)) for m in METRICS if r.get(m) is not None}
    for m in METRICS:
        r.pop(m, None)
    settings = dict(t.get("settings") or {})
    if r.get("fraction") is not None:
        settings["kv_fraction"] = float(r.pop("fraction"))
    r.pop("fraction", None)
    source = str(r.pop("source", t.get("source", "")))
    r.pop("version", None)
    return Row(id=rid, table=str(t["id"]), engine=str(engine), model=str(r["model"]),
               gpu=r.get("gpu"), tp=int(r["tp"]), quant=str(r["quant"]),
               kv_dtype=str(r["kv_dtype"]), isl=int(r.get("isl") or 0),
               osl=int(r.get("osl") or 0), load=load, load_value=value,
               n=n or int(value), offline=bool(t.get("offline", False)),
               settings=settings, published=published, source=source)  # fmt: skip


@cache
def arch_of(model: str) -> ModelArch:
    return load_model_arch(MODELS / f"{model}.json")


@cache
def catalog() -> dict[str, GpuSpec]:
    return load_gpu_catalog()


def predict(row: Row, profile: EngineProfile | None = None) -> dict[str, float]:
    """What the prior predicts for each published metric of ``row``."""
    prof = profile or get_profile(row.engine)
    arch = arch_of(row.model)
    out: dict[str, float] = {}
    if "weights_gib" in row.published:
        out["weights_gib"] = weight_bytes(arch, row.quant, tp=row.tp) / GIB
    if row.gpu is None:
        return out
    gpu = get_gpu(catalog(), row.gpu)
    s = row.settings
    max_len = int(s.get("max_model_len") or max(row.isl + row.osl, 4096))
    plan = plan_memory(arch, gpu, tp=row.tp, quant=row.quant, kv_dtype=row.kv_dtype,
                       gpu_memory_utilization=s.get("kv_fraction"), engine=prof,
                       max_num_seqs=s.get("max_num_seqs"), max_model_len=max_len,
                       max_num_batched_tokens=s.get("max_num_batched_tokens"),
                       attention_dp=bool(s.get("attention_dp")))  # fmt: skip
    if "kv_tokens" in row.published:
        out["kv_tokens"] = float(plan.kv_capacity_tokens)
    if not row.load:
        return out
    res = simulate_row(row, prof, arch, gpu, plan)
    out |= {
        "output_tps": res.output_tokens_per_s,
        "ttft_mean_ms": res.ttft.mean * 1e3,
        "ttft_median_ms": res.ttft.p50 * 1e3,
        "itl_mean_ms": res.itl.mean * 1e3,
        "itl_median_ms": res.itl.p50 * 1e3,
        "e2e_mean_ms": res.e2e.mean * 1e3,
    }
    return out


def simulate_row(row: Row, prof: EngineProfile, arch: ModelArch, gpu: GpuSpec,
                 plan: Any) -> LoadResult:  # fmt: skip
    step = roofline_prior(arch, gpu, tp=row.tp, quant=row.quant, kv_dtype=row.kv_dtype,
                          engine=prof, offline=row.offline,
                          attention_dp=bool(row.settings.get("attention_dp")))  # fmt: skip
    kv = max(plan.kv_capacity_tokens, plan.block_size, row.isl + row.osl)
    limits = EngineLimits(max_num_seqs=plan.max_num_seqs, kv_capacity_tokens=kv,
                          block_size=plan.block_size,
                          max_num_batched_tokens=max(plan.max_num_batched_tokens,
                                                     plan.max_num_seqs),
                          reserve_output=prof.scheduler == "guaranteed_no_evict")  # fmt: skip
    wl = Workload.fixed(row.isl, row.osl)
    if row.load == "burst":
        load = Load.burst(min(int(row.load_value), SIM_CAP))
        return simulate_load(step, limits, wl, load, seed=1)
    if row.load == "concurrency":
        c = int(row.load_value)
        n = min(max(row.n, 4 * c), SIM_CAP)
        return simulate_load(step, limits, wl, Load.concurrency(c), n_requests=n, seed=1)
    n = min(max(row.n, 200), SIM_CAP)
    return simulate_load(step, limits, wl, Load.poisson(row.load_value), n_requests=n, seed=1)


@dataclass(frozen=True, slots=True)
class Comparison:
    row: Row
    metric: str
    predicted: float
    published: float

    @property
    def error(self) -> float:
        return self.predicted / self.published - 1.0

    @property
    def in_band(self) -> bool:
        if GROUP[self.metric] in ("weights", "kv"):
            return abs(self.error) <= 0.05
        lo, hi = BANDS.get(GROUP[self.metric], BANDS["default"])
        return self.predicted * lo <= self.published <= self.predicted * hi


def compare(rows: Iterable[Row], profiles: Mapping[str, EngineProfile] | None = None
            ) -> list[Comparison]:  # fmt: skip
    out: list[Comparison] = []
    for row in rows:
        prof = (profiles or {}).get(row.engine)
        pred = predict(row, prof)
        for m, v in row.published.items():
            if m == "output_tps" and row.load == "rate":
                continue  # open loop below saturation: the offered rate sets it, not the engine
            if m in pred and math.isfinite(pred[m]):
                out.append(Comparison(row, m, pred[m], v))
    return out


# --- summary ---------------------------------------------------------------------------


def _median_abs(cs: Sequence[Comparison]) -> float:
    return float(np.median([abs(c.error) for c in cs])) if cs else math.nan


def summary(cs: Sequence[Comparison]) -> dict[str, Any]:
    by: dict[str, Any] = {}
    for name, pick in (("all", lambda c: True), ("held_out", lambda c: c.row.held_out),
                       ("train", lambda c: not c.row.held_out)):  # fmt: skip
        sub = [c for c in cs if pick(c)]
        groups: dict[str, list[Comparison]] = {}
        for c in sub:
            groups.setdefault(GROUP[c.metric], []).append(c)
        by[name] = {
            g: {"rows": len(v), "median_abs_error": _median_abs(v),
                "worst": max(v, key=lambda c: abs(c.error)).row.id,
                "worst_error": max((c.error for c in v), key=abs),
                "beyond_35pct": sum(abs(c.error) > 0.35 for c in v),
                "band_coverage": float(np.mean([c.in_band for c in v]))}
            for g, v in sorted(groups.items())
        }  # fmt: skip
    return by


def table_by(cs: Sequence[Comparison], key: str) -> list[tuple[str, int, float, str, float]]:
    groups: dict[str, list[Comparison]] = {}
    for c in cs:
        if GROUP[c.metric] in ("weights", "kv"):
            continue
        k = c.row.engine if key == "engine" else f"{c.row.engine} / {c.row.gpu}"
        groups.setdefault(k, []).append(c)
    out = []
    for k, v in sorted(groups.items()):
        worst = max(v, key=lambda c: abs(c.error))
        out.append((k, len(v), _median_abs(v), f"{worst.row.id} {worst.metric}", worst.error))
    return out


def render(cs: Sequence[Comparison]) -> str:
    lines = [f"{'row':<26} {'split':<5} {'engine':<7} {'model':<20} {'gpu':<10} {'tp':>2} "
             f"{'q':<5} {'isl/osl':>11} {'load':<16} {'metric':<15} {'predicted':>10} "
             f"{'published':>10} {'error':>7}"]  # fmt: skip
    for c in cs:
        r = c.row
        load = f"{r.load} {r.load_value:g}" if r.load else "-"
        lines.append(f"{r.id:<26} {'test' if r.held_out else 'train':<5} {r.engine:<7} "
                     f"{r.model:<20} {r.gpu!s:<10} {r.tp:>2} {r.quant:<5} "
                     f"{f'{r.isl}/{r.osl}':>11} {load:<16} {c.metric:<15} {c.predicted:>10.4g} "
                     f"{c.published:>10.4g} {c.error:>+7.1%}")  # fmt: skip
    s = summary(cs)
    for name in ("all", "train", "held_out"):
        lines.append(f"\n{name}: metric rows median|err| worst (row, error) >35% band-coverage")
        for g, v in s[name].items():
            lines.append(f"  {g:<10} {v['rows']:>4} {v['median_abs_error']:>8.1%}  "
                         f"{v['worst']:<26} {v['worst_error']:>+7.1%} {v['beyond_35pct']:>4} "
                         f"{v['band_coverage']:>6.0%}")  # fmt: skip
    lines.append("\nper engine and GPU (latency and throughput metrics, all rows):")
    lines.append("| engine / GPU | comparisons | median abs error | worst row (error) |")
    lines.append("|---|---|---|---|")
    for k, n, med, worst, err in table_by(cs, "gpu"):
        lines.append(f"| {k} | {n} | {med:.1%} | {worst} ({err:+.1%}) |")
    return "\n".join(lines)


# --- fitting -----------------------------------------------------------------------------


def _fit_names(engine: str, rows: Sequence[Row]) -> list[str]:
    """The factors fitted for ``engine``: its step, per-sequence and per-request costs, and a
    prefill MFU and decode bandwidth factor per GPU generation its training rows cover."""
    gens = sorted({gpu_generation(get_gpu(catalog(), r.gpu)) for r in rows if r.gpu})
    names = ["step_overhead_s", "per_seq_overhead_s"]
    if any(m.startswith("ttft") for r in rows for m in r.published):
        names.append("api_ttft_s")
        if any(r.load == "burst" and not r.offline for r in rows):
            names.append("api_service_s")
    names.append("kv_efficiency")
    if any(arch_of(r.model).is_moe for r in rows):
        names.append("moe_efficiency")
    return names + [f"prefill_mfu:{g}" for g in gens] + [f"decode_bandwidth:{g}" for g in gens]


def _scaled(p: EngineProfile, names: Sequence[str], x: np.ndarray) -> EngineProfile:
    f = dict(zip(names, np.exp(x), strict=True))
    mfu, attn, bw = dict(p.prefill_mfu), dict(p.attention_mfu), dict(p.decode_bandwidth)
    for name, v in f.items():
        field_, _, gen = name.partition(":")
        if field_ == "prefill_mfu":
            base = p.efficiency_for(p.prefill_mfu, gen)
            mfu[gen] = min(base * v, 0.95)
            attn[gen] = min(p.efficiency_for(p.attention_mfu, gen) * v, 0.95)
        elif field_ == "decode_bandwidth":
            bw[gen] = min(p.efficiency_for(p.decode_bandwidth, gen) * v, 0.95)
    return dataclasses.replace(
        p,
        step_overhead_s=p.step_overhead_s * f.get("step_overhead_s", 1.0),
        per_seq_overhead_s=p.per_seq_overhead_s * f.get("per_seq_overhead_s", 1.0),
        api_ttft_s=p.api_ttft_s * f.get("api_ttft_s", 1.0),
        api_service_s=p.api_service_s * f.get("api_service_s", 1.0),
        moe_efficiency=min(p.moe_efficiency * f.get("moe_efficiency", 1.0), 1.0),
        kv_efficiency=min(p.kv_efficiency * f.get("kv_efficiency", 1.0), 2.0),
        prefill_mfu=mfu, attention_mfu=attn, decode_bandwidth=bw,
    )  # fmt: skip


def _fold(row: Row, k: int) -> int:
    return int(hashlib.sha256(f"{row.id}/cv".encode()).hexdigest(), 16) % k


def cross_validated_bands(rows: Sequence[Row], engines: Sequence[str], iters: int,
                          k: int = 3) -> dict[str, tuple[float, float]]:  # fmt: skip
    """Bands from out-of-fold residuals: the training rows split ``k`` ways, the profiles
    refitted on ``k - 1`` folds from neutral constants (:func:`neutral`) and the rest
    predicted, for every fold; the band of a metric
    is the 10th-90th percentile of ``published / predicted`` over those predictions. Held-out
    rows never enter. (In-sample residuals understate the error of a new row.)"""
    train = [r for r in rows if not r.held_out]
    out_of_fold: list[Comparison] = []
    for fold in range(k):
        fit_rows_ = [r for r in train if _fold(r, k) != fold]
        fitted = {e: fit_engine(e, fit_rows_, iters, start=neutral(get_profile(e)))
                  for e in engines}  # fmt: skip
        out_of_fold += compare([r for r in train if _fold(r, k) == fold], fitted)
    groups: dict[str, list[float]] = {}
    for c in out_of_fold:
        if GROUP[c.metric] not in ("weights", "kv"):
            groups.setdefault(GROUP[c.metric], []).append(c.published / c.predicted)
    return {g: (round(float(np.quantile(v, 0.1)), 3), round(float(np.quantile(v, 0.9)), 3))
            for g, v in groups.items() if len(v) >= 5}  # fmt: skip


def neutral(p: EngineProfile) -> EngineProfile:
    """``p`` with its fitted constants replaced by data-independent starting values (the
    generic roofline efficiencies), so that a cross-validation fold starts from nothing the
    other folds' rows taught."""
    gens = {*p.prefill_mfu, *p.decode_bandwidth}
    return dataclasses.replace(
        p, step_overhead_s=0.003, per_seq_overhead_s=2e-5, api_ttft_s=0.01, api_service_s=0.003,
        moe_efficiency=1.0, kv_efficiency=1.0, prefill_mfu={g: 0.5 for g in gens},
        attention_mfu={g: 0.4 for g in gens}, decode_bandwidth={g: 0.75 for g in gens},
    )  # fmt: skip


def fit_engine(engine: str, rows: Sequence[Row], iters: int,
               start: EngineProfile | None = None) -> EngineProfile:  # fmt: skip
    """Factors on the profile's time constants (``_fit_names``) minimising the mean squared
    log error of the training rows' latency and throughput metrics, with a weak pull to 1 so
    that constants the rows cannot tell apart stay put (Powell's method on log factors)."""
    from scipy.optimize import minimize

    base = start or get_profile(engine)
    train = [r for r in rows if r.engine == engine and not r.held_out and r.load]
    if len(train) < 3:
        return base
    if not train:
        return base
    names = _fit_names(engine, train)

    def loss(x: np.ndarray) -> float:
        prof = _scaled(base, names, x)
        cs = compare(train, {engine: prof})
        errs = [math.log(max(c.predicted, 1e-9) / c.published) for c in cs
                if GROUP[c.metric] not in ("weights", "kv")]  # fmt: skip
        return float(np.mean(np.square(errs))) + 1e-3 * float(np.sum(np.square(x)))

    res = minimize(loss, np.zeros(len(names)), method="Powell",
                   bounds=[(-1.5, 1.5)] * len(names),
                   options={"maxiter": iters, "xtol": 1e-2, "ftol": 1e-4})  # fmt: skip
    factors = ", ".join(f"{n} x{math.exp(v):.3f}" for n, v in zip(names, res.x, strict=True))
    start = loss(np.zeros(len(names)))
    print(f"{engine}: {len(train)} training rows, loss {start:.4f} -> {res.fun:.4f}, {factors}")
    return _scaled(base, names, res.x)


def bands_of(cs: Sequence[Comparison]) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    groups: dict[str, list[float]] = {}
    for c in cs:
        if not c.row.held_out:
            groups.setdefault(GROUP[c.metric], []).append(c.published / c.predicted)
    for g, v in groups.items():
        if g not in ("weights", "kv") and len(v) >= 5:
            out[g] = (round(float(np.quantile(v, 0.1)), 3), round(float(np.quantile(v, 0.9)), 3))
    return out


def _profile_text(p: EngineProfile) -> str:
    def tab(t: Mapping[str, float]) -> str:
        return "{" + ", ".join(f'"{k}": {v:.3f}' for k, v in t.items()) + "}"

    return (f"    step_overhead_s={p.step_overhead_s:.6g},\n"
            f"    per_seq_overhead_s={p.per_seq_overhead_s:.6g},\n"
            f"    prefill_mfu={tab(p.prefill_mfu)},\n    attention_mfu={tab(p.attention_mfu)},\n"
            f"    decode_bandwidth={tab(p.decode_bandwidth)},\n"
            f"    api_ttft_s={p.api_ttft_s:.6g},\n    api_service_s={p.api_service_s:.6g},\n"
            f"    moe_efficiency={p.moe_efficiency:.3f},\n"
            f"    kv_efficiency={p.kv_efficiency:.3f},")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--json", type=Path, help="write the comparisons as JSON")
    ap.add_argument("--fit", action="store_true", help="refit the time constants (training rows)")
    ap.add_argument("--engines", default="trtllm,vllm,sglang", help="engines --fit fits")
    ap.add_argument("--iters", type=int, default=3, help="Powell iterations per engine")
    ap.add_argument("--cv-bands", action="store_true",
                    help="bands from 3-fold cross-validation on the training rows")  # fmt: skip
    args = ap.parse_args(argv)
    rows = load_rows(args.data)
    engines = [e for e in args.engines.split(",") if e]
    if args.cv_bands:
        print(
            "BANDS (out-of-fold, training rows):", cross_validated_bands(rows, engines, args.iters)
        )
        return 0
    if args.fit:
        fitted = {e: fit_engine(e, rows, args.iters) for e in engines}
        for e, p in fitted.items():
            print(f"\n# {e}\n{_profile_text(p)}")
        cs = compare(rows, fitted)
        print("\nBANDS (training rows, published / predicted, 10th-90th percentile):",
              bands_of(cs))  # fmt: skip
    else:
        cs = compare(rows)
    print(render(cs))
    if args.json:
        args.json.write_text(json.dumps({"comparisons": [
            {"row": c.row.id, "held_out": c.row.held_out, "engine": c.row.engine,
             "model": c.row.model, "gpu": c.row.gpu, "metric": c.metric,
             "predicted": c.predicted, "published": c.published, "error": c.error,
             "in_band": c.in_band, "source": c.row.source} for c in cs],
            "summary": summary(cs)}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
