"""Online calibration of the step model (``estimator.engine``) from the proxy's RequestRecords.

Keep one ``OnlineCalibrator`` per backend. ``observe(record)`` is the hot path: it keeps only
OK, streamed, dispatched records with token counts and load at dispatch, and writes eight
floats into a preallocated ring (default 100k rows; about 1 µs). ``fit(now)`` runs off the
hot path (about 10-30 ms on 100k records) and returns a ``Calibration``.

Observation model (c = StepModel coefficients ``c0, c_p, c_d, c_kv``; ``R`` = in-flight
requests at dispatch, this one excluded; ``M`` = ``max_num_seqs`` when known, else infinite):

* decode, per record: ``y = (end - first_token) / (completion - 1)`` (mean seconds per output
  token; ``itl.mean`` when the end is unknown) is the mean step time during its decode::

      y = c0 + c_p * pf + c_d * D + c_kv * K
      D = min(R + 1, M),  K = ctx + (D - 1) * ctx_bar,  ctx = prompt + completion / 2

  ``pf`` = uncached prompt tokens of the window's requests whose first token (end of their
  prefill) fell inside this decode, per decode step (exact accounting from the ring);
  ``ctx_bar`` = weighted mean ``ctx`` of the window;
* first token, per record: ``y = first_token - dispatch`` (engine-side TTFT; the proxy's own
  queue is not engine physics) = queue effect + prefill::

      y = a * (c0 + c_d * Dq + c_kv * Dq * ctx_bar) + c_p * uncached + q * max(0, R + 1 - M) + h
      a = 1.5 if R > 0 else 1.0,  Dq = min(R, M)

  ``a``: the step in progress at dispatch is half done on average, then the prefill step runs
  with the running sequences; ``q`` (seconds per request queued beyond ``max_num_seqs``) and
  ``h`` (HTTP, tokenisation and sampling latency) are nuisance terms, not part of the model.

Fit: minimise ``sum_i w_i * rho((y_i - x_i c) / y_i) + tau * sum_j ((c_j - p_j) / s_j)^2``
over ``c >= 0``: relative residuals, Huber ``rho`` by IRLS, age weights ``w_i = 2^(-age /
half_life_s)`` (exponential forgetting, so the fit follows change), and a ridge pull towards
the prior ``p`` (e.g. ``roofline_prior``) of strength ``tau = prior_strength`` equivalent
observations, scaled by ``s_j = max(p_j, c_j of the data alone)``: weak, and fading as data
accumulates. Non-negativity is exact: each IRLS pass solves the 6-variable quadratic program
by trying every active set (64 small solves).

Fit error: median and p90 of ``|predicted - observed| / observed`` over the window's rows
(age-weighted), separately for TTFT and ITL. ``trusted`` needs ``min_records`` effective
records and medians under ``max_ttft_mare`` and ``max_itl_mare``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from estimator.engine import StepModel
from estimator.records import Outcome, RequestRecord

# ring columns
_T, _DISPATCH, _FIRST, _END, _UNCACHED, _PROMPT, _COMPLETION, _INFLIGHT = range(8)
_NCOL = 8
_NPARAM = 6  # c0, c_p, c_d, c_kv, q (queue), h (offset)
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
    min_records: float = 50.0
    """Effective (age-weighted) records needed before the fit is trusted."""
    max_ttft_mare: float = 0.3
    """Largest median absolute relative TTFT error of a trusted fit."""
    max_itl_mare: float = 0.2
    """Largest median absolute relative ITL error of a trusted fit."""


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
    ttft_offset_s: float  # nuisance h
    trusted: bool


class OnlineCalibrator:
    """Collects records (``observe``, O(1)) and fits the step model (``fit``)."""

    __slots__ = ("_buf", "_n", "config", "prior", "prior_strength")

    def __init__(self, prior: StepModel | None = None, config: CalibratorConfig | None = None):
        self.config = config or CalibratorConfig()
        self.prior = prior or GENERIC_PRIOR
        self.prior_strength = self.config.prior_strength * (1.0 if prior else 0.1)
        self._buf = np.full((self.config.capacity, _NCOL), np.nan)
        self._n = 0

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
        self._buf[self._n % self.config.capacity] = (
            f if e != e else e, d, f, e, p - (record.cached_tokens or 0), p, c, r
        )  # fmt: skip
        self._n += 1

    def fit(self, now: float | None = None, *, max_num_seqs: int | None = None) -> Calibration:
        """Fit on the window as of ``now`` (default: the newest record's time)."""
        rows = self._buf[: len(self)].copy()
        if now is None:
            now = float(np.nanmax(rows[:, _T])) if rows.size else 0.0
        age = np.maximum(0.0, now - rows[:, _T])
        w = np.exp2(-age / self.config.half_life_s)
        return fit_rows(rows, w, self.prior, self.prior_strength, self.config, max_num_seqs)


def fit_rows(
    rows: np.ndarray,
    w: np.ndarray,
    prior: StepModel,
    tau: float,
    config: CalibratorConfig,
    max_num_seqs: int | None,
) -> Calibration:
    """The fit behind ``OnlineCalibrator.fit`` on ring rows with age weights ``w``."""
    xt, yt, wt, xi, yi, wi = _design(rows, w, max_num_seqs)
    x = np.vstack([xt, xi])
    y = np.concatenate([yt, yi])
    wy = np.concatenate([wt, wi])
    p = np.array([*prior.coefficients(), 0.0, 0.0])
    coef = _robust_fit(x, y, wy, p, tau, config)
    step = StepModel.from_coefficients(coef[:4])
    n_eff = float(w[np.isfinite(rows[:, _FIRST])].sum()) if rows.size else 0.0
    t_mare, t_p90 = _rel_errors(xt @ coef, yt, wt)
    i_mare, i_p90 = _rel_errors(xi @ coef, yi, wi)
    trusted = (
        n_eff >= config.min_records
        and t_mare is not None
        and t_mare <= config.max_ttft_mare
        and i_mare is not None
        and i_mare <= config.max_itl_mare
    )
    return Calibration(
        step=step, prior=prior, n_records=int(rows.shape[0]), n_ttft=int(yt.size),
        n_itl=int(yi.size), n_effective=n_eff, prior_share=tau / (tau + n_eff) if tau else 0.0,
        ttft_mare=t_mare, ttft_p90_re=t_p90, itl_mare=i_mare, itl_p90_re=i_p90,
        queue_s_per_request=float(coef[4]), ttft_offset_s=float(coef[5]), trusted=trusted,
    )  # fmt: skip


def _design(rows: np.ndarray, w: np.ndarray, max_num_seqs: int | None) -> tuple[np.ndarray, ...]:
    """TTFT and ITL design matrices, targets and weights (see the module docstring)."""
    if rows.shape[0] == 0:
        z = np.zeros((0, _NPARAM))
        return z, np.zeros(0), np.zeros(0), z, np.zeros(0), np.zeros(0)
    m = float(max_num_seqs) if max_num_seqs else math.inf
    first, end, disp = rows[:, _FIRST], rows[:, _END], rows[:, _DISPATCH]
    unc, comp, r = rows[:, _UNCACHED], rows[:, _COMPLETION], rows[:, _INFLIGHT]
    ctx = rows[:, _PROMPT] + comp / 2
    ctx_bar = float(np.average(ctx, weights=w)) if w.sum() > 0 else float(ctx.mean())
    # TTFT rows
    yt = first - disp
    a = np.where(r > 0, 1.5, 1.0)
    dq = np.minimum(r, m)
    excess = np.maximum(0.0, r + 1 - m) if math.isfinite(m) else np.zeros_like(r)
    xt = np.column_stack([a, unc, a * dq, a * dq * ctx_bar, excess, np.ones_like(r)])
    okt = yt > 1e-6
    # ITL rows: prefill tokens finished during this decode, per decode step
    steps = comp - 1
    yi = (end - first) / np.maximum(steps, 1)
    order = np.argsort(first)
    csum = np.concatenate([[0.0], np.cumsum(unc[order])])
    fs = first[order]
    pf_tokens = (
        csum[np.searchsorted(fs, end, side="right")]
        - csum[np.searchsorted(fs, first, side="right")]
    )
    pf = pf_tokens / np.maximum(steps, 1)
    dd = np.minimum(r + 1, m)
    kk = ctx + (dd - 1) * ctx_bar
    xi = np.column_stack([np.ones_like(r), pf, dd, kk, np.zeros_like(r), np.zeros_like(r)])
    oki = (steps >= 1) & np.isfinite(yi) & (yi > 1e-7)
    return xt[okt], yt[okt], w[okt], xi[oki], yi[oki], w[oki]


def _robust_fit(
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    prior: np.ndarray,
    tau: float,
    cfg: CalibratorConfig,
) -> np.ndarray:
    """Huber IRLS on relative residuals with a scaled ridge prior and c >= 0."""
    if y.size == 0:
        return prior.copy()
    xr = x / y[:, None]  # relative residual: 1 - xr @ c
    data_only = _nnls_qp(*_normal(xr, w, np.zeros(_NPARAM), np.zeros(_NPARAM)))
    scale = np.maximum(np.maximum(prior, data_only), 1e-12)
    reg = np.where(np.arange(_NPARAM) < 4, tau, tau * 1e-3) / scale**2
    h = np.ones_like(y)
    coef = data_only
    for _ in range(max(1, cfg.irls_iterations)):
        coef = _nnls_qp(*_normal(xr, w * h, reg, reg * prior))
        res = np.abs(1.0 - xr @ coef)
        sigma = max(1.4826 * float(np.median(res)), 1e-6)
        h = np.minimum(1.0, cfg.huber_k * sigma / np.maximum(res, 1e-12))
    return coef


def _normal(
    xr: np.ndarray, w: np.ndarray, reg: np.ndarray, reg_target: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    xw = xr * w[:, None]
    return xw.T @ xr + np.diag(reg), xw.sum(axis=0) + reg_target


def _nnls_qp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin c'Ac - 2b'c over c >= 0 (A positive semi-definite, 6x6) by active sets."""
    d = np.sqrt(np.maximum(np.diag(a), 1e-300))
    an, bn = a / np.outer(d, d), b / d
    an = an + np.eye(an.shape[0]) * 1e-12
    best, best_obj = np.zeros_like(b), 0.0
    for s in _SUBSETS:
        try:
            cs = np.linalg.solve(an[np.ix_(s, s)], bn[s])
        except np.linalg.LinAlgError:
            continue
        if np.all(cs >= 0):
            obj = -float(bn[s] @ cs)  # at the subset optimum c'Ac - 2b'c = -b'c
            if obj < best_obj:
                best_obj = obj
                best = np.zeros_like(b)
                best[s] = cs
    return best / d


def _rel_errors(
    pred: np.ndarray, obs: np.ndarray, w: np.ndarray
) -> tuple[float | None, float | None]:
    if obs.size == 0 or w.sum() <= 0:
        return None, None
    err = np.abs(pred - obs) / obs
    order = np.argsort(err)
    cw = np.cumsum(w[order])
    at = np.searchsorted(cw, np.array([0.5, 0.9]) * cw[-1])
    e = err[order][np.minimum(at, err.size - 1)]
    return float(e[0]), float(e[1])
