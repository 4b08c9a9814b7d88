"""GpuSampler against a fake NVML module (the one fake allowed: there is no GPU here).

The fake mirrors pynvml's surface: module functions, ``NVMLError`` carrying ``value`` (the
NVML return code), memory/utilization structs with ``used``/``total``/``gpu``, power in mW.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from estimator.records import GpuSample
from proxy.gpu import GpuSampler, samples_from_metrics
from proxy.telemetry import StateCollector, gpu_families

GIB = 1 << 30


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__({1: "Uninitialized", 3: "Not Supported", 9: "Driver Not Loaded",
                          12: "NVML Shared Library Not Found", 15: "GPU is lost",
                          999: "Unknown Error"}.get(value, "error"))  # fmt: skip
        self.value = value


@dataclass
class FakeGpu:
    name: Any = "NVIDIA H100 80GB HBM3"
    used: int = 10 * GIB
    total: int = 80 * GIB
    util: int = 37
    power_mw: int = 312_500
    temp: int = 54
    reasons: int = 0
    fail: dict[str, int] = field(default_factory=dict)  # function -> NVML code it raises


class FakeNvml:
    """pynvml's functions over a list of FakeGpus; ``fail`` makes a call raise a code."""

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus: list[FakeGpu], fail: dict[str, int] | None = None) -> None:
        self.gpus = gpus
        self.fail = fail or {}
        self.calls: list[str] = []

    def _call(self, fn: str, gpu: FakeGpu | None = None) -> None:
        self.calls.append(fn)
        code = (gpu.fail if gpu is not None else {}).get(fn, self.fail.get(fn))
        if code is not None:
            raise FakeNVMLError(code)

    def nvmlInit(self) -> None:
        self._call("nvmlInit")

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")

    def nvmlDeviceGetCount(self) -> int:
        self._call("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        self._call("nvmlDeviceGetHandleByIndex", self.gpus[i])
        return self.gpus[i]

    def nvmlDeviceGetName(self, g: FakeGpu) -> Any:
        self._call("nvmlDeviceGetName", g)
        return g.name

    def nvmlDeviceGetMemoryInfo(self, g: FakeGpu) -> SimpleNamespace:
        self._call("nvmlDeviceGetMemoryInfo", g)
        return SimpleNamespace(used=g.used, total=g.total, free=g.total - g.used)

    def nvmlDeviceGetUtilizationRates(self, g: FakeGpu) -> SimpleNamespace:
        self._call("nvmlDeviceGetUtilizationRates", g)
        return SimpleNamespace(gpu=g.util, memory=10)

    def nvmlDeviceGetPowerUsage(self, g: FakeGpu) -> int:
        self._call("nvmlDeviceGetPowerUsage", g)
        return g.power_mw

    def nvmlDeviceGetTemperature(self, g: FakeGpu, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        self._call("nvmlDeviceGetTemperature", g)
        return g.temp

    def nvmlDeviceGetCurrentClocksEventReasons(self, g: FakeGpu) -> int:
        self._call("nvmlDeviceGetCurrentClocksEventReasons", g)
        return g.reasons


class OldFakeNvml(FakeNvml):
    """An nvidia-ml-py before 12.2: only the deprecated throttle-reasons name."""

    nvmlDeviceGetCurrentClocksEventReasons = None  # type: ignore[assignment]

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, g: FakeGpu) -> int:
        self._call("nvmlDeviceGetCurrentClocksThrottleReasons", g)
        return g.reasons


def test_reads_every_field_in_base_units() -> None:
    nv = FakeNvml([FakeGpu(), FakeGpu(name=b"NVIDIA A10G", used=GIB, total=24 * GIB, reasons=4)])
    s = GpuSampler(nv)
    assert s.available and s.reason is None
    assert s.sample() == (
        GpuSample(index=0, name="NVIDIA H100 80GB HBM3", memory_used_bytes=10 * GIB,
                  memory_total_bytes=80 * GIB, utilization=0.37, power_watts=312.5,
                  temperature_c=54.0, throttle_reasons=0),
        GpuSample(index=1, name="NVIDIA A10G", memory_used_bytes=GIB,
                  memory_total_bytes=24 * GIB, utilization=0.37, power_watts=312.5,
                  temperature_c=54.0, throttle_reasons=4),
    )  # fmt: skip


def test_old_pynvml_uses_the_deprecated_throttle_name() -> None:
    s = GpuSampler(OldFakeNvml([FakeGpu(reasons=8)]))
    assert s.sample()[0].throttle_reasons == 8


@pytest.mark.parametrize(
    ("fail", "reason"),
    [
        (
            {"nvmlInit": 12},
            "NVML did not initialise (NVML Shared Library Not Found (NVML error 12))",
        ),
        ({"nvmlInit": 9}, "NVML did not initialise (Driver Not Loaded (NVML error 9))"),
        ({"nvmlDeviceGetCount": 999}, "NVML could not count GPUs (Unknown Error (NVML error 999))"),
        ({"nvmlDeviceGetHandleByIndex": 15}, "no NVIDIA GPU found"),
    ],
    ids=["no-library", "no-driver", "count-fails", "every-handle-fails"],
)
def test_init_failures_make_a_clean_no_op(
    fail: dict[str, int], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    nv = FakeNvml([FakeGpu()], fail=fail)
    with caplog.at_level(logging.INFO, logger="rightsizer.gpu"):
        s = GpuSampler(nv)
        assert not s.available
        assert s.reason == reason
        assert s.sample() == ()
        assert list(gpu_families(s.last)) == []
        asyncio.run(asyncio.wait_for(s.run(0.01, lambda _: pytest.fail("sampled")), 1.0))
    offs = [r for r in caplog.records if "GPU telemetry off" in r.getMessage()]
    assert len(offs) == 1 and reason in offs[0].getMessage()
    # NVML initialised then gave up: shut down again; never initialised: never shut down
    assert ("nvmlShutdown" in nv.calls) == ("nvmlInit" not in fail)


def test_no_gpus_and_no_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GpuSampler(FakeNvml([])).reason == "no NVIDIA GPU found"
    monkeypatch.setattr("proxy.gpu._load_pynvml", lambda: None)
    off = GpuSampler()
    assert not off.available and off.reason == "pynvml (nvidia-ml-py) is not installed"


def test_default_is_pynvml_and_off_without_nvidia() -> None:
    s = GpuSampler()  # the real pynvml: no NVIDIA driver on this machine
    if s.available:  # a machine with a GPU: it must read something
        assert s.sample() and s.sample()[0].memory_total_bytes
        s.close()
    else:
        assert s.reason is not None and s.sample() == ()


def test_one_failing_gpu_handle_is_skipped_and_logged() -> None:
    nv = FakeNvml([FakeGpu(fail={"nvmlDeviceGetHandleByIndex": 999}), FakeGpu()])
    s = GpuSampler(nv)
    assert s.available
    assert [g.index for g in s.sample()] == [1]


@pytest.mark.parametrize(
    ("fn", "code", "none_fields"),
    [
        ("nvmlDeviceGetPowerUsage", 3, {"power_watts"}),
        ("nvmlDeviceGetCurrentClocksEventReasons", 3, {"throttle_reasons"}),
        ("nvmlDeviceGetMemoryInfo", 999, {"memory_used_bytes", "memory_total_bytes"}),
        ("nvmlDeviceGetUtilizationRates", 4, {"utilization"}),
        ("nvmlDeviceGetTemperature", 999, {"temperature_c"}),
        ("nvmlDeviceGetName", 999, {"name"}),
    ],
    ids=["power-not-supported", "throttle-not-supported", "memory-unknown-error",
         "util-no-permission", "temp-unknown-error", "name-unknown-error"],
)  # fmt: skip
def test_a_failing_field_is_none_and_the_rest_is_read(
    fn: str, code: int, none_fields: set[str], caplog: pytest.LogCaptureFixture
) -> None:
    s = GpuSampler(FakeNvml([FakeGpu(fail={fn: code})]))
    with caplog.at_level(logging.WARNING, logger="rightsizer.gpu"):
        for _ in range(3):
            (g,) = s.sample()
    fields = {"name", "memory_used_bytes", "memory_total_bytes", "utilization", "power_watts",
              "temperature_c", "throttle_reasons"}  # fmt: skip
    for f in fields:
        assert (getattr(g, f) is None) == (f in none_fields), f
    warned = [r for r in caplog.records if "NVML" in r.getMessage()]
    # NOT_SUPPORTED is normal (consumer boards, MIG): silent; anything else once, not per sample
    assert len(warned) == (0 if code == 3 else 1)


@pytest.mark.parametrize("code", [15, 1, 9], ids=["gpu-lost", "uninitialized", "driver-gone"])
def test_a_lost_gpu_keeps_its_index_and_name_only(code: int) -> None:
    lost = FakeGpu()
    nv = FakeNvml([lost, FakeGpu()])
    s = GpuSampler(nv)
    lost.fail["nvmlDeviceGetMemoryInfo"] = code
    a, b = s.sample()
    assert a == GpuSample(index=0, name="NVIDIA H100 80GB HBM3")
    assert b.memory_used_bytes == 10 * GIB
    assert "nvmlDeviceGetUtilizationRates" in nv.calls  # GPU 1 still read
    lost.fail.clear()  # recovered (e.g. after a reset): read again
    assert s.sample()[0].memory_used_bytes == 10 * GIB


def test_gauges_export_the_latest_samples_without_calling_nvml() -> None:
    nv = FakeNvml([FakeGpu(), FakeGpu(fail={"nvmlDeviceGetPowerUsage": 3})])
    s = GpuSampler(nv)
    assert list(gpu_families(s.last)) == []  # nothing sampled yet
    s.sample()
    n_calls = len(nv.calls)
    reg = CollectorRegistry()
    reg.register(StateCollector(lambda: gpu_families(s.last)))
    v = reg.get_sample_value
    name = "NVIDIA H100 80GB HBM3"
    assert v("rightsizer_gpu_memory_used_bytes", {"gpu": "0", "name": name}) == 10 * GIB
    assert v("rightsizer_gpu_memory_total_bytes", {"gpu": "1", "name": name}) == 80 * GIB
    assert v("rightsizer_gpu_utilization_ratio", {"gpu": "0", "name": name}) == 0.37
    assert v("rightsizer_gpu_power_watts", {"gpu": "0", "name": name}) == 312.5
    assert v("rightsizer_gpu_power_watts", {"gpu": "1", "name": name}) is None  # unknown: absent
    assert v("rightsizer_gpu_temperature_celsius", {"gpu": "1", "name": name}) == 54.0
    assert v("rightsizer_gpu_throttle_reasons", {"gpu": "1", "name": name}) == 0.0
    assert len(nv.calls) == n_calls


async def test_run_samples_off_the_loop_until_cancelled_then_shuts_down() -> None:
    nv = FakeNvml([FakeGpu()])
    s = GpuSampler(nv)
    got: list[tuple[GpuSample, ...]] = []
    two = asyncio.Event()

    def on_samples(samples: tuple[GpuSample, ...]) -> None:
        got.append(samples)
        if len(got) >= 2:
            two.set()

    task = asyncio.create_task(s.run(0.001, on_samples))
    await asyncio.wait_for(two.wait(), 5.0)
    assert s.last == got[-1] and got[-1][0].utilization == 0.37
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert nv.calls[-1] == "nvmlShutdown" and not s.available
    assert list(gpu_families(s.last)) == []  # no stale values after shutdown
    s.close()  # idempotent
    assert nv.calls.count("nvmlShutdown") == 1


def test_shutdown_failure_is_not_raised() -> None:
    s = GpuSampler(FakeNvml([FakeGpu()], fail={"nvmlShutdown": 1}))
    s.close()
    assert not s.available


def test_samples_round_trip_through_a_gpu_exporters_metrics_text() -> None:
    """What a proxy on another node reads from a ``rightsizer gpu-exporter``'s /metrics is
    what the exporter's sampler read, every field (and a field NVML did not give stays None)."""
    nv = FakeNvml([
        FakeGpu(power_mw=70_960, used=503_316_480, total=85_520_809_984, util=25, reasons=1),
        FakeGpu(used=GIB, fail={"nvmlDeviceGetUtilizationRates": 3,
                                "nvmlDeviceGetPowerUsage": 3}),
    ])  # fmt: skip
    s = GpuSampler(nv)
    samples = s.sample()
    assert samples[1].utilization is None and samples[1].power_watts is None
    registry = CollectorRegistry()
    registry.register(StateCollector(lambda: gpu_families(s.last)))
    assert samples_from_metrics(generate_latest(registry).decode()) == samples


def test_no_gpu_metrics_gives_no_samples() -> None:
    assert samples_from_metrics("# TYPE foo gauge\nfoo 1\n") == ()
