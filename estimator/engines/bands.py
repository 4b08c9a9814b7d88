"""Uncertainty bands of prior predictions: ``metric -> (lo, hi)`` multipliers, the 10th and
90th percentiles of ``published / predicted`` for rows the fit had not seen: 3-fold
cross-validation over the training rows of ``bench/data/published.yaml``, each fold's
profiles refitted from neutral constants (``python3 bench/published.py --cv-bands``; see
``estimator.loads``). A prediction ``v`` is given as ``[v * lo, v * hi]``; ``default``
(the widest) for other metrics. How often they held the held-out rows' published values:
bench/README.md."""

BANDS: dict[str, tuple[float, float]] = {
    "default": (0.741, 1.232),
    "throughput": (0.828, 1.071),
    "ttft": (0.741, 1.172),
    "itl": (0.783, 1.232),
    "e2e": (0.859, 1.174),
}
