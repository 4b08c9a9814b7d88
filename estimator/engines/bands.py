"""Uncertainty bands of prior predictions: ``metric -> (lo, hi)`` multipliers, the 10th and
90th percentiles of ``published / predicted`` for rows the fit had not seen: 3-fold
cross-validation over the training rows of ``bench/data/published.yaml`` (``python3
bench/published.py --cv-bands``; see ``estimator.loads``). A prediction ``v`` is given as
``[v * lo, v * hi]``; ``default`` (the widest) for other metrics. On the held-out rows these
bands held 64-80% of the published values (bench/README.md)."""

BANDS: dict[str, tuple[float, float]] = {
    "default": (0.836, 1.216),
    "throughput": (0.855, 1.154),
    "ttft": (0.879, 1.131),
    "itl": (0.836, 1.216),
    "e2e": (0.864, 1.123),
}
