"""Comparing two deployment groups on the same traffic: what is measured and how it is costed.

Pure: records, capacities and prices in; ``estimator.verdict`` turns them into a typed,
JSON-serialisable ``Verdict`` (the online tracker ``estimator.experiments`` and
``rightsizer compare`` both end there).

Per group: requests (live and shadow), errors, tokens, the measured TTFT and per-request
mean inter-token latency percentiles, SLO attainment (a request attains the SLO when its TTFT
and its own p95 gap are within the targets), the capacity at the SLO per replica (from the
group's calibrated step model on the group's own request mix, ``estimator.capacity``), and
its cost: a GPU group costs ``usd_per_hour`` per replica (the catalog price x GPUs, or the
configured price) and needs ``ceil(rate / capacity)`` replicas to serve a rate at the SLO (no
spare: the same policy for both); a managed API costs its per-token prices on the group's own
token counts. $/1M tokens is at capacity for a GPU group (what a fully used replica costs per
token) and the list price for a managed one.

Between the groups (candidate vs baseline):

* latency: bootstrap CIs of the p50/p95 differences (``estimator.abtest``), paired on the same
  requests where the candidate's records are shadow copies of the baseline's;
* error rate and SLO-miss rate: Newcombe CIs of the differences;
* capacity ratio with a CI from a delete-a-block jackknife: the records are cut into
  ``blocks`` contiguous time blocks, the step models are refitted without each block in turn
  and the capacities searched again (the tracker does this); the CI is on the log ratio;
* cost ratio per month at the current and the forecast peak rate (whole replicas; its CI
  evaluates each group's cost at the ends of its own capacity CI, a conservative bound) and
  per token at capacity (continuous; CI from the jackknife);
* for a managed group against a GPU group, the break-even rate: where the managed bill equals
  one dedicated replica's; below it the managed API is cheaper. None when the managed API is
  cheaper per request than a fully used dedicated replica (then it is cheaper at any rate).

Differences whose CI includes zero (or a ratio of one) are reported as not significant, and the
verdict says so instead of calling a winner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from estimator.cost import HOURS_PER_MONTH
from estimator.records import Outcome, RequestRecord

Scalar = str | int | float | bool
_ERROR = frozenset({Outcome.UPSTREAM_ERROR, Outcome.TIMEOUT})
_JUDGED = _ERROR | {Outcome.OK, Outcome.CLIENT_ERROR}
CAPACITY_METHOD = "delete-a-block jackknife over time blocks (step models refitted)"


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupSpec:
    """What a deployment group runs and what it costs (the proxy's ``groups[]``)."""

    name: str
    backends: tuple[str, ...] = ()
    engine: str = ""
    gpu: str | None = None
    gpus_per_backend: int = 1
    quant: str = "bf16"
    max_num_seqs: int | None = None
    settings: Mapping[str, Scalar] = field(default_factory=dict)
    usd_per_hour: float | None = None  # per replica; None: catalog price x gpus_per_backend
    usd_per_1m_input_tokens: float | None = None  # a managed API, priced per token
    usd_per_1m_output_tokens: float | None = None
    model_config: str | None = None

    @property
    def managed(self) -> bool:
        return self.usd_per_1m_input_tokens is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class ExperimentSpec:
    name: str
    baseline: str
    candidate: str
    models: tuple[str, ...] = ()
    min_requests: int = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class ExperimentsSpec:
    """Groups and experiments for the estimator (``EstimatorConfig.experiments``)."""

    groups: tuple[GroupSpec, ...] = ()
    experiments: tuple[ExperimentSpec, ...] = ()
    blocks: int = 6  # jackknife blocks for the capacity CI (0: no CI)
    verdict_interval_s: float = 60.0  # how often the capacities are searched again
    records_per_group: int = 4000  # most recent records kept per group

    def group(self, name: str) -> GroupSpec | None:
        return next((g for g in self.groups if g.name == name), None)


def slo_outcome(rec: RequestRecord, slo_ttft_s: float, slo_itl_s: float) -> bool | None:
    """Did a request attain the SLO? A failed request did not; None when it cannot tell
    (not streamed, or an outcome that is nobody's doing: shed, cancelled)."""
    if rec.outcome not in _JUDGED or (rec.outcome is Outcome.CLIENT_ERROR and rec.backend is None):
        return None
    if rec.outcome is not Outcome.OK:
        return False
    ttft = rec.ttft_s
    if not rec.streamed or ttft is None:
        return None
    p95 = rec.itl.p95
    return ttft <= slo_ttft_s and (p95 is None or p95 <= slo_itl_s)


def is_error(rec: RequestRecord) -> bool | None:
    """Upstream error, timeout or a backend's own 4xx; None for outcomes nobody is judged by."""
    if rec.outcome not in _JUDGED or (rec.outcome is Outcome.CLIENT_ERROR and rec.backend is None):
        return None
    return rec.outcome is not Outcome.OK


@dataclass(frozen=True, slots=True, kw_only=True)
class Capacity:
    """A group's capacity at the SLO per replica, from the tracker (``estimator.experiments``)."""

    rps: float | None  # None: unknown (no step model) or not applicable (managed)
    low: float | None = None  # CI (jackknife), when there is one
    high: float | None = None
    replicates: tuple[float, ...] = ()  # the jackknife's leave-one-block-out capacities
    source: str = "none"  # calibrated, prior, none, managed
    limiting: str | None = None
    fit_error_p90: float | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Sample:
    """What the verdict reads of one group's records."""

    records: tuple[RequestRecord, ...]
    ttft: np.ndarray  # OK streamed requests
    itl: np.ndarray  # per-request mean gap, OK streamed requests with 2+ tokens
    judged: int
    errors: int
    slo_n: int
    slo_miss: int
    slo_ttft_s: float = math.inf
    slo_itl_s: float = math.inf

    @property
    def meets_slo(self) -> bool | None:
        """The group's p95 TTFT and p95 per-request mean inter-token gap within the targets
        (None without streamed requests). Per request the rule in ``slo_outcome`` is stricter:
        a short answer's own p95 gap is nearly its longest one."""
        if self.ttft.size == 0:
            return None
        itl_ok = self.itl.size == 0 or float(np.quantile(self.itl, 0.95)) <= self.slo_itl_s
        return float(np.quantile(self.ttft, 0.95)) <= self.slo_ttft_s and itl_ok

    @classmethod
    def of(cls, records: Sequence[RequestRecord], slo_ttft_s: float, slo_itl_s: float) -> Sample:
        ttft, itl = [], []
        judged = errors = slo_n = miss = 0
        for r in records:
            err = is_error(r)
            if err is not None:
                judged += 1
                errors += int(err)
            met = slo_outcome(r, slo_ttft_s, slo_itl_s)
            if met is not None:
                slo_n += 1
                miss += int(not met)
            if r.outcome is Outcome.OK and r.streamed and r.ttft_s is not None:
                ttft.append(r.ttft_s)
                if r.itl.mean is not None:
                    itl.append(r.itl.mean)
        return cls(tuple(records), np.asarray(ttft), np.asarray(itl), judged, errors, slo_n, miss,
                   slo_ttft_s, slo_itl_s)  # fmt: skip

    def tokens(self) -> tuple[int, int, float | None, float | None]:
        ok = [r for r in self.records if r.outcome is Outcome.OK and r.prompt_tokens is not None]
        p = sum(r.prompt_tokens or 0 for r in ok)
        c = sum(r.completion_tokens or 0 for r in ok)
        n = len(ok)
        return p, c, (p / n if n else None), (c / n if n else None)


def paired(base: Sequence[RequestRecord], cand: Sequence[RequestRecord]) -> tuple[list[float], ...]:
    """TTFT and per-request mean ITL of the requests both groups served (shadow copies carry
    the client request's id): ``(ttft_b, ttft_c, itl_b, itl_c)``."""
    by_id = {r.request_id: r for r in base if r.outcome is Outcome.OK and r.ttft_s is not None}
    tb, tc, ib, ic = [], [], [], []
    for r in cand:
        b = by_id.get(r.request_id)
        if b is None or r.outcome is not Outcome.OK or r.ttft_s is None or b.ttft_s is None:
            continue
        tb.append(b.ttft_s)
        tc.append(r.ttft_s)
        if r.itl.mean is not None and b.itl.mean is not None:
            ib.append(b.itl.mean)
            ic.append(r.itl.mean)
    return tb, tc, ib, ic


# --- cost ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Pricing:
    usd_per_hour: float | None = None  # one replica of a GPU group
    usd_per_request: float | None = None  # a managed API, on the group's mean tokens


def pricing(
    spec: GroupSpec,
    gpu_usd_per_hour: float | None,
    mean_prompt: float | None,
    mean_output: float | None,
) -> Pricing:
    """A group's price: per replica-hour (configured, else the GPU's x GPUs) or per request."""
    if spec.managed:
        if mean_prompt is None or mean_output is None:
            return Pricing()
        per_request = (
            mean_prompt * (spec.usd_per_1m_input_tokens or 0.0)
            + mean_output * (spec.usd_per_1m_output_tokens or 0.0)
        ) / 1e6
        return Pricing(usd_per_request=per_request)
    if spec.usd_per_hour is not None:
        return Pricing(usd_per_hour=spec.usd_per_hour)
    if gpu_usd_per_hour is None:
        return Pricing()
    return Pricing(usd_per_hour=gpu_usd_per_hour * spec.gpus_per_backend)


def replicas_for(rate_rps: float, capacity_rps: float | None) -> int | None:
    """Replicas that serve ``rate_rps`` at the SLO (at least one); None when unknown or when
    no rate meets the SLO."""
    if capacity_rps is None or capacity_rps <= 0:
        return None
    return max(1, math.ceil(rate_rps / capacity_rps - 1e-9))


def monthly(
    price: Pricing, capacity_rps: float | None, rate_rps: float
) -> tuple[int | None, float | None]:
    """(replicas, $/month) to serve ``rate_rps`` at the SLO; managed: (None, the bill)."""
    if price.usd_per_request is not None:
        return None, rate_rps * 3600.0 * HOURS_PER_MONTH * price.usd_per_request
    n = replicas_for(rate_rps, capacity_rps)
    if n is None or price.usd_per_hour is None:
        return n, None
    return n, n * price.usd_per_hour * HOURS_PER_MONTH


def per_1m_tokens(
    price: Pricing, capacity_rps: float | None, tokens_per_request: float | None
) -> float | None:
    """$ per 1M tokens (prompt + output): a fully used replica, or the managed list price."""
    if not tokens_per_request:
        return None
    if price.usd_per_request is not None:
        return price.usd_per_request / tokens_per_request * 1e6
    if price.usd_per_hour is None or not capacity_rps:
        return None
    return price.usd_per_hour / (capacity_rps * 3600.0 * tokens_per_request) * 1e6


def break_even(
    gpu_usd_per_hour: float, capacity_rps: float, managed_usd_per_request: float
) -> float | None:
    """The rate at which the managed bill equals one dedicated replica's (module docstring)."""
    if managed_usd_per_request <= 0 or capacity_rps <= 0:
        return None
    rate = gpu_usd_per_hour / (3600.0 * managed_usd_per_request)
    return rate if rate <= capacity_rps else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None
