"""Experiments between deployment groups: the assignment and rollback rules (``control``),
shadow traffic (``shadow``) and model version drift inside a group (``drift``). The verdict on
latency and cost is the estimator's (``estimator.compare``)."""

from proxy.experiments.control import Assignment, Experiment, Experiments, unit_hash
from proxy.experiments.drift import Drift, drift
from proxy.experiments.shadow import ShadowRunner

__all__ = ["Assignment", "Drift", "Experiment", "Experiments", "ShadowRunner", "drift", "unit_hash"]
