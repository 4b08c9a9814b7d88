"""Online calibration of the step model (``estimator.engine``) from the proxy's RequestRecords.

Keep one ``OnlineCalibrator`` per backend. ``observe(record)`` is the hot path: it keeps only
OK, streamed, dispatched records with token counts and load at dispatch, and writes eight
floats into a preallocated ring (default 100k rows; about 1 µs). ``fit(now)`` runs off the
hot path (about 30 ms of CPU on 100k records) and returns a ``Calibration``.

Observation model (c = StepModel coefficients ``c0, c_p, c_d, c_kv``; ``R`` = in-flight
requests at dispatch, this one excluded; ``M`` = ``max_num_seqs`` when known, else infinite):

* decode, per record: ``y = (end - first_token) / (completion - 1)`` (mean seconds per output
  token; ``itl.mean`` when the end is unknown) is the mean step time during its decode::

      y = c0 + c_p * pf + c_d * D + c_kv * K
      D = min(Dbar, M),  K = ctx + (D - 1) * ctx_bar,  ctx = prompt + completion / 2

  ``Dbar`` = mean in-flight requests (this one included) during this decode, from the
  overlaps of the ring's own records, scaled to the proxy's counts ``R`` (``R + 1`` where the
  ring cannot tell: see ``_decode_concurrency``; a snapshot regressor would bias the fit);
  ``pf`` = uncached prompt tokens of the window's requests whose first token (end of their
  prefill) fell inside this decode, per decode step (exact accounting from the ring);
  ``ctx_bar`` = weighted mean ``ctx`` of the window;
* first token, per record: ``y = first_token - dispatch`` (engine-side TTFT; the proxy's own
  queue is not engine physics) = queue effect + prefill::

      y = a * (c0 + c_d * Dq + c_kv * Dq * ctx_bar) + c_p * pt + q * max(0, R + 1 - M)
      a = 1.5 if R > 0 else 1.0,  Dq = min(R, M)

  ``a``: the step in progress at dispatch is half done on average, then the prefill step runs
  with the running sequences; ``pt`` = uncached prompt tokens of the window's requests whose
  first token fell in ``(dispatch + api, first_token]``, this one's own included: every
  prefill token the engine ran while this request waited delayed it by ``c_p`` (``api``, the
  profile's per-request cost, is spent in the API server before the engine sees the request:
  counting the prefills that ended inside it biased ``c_p`` low by about 10% on the demo's
  engines, whose 32 ms of API cost holds another prefill one time in seven); ``q`` (seconds per
  request queued beyond ``max_num_seqs``) is a nuisance term, not part of the step model.
  The network and HTTP latency between proxy and engine is assumed small next to a step (no
  separate offset: it would leave ``c0`` and ``c_d`` nearly unidentifiable); on a LAN it is
  well under a millisecond.

Prefill attention (``c_attn``, ``StepModel.prefill_attn_s_per_pair``): a sixth coefficient
priced per (query, key) pair of the prefills above: the record's own prompt's pairs
(``u (u + 1) / 2 + u * cached`` for ``u`` uncached tokens) in its TTFT row, and the pairs of
the prefills inside its decode, per step, in its ITL row. A mix of prompt lengths separates it
from ``c_p`` (twice the tokens, four times the pairs); one length alone leaves it to the
prior. ``CalibratorConfig.fit_attention`` False drops it (the calibrator before issue 14,
whose linear ``c_p`` averaged over the mix under-priced the long prompts' steps).

Per-request API cost (``StepModel.request_overhead_s``: HTTP, tokenisation, the API server's
queue): the engine profile's value, a fixed offset subtracted from every TTFT target (the
fit errors are on the observed values). Learning it as well would leave it trading off
against ``c_p`` and ``c_attn`` in the TTFT rows (on simulated engines it took 4 ms of the
prefill and moved ``c_attn`` by 35%). But when the fit with the profile's cost is not
trusted, the fit is run again with the cost as a seventh coefficient ``a_api`` (1 in every
TTFT row, 0 in every ITL row, pulled towards the profile's value like the others; the ITL
rows pin ``c0``, so the TTFT rows' level above ``a * c0 + c_p * pt`` is the cost), and
kept when it is trusted or fits better. A live engine whose API server is faster than its
profile, such as ``rightsizer demo``'s emulated engines before they emulated that cost, had
30 ms taken from TTFTs of 15-50 ms: the fit pushed ``c0`` to a fifth of its value to make
up for it, ITL error 80%, never trusted; with the second fit, 2%. The learned cost's serial
share (``api_service_s``) is the profile's, capped at the learned cost.

A term the prior fixes (carried to the fitted model, not fitted): the routed experts a decode
step touches (``moe_weight_s`` times the share ``Dbar`` sequences reach) are subtracted from
every ITL target before the fit; the reported fit errors are on the observed values.
``Calibration.vs_prior()`` says how far the live engine is from its prior (the engine
profile's roofline): fitted / prior for each coefficient, an ITL and a prefill.

Identifiability: the data pin down ``c0``, ``c_p`` and the cost of one more running sequence
``c_d + c_kv * ctx_bar`` best; the split between ``c_d`` and ``c_kv`` rests on how much the
contexts of requests differ, and is weak when one of the two is small: there the prior
(``roofline_prior``'s bandwidth-based ``c_kv``) carries it. On simulated engines all four come
back within 10% (tests/unit/estimator/test_calibrate.py).

Fit: minimise ``sum_i w_i rho(r_i / sigma) + tau sum_j ((c_j - p_j) / s_j)^2`` over
``c >= 0``, with relative residuals ``r_i = (y_i - x_i c) / y_i``, their robust scale
``sigma`` (1.48 MAD), Huber ``rho`` (IRLS) refined by a few Tukey biweight passes, age weights
``w_i = 2^(-age / half_life_s)`` (exponential forgetting, so the fit follows change), and a
ridge pull towards the prior ``p`` (e.g. ``roofline_prior``) worth ``tau = prior_strength``
records, scaled by ``s_j = max(p_j, c_j of the data alone)``: weak, and fading as data
accumulates. Non-negativity is exact: each IRLS pass solves the 7-variable quadratic program
(the unconstrained solution when feasible, else the best of the 127 active sets).

Step jitter: ``jitter_sigma`` (``StepModel``) = median over records of
``ln(itl.p95 / itl.p50) / 1.645`` (for a lognormal factor, ``p95 / p50 = exp(1.645 sigma)``),
from records with 20+ gaps, preferring those whose decode no other prefill interrupted (then
the formula predicts nearly constant steps, so their spread is jitter). Age-weighted, capped
at 1. Tried and dropped: a sigma that makes the model reproduce the window's pooled ITL p95.
It tracked the window exactly, but on the real vLLM CPU server that window's tail (set by
the records that jitter most) varied by +-30% from minute to minute, and its predictions
at other rates erred by up to 69%. The median of uninterrupted records erred by at most 24%
on the same data (bench/README.md).

Speed drift: ``drift_sigma`` and ``drift_tau_s`` (``StepModel``) from the ITL rows' log
residuals ``r_i = ln(y_i / x_i c)`` (robustly centred, clipped at 3 robust sd): records that
run at the same time share the engine's speed, so their residuals covary, and the covariance
fades with the distance ``L`` between the records' mid-times. With ``D`` the median decode
duration, ``C0`` = mean ``r_i r_j`` over pairs with ``L < D`` and ``C1`` over ``D <= L < 3 D``;
``tau = (L1 - L0) / ln(C0 / C1)`` (at least ``D / 4``, at most ``10 D`` when ``C1 <= 0``) and
``sigma^2 = C0 exp(L0 / tau)`` (the covariance brought back to lag 0), capped at the
residuals' own variance and at ``sigma = 0.5``. Each bin needs 30 pairs, else no drift. On the
real vLLM CPU server of a noisy 2-core host the low-rate phase gave ``C`` of +0.016 below
2 s, +0.007 at 2-4 s and 0.000 beyond 4 s: a speed that wanders by about 13% (log sd) over
a few seconds. The same covariance also holds load effects the formula misses (records that
overlap share their batch), so the drift is an upper bound of the host's own wandering.
On a steady engine it comes out near zero.

Fit error: median and p90 of ``|predicted - observed| / observed`` over the window's rows
(age-weighted), separately for TTFT and ITL. ``trusted`` needs ``min_records`` effective
records and medians under ``max_ttft_mare`` and ``max_itl_mare``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import numpy as np

from estimator.engine import COEFFICIENT_NAMES, StepModel
from estimator.records import Outcome, RequestRecord

# ring columns
_T, _DISPATCH, _FIRST, _END, _UNCACHED, _PROMPT, _COMPLETION, _INFLIGHT, _SPREAD, _PAIRS = range(10)
_NCOL = 10
_MIN_SPREAD_GAPS = 20  # gaps a record needs for its ITL p95 / p50 to count
_MIN_CLEAN = 10  # records with uninterrupted decodes needed to use only those for the jitter
_Z95 = 1.6448536
_NPARAM = 7  # c0, c_p, c_d, c_kv, c_attn, q (queue), a_api (per-request cost in TTFT)
_ATTN, _QUEUE, _API = 4, 5, 6
_DRIFT_MIN_PAIRS = 30
_DRIFT_MAX_ROWS = 600  # most recent ITL rows used for the drift (pairs grow as n^2)
_DRIFT_MAX_SIGMA = 0.5
_SCALE_SAMPLE = 20_000  # rows used for robust scale and error quantiles
_MAX_UNSEEN_LOAD = 3.0  # proxy in-flight counts up to 3x what the ring's records explain
_SUBSETS = [
    np.array(s, dtype=np.intp)
    for k in range(_NPARAM, 0, -1)
    for s in itertools.combinations(range(_NPARAM), k)
]
GENERIC_PRIOR = StepModel(
    overhead_s=0.01, prefill_s_per_token=1e-4, decode_s_per_seq=1e-4, kv_s_per_token=1e-7
)
"""A deliberately vague prior for when no roofline prior is given (used at 1/10 strength)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibratorConfig:
    """Settings of ``OnlineCalibrator`` (see the module docstring)."""

    capacity: int = 100_000
    """Records kept (a ring; the oldest are overwritten)."""
    half_life_s: float = 1800.0
    """Age at which a record's weight has halved (exponential forgetting)."""
    prior_strength: float = 20.0
    """Weight of the prior, in equivalent records."""
    huber_k: float = 1.345
    """Huber threshold in robust standard deviations of the relative residuals."""
    irls_iterations: int = 6
    """Huber IRLS passes."""
    tukey_iterations: int = 3
    """Tukey biweight passes after Huber: records misfit by over ``tukey_c`` robust standard
    deviations (e.g. from before a change of hardware or settings) get no weight."""
    tukey_c: float = 4.685
    min_rel_noise: float = 0.02
    """Floor of the relative noise of one observation (timings jitter by a few percent): it
    keeps a handful of records from overruling the prior."""
    max_fit_records: int = 20_000
    """Records the fit uses (an even stride through the window): plenty for five
    coefficients, and it bounds the fit time whatever ``capacity`` is."""
    min_records: float = 50.0
    """Effective (age-weighted) records needed before the fit is trusted."""
    max_ttft_mare: float = 0.3
    """Largest median absolute relative TTFT error of a trusted fit."""
    max_itl_mare: float = 0.2
    """Largest median absolute relative ITL error of a trusted fit."""
    refit_new_fraction: float = 0.01
    """``fit`` reuses its previous result while fewer new records than this share of the
    window (at least one) have arrived since, the clock has moved less than
    ``refit_max_age_s`` and ``max_num_seqs`` is the same: a 1% change of the window moves
    five coefficients fitted on it by far less than their noise, and a steady refresh with
    100k records then costs the projection, not the fit. 0: refit on every call."""
    refit_max_age_s: float = 60.0
    """Longest reuse of a fit (the age weights, and so the prior's share, drift with time)."""
    fit_attention: bool = True
    """Fit the prefill attention term (``StepModel.prefill_attn_s_per_pair``: seconds per
    (query, key) pair) beside the linear prefill cost: a mix of prompt lengths tells them
    apart (a 512-token prompt attends four times the pairs of a 256-token one for twice the
    tokens). False: no attention term (the calibrator before issue 14)."""

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.half_life_s <= 0 or self.prior_strength < 0:
            raise ValueError("CalibratorConfig needs capacity >= 1, half_life_s > 0, "
                             "prior_strength >= 0")  # fmt: skip
        if not 0.0 <= self.refit_new_fraction <= 1.0 or self.refit_max_age_s < 0:
            raise ValueError("CalibratorConfig needs 0 <= refit_new_fraction <= 1 and "
                             "refit_max_age_s >= 0")  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    """The fitted step model and how well it explains the window. ``None`` = no such rows."""

    step: StepModel
    prior: StepModel
    n_records: int  # records in the window with a usable row
    n_ttft: int
    n_itl: int
    n_effective: float  # sum of age weights
    prior_share: float  # tau / (tau + n_effective): how much the prior still counts
    ttft_mare: float | None  # median absolute relative error
    ttft_p90_re: float | None
    itl_mare: float | None
    itl_p90_re: float | None
    queue_s_per_request: float  # nuisance q
    trusted: bool

    def vs_prior(self) -> dict[str, float]:
        """How far the live engine is from its prior (the engine profile's roofline): the
        ratio fitted / prior of each coefficient, and of the ITL at batch 8 and the prefill
        time of a 1024-token prompt (1.0: the profile was right; 2.0: twice as slow)."""
        out = {}
        for name, fit, pri in zip(COEFFICIENT_NAMES, self.step.coefficients(),
                                  self.prior.coefficients(), strict=True):  # fmt: skip
            out[name] = fit / pri if pri > 0 else math.nan
        out["itl_batch8"] = self.step.itl_at(8, 1024) / max(self.prior.itl_at(8, 1024), 1e-12)
        out["prefill_1024"] = self.step.ttft_idle(1024) / max(self.prior.ttft_idle(1024), 1e-12)
        return out


class OnlineCalibrator:
    """Collects records (``observe``, O(1)) and fits the step model (``fit``)."""

    __slots__ = ("_buf", "_last", "_n", "_newest", "config", "prior", "prior_strength")

    def __init__(self, prior: StepModel | None = None, config: CalibratorConfig | None = None):
        self.config = config or CalibratorConfig()
        self.prior = prior or GENERIC_PRIOR
        self.prior_strength = self.config.prior_strength * (1.0 if prior else 0.1)
        self._buf = np.full((self.config.capacity, _NCOL), np.nan)
        self._n = 0
        self._newest = -math.inf  # the newest record's time (the default ``now`` of ``fit``)
        # the previous fit and what it was fitted on: records observed, now, max_num_seqs
        self._last: tuple[int, float, int | None, Calibration] | None = None

    def __len__(self) -> int:
        return min(self._n, self.config.capacity)

    def observe(self, record: RequestRecord) -> None:
        """Keep the record if it can inform the fit. Never raises on a valid record."""
        if record.outcome is not Outcome.OK or not record.streamed:
            return
        d, f, p, c = (
            record.dispatch_s,
            record.first_token_s,
            record.prompt_tokens,
            record.completion_tokens,
        )
        r = record.inflight_requests
        if d is None or f is None or p is None or c is None or r is None:
            return
        e = record.end_s
        if e is None or c < 2:
            e = f + (
                record.itl.mean * (c - 1) if record.itl.mean is not None and c >= 2 else math.nan
            )
        itl = record.itl
        spread = (
            math.log(itl.p95 / itl.p50)
            if itl.count >= _MIN_SPREAD_GAPS and itl.p50 and itl.p95 and itl.p95 >= itl.p50 > 0
            else math.nan
        )
        t = f if e != e else e
        u = p - (record.cached_tokens or 0)
        pairs = u * (u + 1) / 2 + u * (p - u)  # attention pairs of its own prefill
        self._buf[self._n % self.config.capacity] = (
            t, d, f, e, u, p, c, r, spread, pairs
        )  # fmt: skip
        self._n += 1
        if t > self._newest:
            self._newest = t

    def fit(
        self, now: float | None = None, *, max_num_seqs: int | None = None, reuse: bool = True
    ) -> Calibration:
        """Fit on the window as of ``now`` (default: the newest record's time). With ``reuse``,
        the previous fit is returned while the window has barely changed (see
        ``CalibratorConfig.refit_new_fraction``)."""
        if now is None:
            now = self._newest if self._n else 0.0
        cfg, last = self.config, self._last
        if reuse and last is not None and cfg.refit_new_fraction > 0.0:
            n0, now0, m0, cal = last
            fresh = self._n - n0
            if (
                m0 == max_num_seqs
                and 0.0 <= now - now0 < cfg.refit_max_age_s
                and fresh < max(1.0, cfg.refit_new_fraction * len(self))
            ):
                return cal
        rows = self._buf[: len(self)].copy()
        age = np.maximum(0.0, now - rows[:, _T])
        w = np.exp2(-age / cfg.half_life_s)
        cal = fit_rows(rows, w, self.prior, self.prior_strength, cfg, max_num_seqs)
        self._last = (self._n, now, max_num_seqs, cal)
        return cal


def fit_rows(
    rows: np.ndarray,
    w: np.ndarray,
    prior: StepModel,
    tau: float,
    config: CalibratorConfig,
    max_num_seqs: int | None,
) -> Calibration:
    """The fit behind ``OnlineCalibrator.fit`` on ring rows with age weights ``w``."""
    keep = w > 1e-9  # forgotten rows cost time and add nothing
    if not keep.all():
        rows, w = rows[keep], w[keep]
    stride = -(-rows.shape[0] // max(1, config.max_fit_records))
    xt, yt, wt, xi, yi, wi, spread, span = _design(
        rows, w, max_num_seqs, max(1, stride), prior.request_overhead_s
    )
    # a term the prior fixes and the fit does not learn: the routed experts a decode step
    # touches in every ITL (estimator.engine)
    yi_obs = yi
    if prior.moe_weight_s and prior.moe_experts:
        miss = 1.0 - min(prior.moe_topk, prior.moe_experts) / prior.moe_experts
        moe = prior.moe_weight_s * (1.0 - np.power(miss, np.maximum(xi[2], 1.0)))
        yi = np.maximum(yi - moe, 0.1 * yi)
    if not config.fit_attention:
        xt[_ATTN], xi[_ATTN] = 0.0, 0.0
    n_eff = float(w.sum())
    args = (xt, yt, wt, xi, yi, wi, yi_obs, prior, tau, config, n_eff)
    coef, errors, trusted = _solve(*args, learn_api=False)
    if not trusted and n_eff >= config.min_records:
        # the profile's per-request cost may be what is wrong (module docstring): learn it
        coef2, errors2, trusted2 = _solve(*args, learn_api=True)
        if trusted2 or _worst(errors2) < _worst(errors):
            coef, errors, trusted = coef2, errors2, trusted2
    t_mare, t_p90, i_mare, i_p90 = errors
    step = StepModel.from_coefficients(coef[:4].tolist())
    attn = float(coef[_ATTN]) if config.fit_attention else 0.0
    drift_sigma, drift_tau = _drift(np.log(yi / np.maximum(coef @ xi, 1e-12)), span, wi)
    api = float(coef[_API])
    extras = {**prior.extras(), "prefill_attn_s_per_pair": attn, "request_overhead_s": api}
    extras["api_service_s"] = min(prior.api_service_s, api)
    step = dataclasses.replace(
        step,
        **extras,
        jitter_sigma=_jitter(spread[0], spread[1], wi * spread[2]),
        drift_sigma=drift_sigma,
        drift_tau_s=drift_tau,
    )
    return Calibration(
        step=step, prior=prior,
        n_records=int(rows.shape[0]), n_ttft=int(yt.size), n_itl=int(yi.size), n_effective=n_eff,
        prior_share=tau / (tau + n_eff) if tau else 0.0, ttft_mare=t_mare, ttft_p90_re=t_p90,
        itl_mare=i_mare, itl_p90_re=i_p90, queue_s_per_request=float(coef[_QUEUE]), trusted=trusted,
    )  # fmt: skip


_Errors = tuple[float | None, float | None, float | None, float | None]


def _solve(
    xt: np.ndarray, yt: np.ndarray, wt: np.ndarray, xi: np.ndarray, yi: np.ndarray,
    wi: np.ndarray, yi_obs: np.ndarray, prior: StepModel, tau: float, config: CalibratorConfig,
    n_eff: float, *, learn_api: bool,
) -> tuple[np.ndarray, _Errors, bool]:  # fmt: skip
    """Coefficients, (TTFT median, p90, ITL median, p90) relative errors on the observed
    values, and whether the fit is trusted. Without ``learn_api`` the prior's per-request
    cost is a fixed offset of every TTFT (its column zeroed: the ridge keeps the prior's
    value); with it, a coefficient fitted like the others."""
    yt_fit = yt
    if not learn_api:
        xt = xt.copy()
        xt[_API] = 0.0
        if prior.request_overhead_s:
            yt_fit = np.maximum(yt - prior.request_overhead_s, 0.1 * yt)
    p = np.array([*prior.coefficients(), prior.prefill_attn_s_per_pair, 0.0,
                  prior.request_overhead_s])  # fmt: skip
    coef = _robust_fit(np.hstack([xt, xi]), np.concatenate([yt_fit, yi]),
                       np.concatenate([wt, wi]), p, tau, config)  # fmt: skip
    if not learn_api:
        coef[_API] = prior.request_overhead_s
    t_mare, t_p90 = _rel_errors(coef @ xt + (yt - yt_fit), yt, wt)
    i_mare, i_p90 = _rel_errors(coef @ xi + (yi_obs - yi), yi_obs, wi)
    trusted = (
        n_eff >= config.min_records
        and t_mare is not None
        and t_mare <= config.max_ttft_mare
        and i_mare is not None
        and i_mare <= config.max_itl_mare
    )
    return coef, (t_mare, t_p90, i_mare, i_p90), trusted


def _worst(errors: _Errors) -> float:
    """How far off a fit is: the larger of its TTFT and ITL median relative errors."""
    t, _, i, _ = errors
    return max(math.inf if t is None else t, math.inf if i is None else i)


def _design(
    all_rows: np.ndarray,
    all_w: np.ndarray,
    max_num_seqs: int | None,
    stride: int,
    lead_s: float = 0.0,
) -> tuple[np.ndarray, ...]:
    """TTFT and ITL design matrices (feature-major: one row per coefficient), targets and
    weights (see the module docstring) for every ``stride``-th record, the ITL rows'
    ``ln(itl.p95 / itl.p50)`` (NaN where unknown) and their (first token, end) times (2 x n)."""
    if all_rows.shape[0] == 0:
        z = np.zeros((_NPARAM, 0))
        e = np.zeros(0)
        return z, e, e, z, e, e, np.zeros((3, 0)), np.zeros((2, 0))
    rows, w = all_rows[::stride], all_w[::stride]
    m = float(max_num_seqs) if max_num_seqs else math.inf
    first, end, disp = rows[:, _FIRST], rows[:, _END], rows[:, _DISPATCH]
    unc, comp, r = rows[:, _UNCACHED], rows[:, _COMPLETION], rows[:, _INFLIGHT]
    ctx = rows[:, _PROMPT] + comp / 2
    ctx_bar = float(np.average(ctx, weights=w)) if w.sum() > 0 else float(ctx.mean())
    # TTFT rows
    yt = first - disp
    a = np.where(r > 0, 1.5, 1.0)
    ad = a * np.minimum(r, m)
    excess = np.maximum(0.0, r + 1 - m) if math.isfinite(m) else np.zeros_like(r)
    # the API server's per-request cost (``lead_s``, the profile's) comes before the engine
    # sees the request: prefills that ended inside it did not delay this one
    seen = np.minimum(disp + lead_s, first)
    prefill_before = _prefill_tokens_between(all_rows, seen, first)  # own prompt included
    pairs_before = _prefill_tokens_between(all_rows, seen, first, _PAIRS)
    own_pairs = rows[:, _PAIRS]
    xt = np.stack([a, np.maximum(prefill_before, unc), ad, ad * ctx_bar,
                   np.maximum(pairs_before, own_pairs), excess, np.ones_like(r)])  # fmt: skip
    okt = yt > 1e-6
    # ITL rows
    steps = np.maximum(comp - 1, 1)
    yi = (end - first) / steps
    pf = _prefill_tokens_between(all_rows, first, end) / steps
    pp = _prefill_tokens_between(all_rows, first, end, _PAIRS) / steps
    dd = np.minimum(_decode_concurrency(all_rows, rows), m)
    zero = np.zeros_like(r)
    xi = np.stack([np.ones_like(r), pf, dd, ctx + (dd - 1) * ctx_bar, pp, zero, zero])
    oki = (comp >= 2) & np.isfinite(yi) & (yi > 1e-7)
    span = np.stack([first[oki], end[oki]])
    # per ITL row: prefills that began inside its decode, as a share of its gaps
    fs = np.sort(all_rows[:, _FIRST])
    finite_end = np.where(np.isfinite(end), end, first)
    n_int = np.searchsorted(fs, finite_end, side="right") - np.searchsorted(fs, first, side="right")
    share = n_int / steps
    spread = np.stack([rows[oki, _SPREAD], share[oki], steps[oki]])
    return xt[:, okt], yt[okt], w[okt], xi[:, oki], yi[oki], w[oki], spread, span


def _jitter(spread: np.ndarray, interrupted: np.ndarray, w: np.ndarray) -> float:
    """Lognormal sigma of the step jitter (module docstring) from the ITL rows' spreads
    ``ln(p95 / p50)``, the share of their gaps that other requests' prefills interrupted, and
    weights (age x gaps); 0 without usable records.

    Rows whose interruptions are under 5% of their gaps: their p95 is not itself one of the
    prefill steps the simulator models, yet it holds what arrivals do to the steps around them
    (rows with none at all are the quiet moments, and understate it). The sigma is the one
    whose lognormal has the p95 of the *mixture* of the rows' lognormals (each row's gaps over
    its own median, pooled by gap): the rows' spreads differ, and the pooled tail, which the
    ITL p95 is judged on, is heavier than the median row's."""
    ok = np.isfinite(spread) & (w > 0) & (spread >= 0)
    if not ok.any():
        return 0.0
    quiet = ok & (interrupted < 0.05)
    use = quiet if int(quiet.sum()) >= _MIN_CLEAN else ok
    sig = np.maximum(spread[use] / _Z95, 1e-4)
    ww = w[use] / w[use].sum()
    lo, hi = 0.0, float(np.max(sig)) * 4.0 + 1e-3  # ln(p95 / median) of the mixture
    for _ in range(50):
        mid = (lo + hi) / 2
        if float(np.sum(ww * _norm_cdf(mid / sig))) < 0.95:
            lo = mid
        else:
            hi = mid
    return float(min(max(hi / _Z95, 0.0), 1.0))


def _norm_cdf(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))
    return out


def _drift(resid: np.ndarray, span: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """``(drift_sigma, drift_tau_s)`` from the ITL rows' log residuals and (first token, end)
    times (module docstring); ``(0.0, 60.0)`` when there is too little to tell."""
    none = (0.0, 60.0)
    ok = np.isfinite(resid) & (w > 0) & np.isfinite(span).all(axis=0) & (span[1] > span[0])
    if int(ok.sum()) < 10:
        return none
    r, s, e, w = resid[ok], span[0, ok], span[1, ok], w[ok]
    if r.size > _DRIFT_MAX_ROWS:
        keep = np.argsort(e)[-_DRIFT_MAX_ROWS:]
        r, s, e, w = r[keep], s[keep], e[keep], w[keep]
    r = r - _weighted_median(r, w)
    sd = 1.4826 * _weighted_median(np.abs(r), w)
    if not sd > 0:
        return none
    r = np.clip(r, -3 * sd, 3 * sd)
    dur = float(np.median(e - s))
    mid = (s + e) / 2
    i, j = np.triu_indices(r.size, 1)
    lag = np.abs(mid[i] - mid[j])
    prod, pw = r[i] * r[j], w[i] * w[j]
    near, next_ = lag < dur, (lag >= dur) & (lag < 3 * dur)
    if int(near.sum()) < _DRIFT_MIN_PAIRS or int(next_.sum()) < _DRIFT_MIN_PAIRS:
        return none
    c0 = float(np.average(prod[near], weights=pw[near]))
    c1 = float(np.average(prod[next_], weights=pw[next_]))
    if not c0 > 0:
        return none
    l0 = float(np.average(lag[near], weights=pw[near]))
    l1 = float(np.average(lag[next_], weights=pw[next_]))
    tau = (l1 - l0) / math.log(c0 / c1) if 0 < c1 < c0 else 10 * dur
    tau = min(max(tau, dur / 4), 10 * dur)
    var = min(c0 * math.exp(l0 / tau), float(np.average(r * r, weights=w)))
    return min(math.sqrt(var), _DRIFT_MAX_SIGMA), tau


def _decode_concurrency(all_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Mean in-flight requests (this one included) over each record's decode, from the ring.

    The snapshot ``R + 1`` at dispatch is unbiased but noisy, and a noisy regressor biases its
    slope towards zero; the time average over ``(first_token, end]`` of the records' own
    ``[dispatch, end)`` intervals is not. Records the ring lacks (non-streamed, failed) are
    made up for by scaling with the ratio of the proxy's counts ``R`` to the ring's count at
    dispatch; when that ratio exceeds 3 the ring is not representative and ``R + 1`` is used.
    Records that ended within one longest request of the newest one may overlap requests
    still in flight, and those that began before the oldest record ended may overlap records
    already overwritten: both keep ``R + 1``.
    """
    d_all = all_rows[:, _DISPATCH]
    e_all = np.where(np.isfinite(all_rows[:, _END]), all_rows[:, _END], all_rows[:, _FIRST])
    ds, es = np.sort(d_all), np.sort(e_all)
    cds = np.concatenate([[0.0], np.cumsum(ds)])
    ces = np.concatenate([[0.0], np.cumsum(es)])
    n = ds.size

    def busy_time(x: np.ndarray) -> np.ndarray:  # sum_j (min(e_j, x) - min(d_j, x))
        ke, kd = np.searchsorted(es, x, side="right"), np.searchsorted(ds, x, side="right")
        out: np.ndarray = (ces[ke] + x * (n - ke)) - (cds[kd] + x * (n - kd))
        return out

    disp, first, end, r = rows[:, _DISPATCH], rows[:, _FIRST], rows[:, _END], rows[:, _INFLIGHT]
    snapshot = r + 1
    ok = np.isfinite(end) & (end > first)
    if not ok.any():
        return snapshot
    horizon = float(np.max(e_all - d_all))
    ok &= (end <= float(np.max(e_all)) - horizon) & (first >= float(np.min(e_all)))
    at_dispatch = np.searchsorted(ds, disp, side="right") - np.searchsorted(es, disp, side="right")
    ring_others, proxy_others = float(np.sum((at_dispatch - 1)[ok])), float(np.sum(r[ok]))
    if proxy_others > _MAX_UNSEEN_LOAD * ring_others:  # the ring sees too little of the load
        return snapshot
    scale = max(0.5, proxy_others / ring_others) if ring_others > 0 else 1.0
    span = np.where(ok, end - first, 1.0)
    mean_inflight = (busy_time(np.where(ok, end, 0.0)) - busy_time(np.where(ok, first, 0.0))) / span
    return np.where(ok, 1.0 + scale * np.maximum(mean_inflight - 1.0, 0.0), snapshot)


def _prefill_tokens_between(
    rows: np.ndarray, first: np.ndarray, end: np.ndarray, column: int = _UNCACHED
) -> np.ndarray:
    """Per query: uncached prompt tokens (or another ``column``: their attention pairs) of all
    ``rows`` whose first token fell in ``(first, end]``, i.e. prefills that shared steps with
    that record's decode."""
    order = np.argsort(rows[:, _FIRST])
    fs = rows[order, _FIRST]
    csum = np.concatenate([[0.0], np.cumsum(rows[order, column])])
    by_first = np.argsort(first)
    at_first = np.empty(first.size, dtype=np.intp)
    at_first[by_first] = np.searchsorted(fs, first[by_first], side="right")
    finite_end = np.where(np.isfinite(end), end, first)
    by_end = np.argsort(finite_end)  # sorted queries: searchsorted is much faster
    at_end = np.empty(first.size, dtype=np.intp)
    at_end[by_end] = np.searchsorted(fs, finite_end[by_end], side="right")
    tokens: np.ndarray = csum[at_end] - csum[at_first]
    return tokens


def _robust_fit(
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    prior: np.ndarray,
    tau: float,
    cfg: CalibratorConfig,
) -> np.ndarray:
    """Huber then Tukey IRLS on relative residuals with a scaled ridge prior and c >= 0."""
    if y.size == 0:
        return prior.copy()
    xr = x / y  # relative residual: 1 - c @ xr
    zero = np.zeros(_NPARAM)
    coef = _nnls_qp(*_normal(xr, w, zero, zero))
    scale = np.maximum(np.maximum(prior, coef), 1e-12)
    # the prior counts as tau records: in units of one record's squared residual (sigma^2)
    reg = np.where(np.arange(_NPARAM) == _QUEUE, tau * 1e-3, tau) / scale**2
    stride = max(1, y.size // _SCALE_SAMPLE)
    dof = y.size / max(1.0, y.size - _NPARAM)  # few records: residuals understate the noise
    huber = max(1, cfg.irls_iterations)
    for it in range(huber + max(0, cfg.tukey_iterations)):
        res = np.abs(1.0 - coef @ xr)
        sigma = max(_weighted_median(res[::stride], w[::stride]) * 1.4826 * dof, cfg.min_rel_noise)
        u = res / sigma
        if it < huber:
            h = np.minimum(1.0, cfg.huber_k / np.maximum(u, 1e-15))
        else:  # Tukey's biweight from the Huber fit: gross misfits (an old regime) drop out
            h = np.square(np.maximum(0.0, 1.0 - np.square(u / cfg.tukey_c)))
        if float((w * h).sum()) <= 0.0:
            break
        coef = _nnls_qp(*_normal(xr, w * h, reg * sigma**2, reg * sigma**2 * prior))
    return coef


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cw = np.cumsum(weights[order])
    if cw[-1] <= 0:
        return float(np.median(values))
    return float(values[order][min(values.size - 1, int(np.searchsorted(cw, 0.5 * cw[-1])))])


def _normal(
    xr: np.ndarray, w: np.ndarray, reg: np.ndarray, reg_target: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    xw = xr * w
    return xw @ xr.T + np.diag(reg), xw.sum(axis=1) + reg_target


def _nnls_qp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin c'Ac - 2b'c over c >= 0 (A positive semi-definite, 7x7) by active sets."""
    d = np.sqrt(np.maximum(np.diag(a), 1e-300))
    an = a / np.outer(d, d) + np.eye(a.shape[0]) * 1e-12
    bn = b / d
    best, best_obj = np.zeros_like(b), 0.0
    for s in _SUBSETS:
        try:
            cs = np.linalg.solve(an[np.ix_(s, s)], bn[s])
        except np.linalg.LinAlgError:
            continue
        if np.all(cs >= 0):
            obj = -float(bn[s] @ cs)  # at the subset optimum c'Ac - 2b'c = -b'c
            if obj < best_obj:
                best_obj, best = obj, np.zeros_like(b)
                best[s] = cs
            if s.size == a.shape[0]:
                break  # the unconstrained optimum is feasible: it is the answer
    return best / d


def _rel_errors(
    pred: np.ndarray, obs: np.ndarray, w: np.ndarray
) -> tuple[float | None, float | None]:
    """Age-weighted median and p90 of |pred - obs| / obs (on a strided sample when large)."""
    if obs.size == 0 or w.sum() <= 0:
        return None, None
    stride = max(1, obs.size // _SCALE_SAMPLE)
    err = (np.abs(pred - obs) / obs)[::stride]
    order = np.argsort(err)
    cw = np.cumsum(w[::stride][order])
    at = np.searchsorted(cw, np.array([0.5, 0.9]) * cw[-1])
    e = err[order][np.minimum(at, err.size - 1)]
    return float(e[0]), float(e[1])
