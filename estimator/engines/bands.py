"""Uncertainty bands of prior predictions: ``metric -> (lo, hi)`` multipliers, the 10th and
90th percentiles of ``published / predicted`` over the training rows of
``bench/data/published.yaml`` (written by ``python3 bench/published.py --fit``; see
``estimator.loads``). A prediction ``v`` is given as ``[v * lo, v * hi]``."""

BANDS: dict[str, tuple[float, float]] = {
    "default": (0.75, 1.3),
    "throughput": (0.8, 1.25),
    "ttft": (0.7, 1.4),
    "itl": (0.8, 1.25),
    "e2e": (0.8, 1.25),
}
