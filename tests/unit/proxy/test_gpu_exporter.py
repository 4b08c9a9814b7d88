"""GPU samples survive the trip through a ``rightsizer gpu-exporter``'s /metrics text and back
(how a proxy on another node gets them into the backend's snapshots)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from estimator.records import GpuSample
from proxy.gpu import GpuSampler, samples_from_metrics
from proxy.telemetry import StateCollector


def test_samples_round_trip_through_exposition_text() -> None:
    samples = (
        GpuSample(index=0, name="NVIDIA H100 80GB HBM3", memory_used_bytes=503_316_480,
                  memory_total_bytes=85_520_809_984, utilization=0.25, power_watts=70.96,
                  temperature_c=38.0, throttle_reasons=1),
        GpuSample(index=1, name="NVIDIA H100 80GB HBM3", memory_used_bytes=1 << 30,
                  memory_total_bytes=85_520_809_984, utilization=None, power_watts=None,
                  temperature_c=40.0, throttle_reasons=0),
    )  # fmt: skip
    sampler = GpuSampler()
    sampler._last = samples  # what a sampling round on a GPU node leaves
    registry = CollectorRegistry()
    registry.register(StateCollector(sampler.gauges))
    assert samples_from_metrics(generate_latest(registry).decode()) == samples


def test_no_gpu_metrics_gives_no_samples() -> None:
    assert samples_from_metrics("# TYPE foo gauge\nfoo 1\n") == ()
