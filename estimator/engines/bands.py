"""Uncertainty bands of prior predictions: ``metric -> (lo, hi)`` multipliers, the 10th and
90th percentiles of ``published / predicted`` for rows the fit had not seen: 3-fold
cross-validation over the training rows of ``bench/data/published.yaml``, each fold's
profiles refitted from neutral constants (``python3 bench/published.py --cv-bands``; see
``estimator.loads``). A prediction ``v`` is given as ``[v * lo, v * hi]``; ``default``
(the widest) for other metrics. How often they held the held-out rows' published values:
bench/README.md."""

BANDS: dict[str, tuple[float, float]] = {
    "default": (0.752, 1.27),
    "throughput": (0.835, 1.104),
    "ttft": (0.752, 1.191),
    "itl": (0.765, 1.27),
    "e2e": (0.859, 1.145),
}
