"""Uncertainty bands of prior predictions: ``metric -> (lo, hi)`` multipliers, the 10th and
90th percentiles of ``published / predicted`` over the training rows of
``bench/data/published.yaml`` (written by ``python3 bench/published.py --fit``; see
``estimator.loads``). A prediction ``v`` is given as ``[v * lo, v * hi]``."""

BANDS: dict[str, tuple[float, float]] = {
    "default": (0.858, 1.173),
    "throughput": (0.858, 1.104),
    "ttft": (0.909, 1.104),
    "itl": (0.891, 1.173),
    "e2e": (0.921, 1.122),
}
