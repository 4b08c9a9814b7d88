"""Experiments in the estimator: each deployment group a deployment of its own.

``ExperimentTracker`` (owned by ``estimator.service.Estimator``, or built offline by
``compare_records``) keeps, per (experiment, model, group), the group's most recent records
(live and shadow), and per backend its last engine snapshot; per (experiment, model) the
arrivals of the live traffic (the rate the groups are priced at and its forecast peak). Shadow
copies count for their group (the candidate's latency and fit) but not as traffic.

On ``refresh`` (at most every ``verdict_interval_s`` per experiment, sooner while it has no
verdict or once its records grew by a fifth), per group: a step model fitted on the group's
own records (``estimator.calibrate``;
the roofline prior from its model config and GPU when the fit is not trusted), its engine
limits (``max_num_seqs`` from the group's description or its engine, KV capacity from its
engine's snapshot or the memory plan), its request mix (its own token counts: engines do not
tokenise alike) and the capacity at the SLO per replica (``estimator.capacity``). The CI of
each capacity and of their ratio comes from a delete-a-block jackknife: the records of both
groups are cut into ``blocks`` spans of time, and each span is left out in turn, the step
models refitted and the capacities searched again with the same simulated arrivals (so the
spread is the data's, not the simulator's). Then ``estimator.verdict.build_verdict``.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from estimator.calibrate import CalibratorConfig, OnlineCalibrator
from estimator.capacity import Slo, max_rate_at_slo
from estimator.catalog import GpuSpec
from estimator.compare import Capacity, ExperimentSpec, ExperimentsSpec, GroupSpec, Sample
from estimator.engine import StepModel, roofline_prior
from estimator.engines import UnknownEngine, get_profile
from estimator.limits import assumed_limits
from estimator.memory import MemoryPlan, plan_memory
from estimator.modelarch import ModelArch, load_model_arch
from estimator.projection import choose_step, engine_limits, engine_observed, workload_of
from estimator.records import BackendSnapshot, Outcome, RequestRecord
from estimator.settings import resolve_model_config
from estimator.simulate import EngineLimits
from estimator.traffic import TrafficStats
from estimator.verdict import Side, Verdict, build_verdict

if TYPE_CHECKING:
    from estimator.settings import EstimatorConfig

_Z95 = 1.959964
_MIN_GAP_SHARE = 0.25  # of the group's median mean gap, below which a stream was not timed
_DEGENERATE = 0.6  # a fit whose median error is this large explains nothing: not used
_FIT_SHARE = 0.8  # of the experiment's min_requests a group's fit needs (some are not timed)
Key = tuple[str, str]  # (experiment, model)


class ExperimentTracker:
    """See the module docstring."""

    def __init__(
        self, config: EstimatorConfig, catalog: Mapping[str, GpuSpec], spec: ExperimentsSpec
    ) -> None:
        self.spec = spec
        self.config, self.catalog = config, catalog
        self.slo = Slo(ttft_p95_s=config.slo_ttft_p95_s, itl_p95_s=config.slo_itl_p95_s)
        self._group_of = {b: g.name for g in spec.groups for b in g.backends}
        self._records: dict[tuple[str, str, str], collections.deque[RequestRecord]] = {}
        self._traffic: dict[Key, TrafficStats] = {}
        self._snapshots: dict[str, BackendSnapshot] = {}
        self._verdicts: dict[Key, tuple[float, Verdict, int]] = {}
        self._archs: dict[str, ModelArch | None] = {}

    def experiment_of(self, model: str, group: str | None) -> ExperimentSpec | None:
        for e in self.spec.experiments:
            if group in (e.baseline, e.candidate) and (not e.models or model in e.models):
                return e
        return None

    # --- feeding (the refresh thread) ---

    def observe(self, r: RequestRecord) -> None:
        exp = self.experiment_of(r.model, r.group)
        if exp is None or r.group is None:
            return
        key = (exp.name, r.model, r.group)
        ring = self._records.get(key)
        if ring is None:
            ring = self._records[key] = collections.deque(maxlen=self.spec.records_per_group)
        ring.append(r)
        if not r.shadow:
            traffic = self._traffic.get((exp.name, r.model))
            if traffic is None:
                traffic = self._traffic[(exp.name, r.model)] = TrafficStats(1 << 14)
            traffic.observe(r)

    def observe_backend(self, s: BackendSnapshot) -> None:
        if s.backend in self._group_of:
            self._snapshots[s.backend] = s

    # --- refresh ---

    def refresh(self, now: float, *, rate_rps: float | None = None) -> tuple[Verdict, ...]:
        """A verdict per (experiment, model) with traffic (module docstring)."""
        out = []
        for (exp_name, model), traffic in sorted(self._traffic.items()):
            exp = next(e for e in self.spec.experiments if e.name == exp_name)
            last = self._verdicts.get((exp_name, model))
            groups = (exp.baseline, exp.candidate)
            n = sum(len(self._records.get((exp_name, model, g), ())) for g in groups)
            if last is not None and not self._due(last, now, n):
                out.append(last[1])
                continue
            rate = traffic.rate(300.0, now) if rate_rps is None else rate_rps
            peak = max(rate, traffic.forecaster(now).peak(self.config.forecast_horizon_s))
            verdict = self._verdict(exp, model, rate, peak, now)
            self._verdicts[(exp_name, model)] = (now, verdict, n)
            out.append(verdict)
        return tuple(out)

    def _due(self, last: tuple[float, Verdict, int], now: float, n: int) -> bool:
        """Search the capacities again: no verdict yet, the interval passed, or the records
        grew by a fifth (a verdict made on the first requests must not stand for long)."""
        at, verdict, n0 = last
        return (verdict.status != "ok" or now - at >= self.spec.verdict_interval_s
                or n >= 1.2 * n0 + 1)  # fmt: skip

    def _verdict(
        self, exp: ExperimentSpec, model: str, rate: float, peak: float, now: float
    ) -> Verdict:
        names = (exp.baseline, exp.candidate)
        recs = {g: list(self._records.get((exp.name, model, g), ())) for g in names}
        samples = {g: Sample.of(recs[g], self.slo.ttft_p95_s, self.slo.itl_p95_s) for g in names}
        ready = all(s.judged >= exp.min_requests for s in samples.values())
        edges = _block_edges([r for g in names for r in recs[g]], self.spec.blocks)
        shared = _same_tokens(recs[names[0]], recs[names[1]])
        sides = []
        for g in names:
            spec = self.spec.group(g) or GroupSpec(name=g)
            mix = [*recs[names[0]], *recs[names[1]]] if shared else recs[g]
            least = _FIT_SHARE * exp.min_requests
            cap = (self._capacity(spec, model, recs[g], mix, edges, least) if ready
                   else Capacity(rps=None))  # fmt: skip
            gpu = self.catalog.get(spec.gpu) if spec.gpu else None
            sides.append(Side(spec=spec, sample=samples[g], capacity=cap,
                              gpu_usd_per_hour=gpu.price_per_hour if gpu else None))  # fmt: skip
        return build_verdict(experiment=exp.name, model=model, baseline=sides[0],
                             candidate=sides[1], rate_rps=rate, peak_rps=peak, now=now,
                             min_requests=exp.min_requests)  # fmt: skip

    # --- one group's capacity ---

    def _capacity(
        self, spec: GroupSpec, model: str, records: Sequence[RequestRecord],
        mix: Sequence[RequestRecord], edges: Sequence[float], least: float,
    ) -> Capacity:  # fmt: skip
        if spec.managed:
            return Capacity(rps=None, source="managed")
        cfg = self.config
        snaps = [s for b in spec.backends if (s := self._snapshots.get(b)) is not None]
        engine = _engine(spec.engine, cfg.engine)
        gpu = self.catalog.get(spec.gpu) if spec.gpu else None
        seqs = spec.max_num_seqs or next((s.max_num_seqs for s in snaps if s.max_num_seqs), None)
        m = seqs or cfg.max_num_seqs or assumed_limits(engine, gpu).max_num_seqs
        prior = self._prior(spec, model)
        step, source, notes, fit_err = self._fit(records, prior, m, least)
        traffic = _mix(mix)
        workload = workload_of(traffic)
        if step is None or workload is None:
            return Capacity(rps=None, source=source, notes=tuple(notes))
        limits, lim_notes = engine_limits(
            engine_observed(snaps), self._plan(spec, model, m),
            dataclasses.replace(cfg, max_num_seqs=m, engine=engine), traffic.cached_ratio(), gpu,
        )  # fmt: skip
        cap = max_rate_at_slo(step, limits, workload, self.slo, n_requests=cfg.sim_requests)
        replicates: list[float] = []
        if source == "calibrated" and len(edges) >= 4:
            replicates = self._jackknife(records, mix, edges, prior, m, limits, least)
        low = high = None
        if len(replicates) >= 3 and cap.per_replica_rps > 0:
            logs = [math.log(x) for x in replicates if x > 0]
            if len(logs) == len(replicates):
                k, mean = len(logs), sum(logs) / len(logs)
                se = math.sqrt((k - 1) / k * sum((x - mean) ** 2 for x in logs))
                low = float(cap.per_replica_rps * math.exp(-_Z95 * se))
                high = float(cap.per_replica_rps * math.exp(_Z95 * se))
        return Capacity(rps=float(cap.per_replica_rps), low=low, high=high,
                        replicates=tuple(replicates),
                        source=source, limiting=cap.limiting, fit_error_p90=fit_err,
                        notes=tuple([*notes, *lim_notes]))  # fmt: skip

    def _fit(
        self, records: Iterable[RequestRecord], prior: StepModel | None, m: int, least: float,
    ) -> tuple[StepModel | None, str, list[str], float | None]:  # fmt: skip
        """The group's step model (module docstring), fitted on at least ``least`` records."""
        rows = timed(records)
        cal_cfg = CalibratorConfig(capacity=max(1, len(rows)), refit_new_fraction=0.0)
        calibrator = OnlineCalibrator(prior=prior, config=cal_cfg)
        for r in rows:
            calibrator.observe(r)
        cal = calibrator.fit(max_num_seqs=m, reuse=False) if len(calibrator) else None
        errs = [e for e in (cal.ttft_p90_re, cal.itl_p90_re) if e is not None] if cal else []
        fit_err = max(errs) if errs else None
        if (cal is not None and not cal.trusted and cal.n_records >= least
                and max(cal.ttft_mare or 1.0, cal.itl_mare or 1.0) < _DEGENERATE):  # fmt: skip
            # the group's own fit over a prior that knows nothing of its software overheads
            note = (f"fit not trusted by the estimator's bounds (TTFT error p50 "
                    f"{_pct(cal.ttft_mare)}, ITL {_pct(cal.itl_mare)}): used, its spread is "
                    "in the capacity CI")  # fmt: skip
            return cal.step, "calibrated", [note], fit_err
        step, source, notes = choose_step(cal, prior, math.ceil(least))
        return step, source, notes, fit_err

    def _jackknife(
        self, records: Sequence[RequestRecord], mix: Sequence[RequestRecord],
        edges: Sequence[float], prior: StepModel | None, m: int, limits: EngineLimits,
        least: float,
    ) -> list[float]:  # fmt: skip
        """Capacity with each time block left out in turn, of the fit and of the request mix
        (the same simulated arrivals)."""
        out = []
        for lo, hi in itertools.pairwise(edges):
            kept = [r for r in records if not lo <= r.arrival_epoch < hi]
            share = 1.0 - 1.0 / (len(edges) - 1)  # a replicate keeps this much of the records
            step, source, _, _ = self._fit(kept, prior, m, least * share)
            workload = workload_of(_mix([r for r in mix if not lo <= r.arrival_epoch < hi]))
            if step is None or source != "calibrated" or workload is None:
                return []
            cap = max_rate_at_slo(step, limits, workload, self.slo,
                                  n_requests=self.config.sim_requests)  # fmt: skip
            out.append(float(cap.per_replica_rps))
        return out

    def _arch(self, spec: GroupSpec, model: str) -> ModelArch | None:
        path = spec.model_config or self.config.model_configs.get(model)
        if path is None:
            return None
        if path not in self._archs:
            try:
                self._archs[path] = load_model_arch(resolve_model_config(path))
            except (OSError, ValueError):
                self._archs[path] = None
        return self._archs[path]

    def _prior(self, spec: GroupSpec, model: str) -> StepModel | None:
        arch, gpu = self._arch(spec, model), self.catalog.get(spec.gpu) if spec.gpu else None
        if arch is None or gpu is None:
            return None
        try:
            return roofline_prior(arch, gpu, tp=spec.gpus_per_backend, quant=_quant(spec.quant))
        except ValueError:
            return None

    def _plan(self, spec: GroupSpec, model: str, m: int) -> MemoryPlan | None:
        arch, gpu = self._arch(spec, model), self.catalog.get(spec.gpu) if spec.gpu else None
        if arch is None or gpu is None:
            return None
        try:
            return plan_memory(arch, gpu, tp=spec.gpus_per_backend, quant=_quant(spec.quant),
                               max_num_seqs=m, max_model_len=self.config.max_model_len)  # fmt: skip
        except ValueError:
            return None


def timed(records: Iterable[RequestRecord]) -> list[RequestRecord]:
    """The records whose stream showed the decode's pace. An answer that came in a few large
    chunks (an engine's API server falling behind and flushing many tokens at once), or whose
    mean gap is a small fraction of the group's usual one (two reads that happened to arrive
    together), has an end-to-first time that says nothing of its steps; with relative
    residuals the calibrator would let those near-zero step times decide the fit."""
    rows = [r for r in records
            if (c := r.completion_tokens or 0) >= 4 and r.itl.count >= 0.5 * (c - 1)
            and r.itl.mean is not None]  # fmt: skip
    if not rows:
        return []
    usual = float(np.median([r.itl.mean for r in rows]))
    return [r for r in rows if (r.itl.mean or 0.0) >= _MIN_GAP_SHARE * usual]


def _engine(name: str, default: str) -> str:
    """The group's engine when the estimator has a profile of it, else the configured one
    (a group's ``engine`` is free text for the report: ``managed``, a version string)."""
    try:
        return get_profile(name).name if name else default
    except UnknownEngine:
        return default


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _mix(records: Iterable[RequestRecord]) -> TrafficStats:
    """The request mix (prompt, output tokens) of these records."""
    rows = [r for r in records if r.prompt_tokens]
    traffic = TrafficStats(max(1, len(rows)))
    traffic.observe_many(rows)
    return traffic


def _same_tokens(a: Sequence[RequestRecord], b: Sequence[RequestRecord]) -> bool:
    """Do both groups count the requests' tokens alike (mean prompt tokens within 10%)? Then
    their capacities are searched on one shared mix; engines that tokenise differently are
    each judged on their own counts."""
    means = []
    for rs in (a, b):
        p = [r.prompt_tokens for r in rs if r.prompt_tokens and r.outcome is Outcome.OK]
        if len(p) < 10:
            return False
        means.append(sum(p) / len(p))
    return abs(means[0] - means[1]) <= 0.1 * max(means)


def _quant(q: str) -> str:
    q = q.lower()
    return {"int4-awq": "int4", "int4-gptq": "int4", "awq": "int4", "gptq": "int4"}.get(q, q)


def _block_edges(records: Sequence[RequestRecord], blocks: int) -> list[float]:
    """``blocks + 1`` arrival-time edges cutting the records into blocks of equal counts."""
    if blocks < 3 or len(records) < 4 * blocks:
        return []
    t = np.sort(np.fromiter((r.arrival_epoch for r in records), dtype=np.float64))
    edges = [float(x) for x in np.quantile(t, np.linspace(0.0, 1.0, blocks + 1))]
    edges[-1] = math.nextafter(edges[-1], math.inf)
    return edges


def compare_records(
    baseline: Iterable[RequestRecord],
    candidate: Iterable[RequestRecord],
    config: EstimatorConfig,
    catalog: Mapping[str, GpuSpec],
    spec: ExperimentsSpec,
    *,
    rate_rps: float | None = None,
) -> Verdict:
    """Offline: the verdict of two groups' records (e.g. two request logs). ``spec`` names
    the groups (its first experiment); records without a group are given
    the side's group. The rate defaults to the baseline's live arrivals over its time span
    (both logs' when they cover the same time: one traffic split between them)."""
    assert spec.experiments
    exp = spec.experiments[0]
    b = [r if r.group else dataclasses.replace(r, group=exp.baseline) for r in baseline]
    c = [r if r.group else dataclasses.replace(r, group=exp.candidate) for r in candidate]
    tracker = ExperimentTracker(config, catalog, spec)
    for r in (*b, *c):
        tracker.observe(r)
    last = max((r.arrival_epoch for r in (*b, *c)), default=0.0)
    rate = rate_rps if rate_rps is not None else offline_rate(b, c)
    verdicts = tracker.refresh(last + 1.0, rate_rps=rate)
    if not verdicts:
        raise ValueError("no live (non-shadow) records of the experiment's groups")
    return verdicts[0]


def offline_rate(base: Sequence[RequestRecord], cand: Sequence[RequestRecord]) -> float:
    """Live arrivals per second of the traffic the logs record (see ``compare_records``)."""

    def span(rs: Sequence[RequestRecord]) -> tuple[float, float] | None:
        t = [r.arrival_epoch for r in rs if not r.shadow]
        return (min(t), max(t)) if len(t) >= 2 else None

    sb, sc = span(base), span(cand)
    if sb is None:
        return 0.0
    live_b = sum(not r.shadow for r in base)
    if sc is not None:
        overlap = min(sb[1], sc[1]) - max(sb[0], sc[0])
        if overlap > 0.5 * (sb[1] - sb[0]):  # one traffic split between the groups
            lo, hi = min(sb[0], sc[0]), max(sb[1], sc[1])
            return (live_b + sum(not r.shadow for r in cand)) / max(hi - lo, 1e-9)
    return live_b / max(sb[1] - sb[0], 1e-9)
