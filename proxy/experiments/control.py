"""Experiments between deployment groups: who gets which group, and when a canary goes back.

**Groups** (``groups:``) name sets of backends and what they run; every record carries the group
of the backend that served it. **An experiment** (``experiments:``) puts a candidate group
beside a baseline group for one or more models.

Assignment, once per request (``assign``), first that applies:

1. ``header``: the request names one of the experiment's groups in that header (testers, load
   tests against one group); honoured even after a rollback;
2. ``tenant``: the request's tenant is in ``tenants`` (while the experiment runs);
3. ``weight``: ``u < weight`` sends it to the candidate, where ``u`` in [0, 1) is a hash
   (blake2b) of the experiment's name and the sticky key: the request id, the session header
   (``routing.session_header``; the request id without one) or the tenant. A key's ``u`` never
   changes, so raising the weight only adds keys to the candidate: a session that was on the
   candidate at 5% is still there at 10%.

The choice travels with the request (``InferenceRequest.group``, ``RouteCtx.group``): the
``group`` routing filter narrows the backends to the group, and admission queues per
(model, group), so a saturated canary never holds up the baseline's requests.

**Rollback** (``tick``, every ``rollback.interval_s``): per experiment and group a sliding
window of ``rollback.window_s`` counts request attempts and errors (upstream errors, timeouts,
backend 4xx, and attempts that failed and were retried elsewhere) and streamed requests that
missed the SLO (TTFT or their own p95 inter-token gap over the target; a failed request
missed it). The canary is rolled back (weight 0, logged, counted, alerting) when, with at
least ``min_samples`` candidate requests in the window, the candidate's error or SLO-miss rate
exceeds the baseline's by more than ``error_margin`` / ``slo_margin`` with one-sided
``confidence``
(``estimator.abtest.worse_by``); or when no candidate backend has been available for a whole
window while it was meant to get traffic. The baseline's side uses its window, or everything
since the experiment (re)started when the window holds fewer than ``min_samples``. Shadow
copies count as candidate evidence: they are the same traffic.

Live control (``set``, ``POST /admin/experiments/<name>``): the weight and the shadow share,
without a restart; a weight set after a rollback resumes the experiment with empty windows.
Changes live in this proxy process (not persisted, not shared between replicas).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from estimator.abtest import worse_by
from estimator.records import Outcome, RequestRecord

from ..config import ExperimentConfig, GroupConfig
from ..request import InferenceRequest

log = logging.getLogger("rightsizer.experiments")

_ERROR_OUTCOMES = frozenset({Outcome.UPSTREAM_ERROR, Outcome.TIMEOUT})
_JUDGED_OUTCOMES = _ERROR_OUTCOMES | {Outcome.OK, Outcome.CLIENT_ERROR}


@dataclass(frozen=True, slots=True)
class Assignment:
    experiment: str
    group: str
    reason: str  # header, tenant or weight


def unit_hash(salt: str, key: str) -> float:
    """A uniform number in [0, 1) from ``salt`` and ``key`` (stable across processes)."""
    digest = hashlib.blake2b(
        f"{salt}\x00{key}".encode("utf-8", "surrogateescape"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class Window:
    """Per-second buckets ``[second, attempts, errors, slo samples, slo misses]`` over the last
    ``window_s`` seconds, plus the totals since the last ``clear``."""

    __slots__ = ("buckets", "total", "window_s")

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.buckets: collections.deque[list[int]] = collections.deque()
        self.total = [0, 0, 0, 0]

    def add(self, t: float, *, error: bool | None, slo_miss: bool | None) -> None:
        sec = int(t)
        if not self.buckets or self.buckets[-1][0] != sec:
            self.buckets.append([sec, 0, 0, 0, 0])
        row = self.buckets[-1]
        for i, v in ((1, error), (3, slo_miss)):
            if v is not None:
                row[i] += 1
                row[i + 1] += int(v)
                self.total[i - 1] += 1
                self.total[i] += int(v)

    def counts(self, now: float) -> tuple[int, int, int, int]:
        """(attempts, errors, slo samples, slo misses) in the window ending ``now``."""
        cutoff = int(now - self.window_s)
        b = self.buckets
        while b and b[0][0] <= cutoff:
            b.popleft()
        n = e = s = m = 0
        for _, dn, de, ds, dm in b:
            n, e, s, m = n + dn, e + de, s + ds, m + dm
        return n, e, s, m

    def clear(self) -> None:
        self.buckets.clear()
        self.total = [0, 0, 0, 0]


class Experiment:
    """One experiment's live state (owned by the event loop)."""

    def __init__(self, cfg: ExperimentConfig, wall: Callable[[], float]) -> None:
        self.config = cfg
        self.name = cfg.name
        self.baseline, self.candidate = cfg.baseline, cfg.candidate
        self.weight = cfg.weight
        self.shadow_share = cfg.shadow.share
        self.state = "running"
        self.rolled_back: dict[str, Any] | None = None
        self.windows = {g: Window(cfg.rollback.window_s) for g in (cfg.baseline, cfg.candidate)}
        self.assignments: collections.Counter[tuple[str, str]] = collections.Counter()
        self.rollbacks: collections.Counter[str] = collections.Counter()
        self.shadow: collections.Counter[str] = collections.Counter()
        self.unavailable_since: float | None = None
        self.last_check: dict[str, Any] = {}
        self.started_epoch = wall()

    @property
    def groups(self) -> tuple[str, str]:
        return self.baseline, self.candidate

    def exposed(self) -> bool:
        """Is the candidate meant to get client traffic now?"""
        return self.state == "running" and (self.weight > 0 or bool(self.config.tenants))

    def weights(self) -> dict[str, float]:
        return {self.baseline: 1.0 - self.weight, self.candidate: self.weight}


def classify(rec: RequestRecord, slo_ttft_s: float, slo_itl_s: float) -> tuple[bool, bool | None]:
    """(error, SLO missed) of a finished request; SLO None when it does not tell (not
    streamed). Call only for outcomes in ``_JUDGED_OUTCOMES``."""
    if rec.outcome is not Outcome.OK:
        return True, True
    ttft = rec.ttft_s
    if not rec.streamed or ttft is None:
        return False, None
    itl = rec.itl.p95
    return False, ttft > slo_ttft_s or (itl is not None and itl > slo_itl_s)


class Experiments:
    """Groups and experiments at run time (see the module docstring)."""

    def __init__(
        self,
        groups: Sequence[GroupConfig],
        experiments: Sequence[ExperimentConfig],
        *,
        slo_ttft_s: float,
        slo_itl_s: float,
        session_header: str = "x-session-id",
        serves: Callable[[str, str], bool] = lambda _g, _m: True,
        available: Callable[[str], bool] = lambda _g: True,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.groups = {g.name: g for g in groups}
        self._group_of = {b: g.name for g in groups for b in g.backends}
        self.experiments = [Experiment(e, wall) for e in experiments]
        self.by_name = {e.name: e for e in self.experiments}
        self.slo_ttft_s, self.slo_itl_s = slo_ttft_s, slo_itl_s
        self.session_header = session_header
        self.serves, self.available = serves, available
        self.clock, self.wall = clock, wall

    def group_of(self, backend: str | None) -> str | None:
        return None if backend is None else self._group_of.get(backend)

    def for_model(self, model: str) -> Experiment | None:
        for e in self.experiments:
            models = e.config.models
            if model in models or (
                not models and self.serves(e.baseline, model) and self.serves(e.candidate, model)
            ):
                return e
        return None

    # --- per request -----------------------------------------------------------------

    def assign(self, req: InferenceRequest, headers: Mapping[str, str]) -> Assignment | None:
        """The group of one request (module docstring), or None outside any experiment."""
        exp = self.for_model(req.model)
        if exp is None:
            return None
        cfg = exp.config
        if cfg.header:
            forced = headers.get(cfg.header)
            if forced in exp.groups:
                return self._count(exp, forced, "header")
        if exp.state == "running":
            if req.tenant in cfg.tenants:
                return self._count(exp, exp.candidate, "tenant")
            if exp.weight > 0 and unit_hash(exp.name, self._key(cfg, req, headers)) < exp.weight:
                return self._count(exp, exp.candidate, "weight")
        return self._count(exp, exp.baseline, "weight")

    def _key(self, cfg: ExperimentConfig, req: InferenceRequest, headers: Mapping[str, str]) -> str:
        if cfg.stickiness == "tenant":
            return req.tenant
        if cfg.stickiness == "session":
            return headers.get(self.session_header) or req.request_id
        return req.request_id

    @staticmethod
    def _count(exp: Experiment, group: str, reason: str) -> Assignment:
        exp.assignments[(group, reason)] += 1
        return Assignment(exp.name, group, reason)

    def shadow_wanted(self, exp: Experiment, request_id: str) -> bool:
        """Is this request's copy mirrored to the candidate? (an independent hash)"""
        share = exp.shadow_share
        return share > 0 and unit_hash(exp.name + "/shadow", request_id) < share

    def observe(self, rec: RequestRecord) -> None:
        """A finished request (live or shadow) of a group, for the rollback windows."""
        if rec.group is None or rec.outcome not in _JUDGED_OUTCOMES:
            return
        if rec.outcome is Outcome.CLIENT_ERROR and rec.backend is None:
            return  # refused by the proxy itself: no group's doing
        exp = self.for_model(rec.model)
        if exp is None or rec.group not in exp.windows:
            return
        error, miss = classify(rec, self.slo_ttft_s, self.slo_itl_s)
        exp.windows[rec.group].add(self.clock(), error=error, slo_miss=miss)

    def attempt_failed(self, req: InferenceRequest, backend: str) -> None:
        """An attempt on ``backend`` failed and the request was retried elsewhere."""
        group = self.group_of(backend)
        exp = self.for_model(req.model)
        if exp is not None and group in exp.windows:
            exp.windows[group].add(self.clock(), error=True, slo_miss=None)

    # --- rollback --------------------------------------------------------------------

    def tick(self) -> None:
        """Check every running experiment's rollback rule (module docstring)."""
        now = self.clock()
        for exp in self.experiments:
            verdict = self._judge(exp, now)
            if verdict is not None:
                self._roll_back(exp, *verdict)

    def _judge(self, exp: Experiment, now: float) -> tuple[str, dict[str, Any]] | None:
        rule = exp.config.rollback
        base, cand = exp.windows[exp.baseline], exp.windows[exp.candidate]
        bn, be, bs, bm = base.counts(now)
        cn, ce, cs, cm = cand.counts(now)
        if bn < rule.min_samples:  # too little baseline in the window: all since the start
            bn, be = base.total[0], base.total[1]
        if bs < rule.min_samples:
            bs, bm = base.total[2], base.total[3]
        checks: dict[str, Any] = {}
        for metric, (xc, nc, xb, nb), margin in (
            ("errors", (ce, cn, be, bn), rule.error_margin),
            ("slo", (cm, cs, bm, bs), rule.slo_margin),
        ):
            worse, low = worse_by(xc, nc, xb, nb, margin=margin, confidence=rule.confidence)
            judged = metric in rule.metrics and nc >= rule.min_samples
            checks[metric] = {
                "candidate": [xc, nc],
                "baseline": [xb, nb],
                "difference_lower_bound": round(low, 6),
                "judged": judged,
                "worse": judged and worse,
            }
        exp.last_check = checks
        if not (rule.enabled and exp.exposed()):
            exp.unavailable_since = None
            return None
        for metric in rule.metrics:
            if checks[metric]["worse"]:
                return metric, checks[metric]
        if self.available(exp.candidate):
            exp.unavailable_since = None
        elif exp.unavailable_since is None:
            exp.unavailable_since = now
        elif now - exp.unavailable_since >= rule.window_s:
            return "unavailable", {"seconds": round(now - exp.unavailable_since, 3)}
        return None

    def _roll_back(self, exp: Experiment, reason: str, numbers: dict[str, Any]) -> None:
        exp.rolled_back = {
            "reason": reason,
            "at_epoch": self.wall(),
            "weight_was": exp.weight,
            "numbers": numbers,
        }
        exp.weight, exp.state = 0.0, "rolled_back"
        exp.rollbacks[reason] += 1
        log.warning(
            "experiment %s: candidate %s rolled back (%s): %s; weight was %.3f",
            exp.name,
            exp.candidate,
            reason,
            numbers,
            exp.rolled_back["weight_was"],
        )

    # --- live control ----------------------------------------------------------------

    def set(self, name: str, *, weight: float | None = None, shadow: float | None = None) -> None:
        """Set the canary weight and/or the shadow share (both in [0, 1]); a weight given to a
        rolled-back experiment resumes it with empty windows. Raises KeyError, ValueError."""
        exp = self.by_name[name]
        for what, v in (("weight", weight), ("shadow", shadow)):
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"'{what}' must be in [0, 1], got {v}")
        if shadow is not None:
            exp.shadow_share = shadow
        if weight is not None:
            if exp.state != "running":
                exp.state = "running"
                for w in exp.windows.values():
                    w.clear()
                exp.unavailable_since = None
            exp.weight = weight
        log.info(
            "experiment %s: weight %.3f, shadow share %.3f", name, exp.weight, exp.shadow_share
        )

    def status(self, name: str) -> dict[str, Any]:
        """One experiment's live state as JSON-ready data."""
        exp = self.by_name[name]
        cfg, now = exp.config, self.clock()
        windows = {}
        for g, w in exp.windows.items():
            n, e, s, m = w.counts(now)
            windows[g] = {
                "requests": n,
                "errors": e,
                "slo_samples": s,
                "slo_misses": m,
                "since_start": dict(
                    zip(("requests", "errors", "slo_samples", "slo_misses"), w.total, strict=True)
                ),
            }
        return {
            "name": exp.name,
            "baseline": exp.baseline,
            "candidate": exp.candidate,
            "models": list(cfg.models),
            "state": exp.state,
            "weight": exp.weight,
            "shadow_share": exp.shadow_share,
            "stickiness": cfg.stickiness,
            "header": cfg.header,
            "tenants": list(cfg.tenants),
            "started_at_epoch": exp.started_epoch,
            "rolled_back": exp.rolled_back,
            "rollback_rule": {
                "enabled": cfg.rollback.enabled,
                "metrics": list(cfg.rollback.metrics),
                "error_margin": cfg.rollback.error_margin,
                "slo_margin": cfg.rollback.slo_margin,
                "confidence": cfg.rollback.confidence,
                "window_s": cfg.rollback.window_s,
                "min_samples": cfg.rollback.min_samples,
                "method": "one-sided Newcombe hybrid score bound of the rate difference",
            },
            "window": windows,
            "last_check": exp.last_check,
            "assignments": {f"{g}/{r}": n for (g, r), n in sorted(exp.assignments.items())},
            "shadow": dict(sorted(exp.shadow.items())),
        }

    def statuses(self) -> Iterable[dict[str, Any]]:
        return (self.status(e.name) for e in self.experiments)
