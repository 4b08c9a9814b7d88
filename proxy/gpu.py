"""GPU telemetry from NVML (``pynvml``, package ``nvidia-ml-py``): one ``GpuSample`` per GPU.

``GpuSampler`` reads every GPU of the node it runs on (beside an engine, or inside the proxy
when it shares the engine's node). ``run`` samples in a worker thread every ``interval_s``
(NVML calls block for up to milliseconds each) and hands the samples to ``on_samples`` (to
attach them to a ``BackendSnapshot``); ``last`` holds the latest samples, which
``telemetry`` exports at scrape time without touching NVML, so ``/metrics`` never blocks on
the driver.

Failure handling, by NVML phase:

* ``nvmlInit`` fails (no library, no driver, no permission) or no GPU is present: the sampler
  is unavailable, says so in one log line, and every method is a cheap no-op.
* one reading of one GPU fails (``NOT_SUPPORTED`` on consumer boards and MIG slices, a
  transient error): that field is ``None`` (unknown, never -1); a new kind of failure is
  logged once per field.
* a GPU is lost (``GPU_IS_LOST``) or the driver goes away mid-run (``UNINITIALIZED``,
  ``DRIVER_NOT_LOADED``): that GPU's sample carries only its index and name, logged once.

Metrics (``{gpu, name}``: index and product name): ``rightsizer_gpu_memory_used_bytes``,
``..._memory_total_bytes``, ``..._utilization_ratio`` (0..1), ``..._power_watts``,
``..._temperature_celsius``, ``..._throttle_reasons`` (NVML clocks-event bitmask).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

from estimator.records import GpuSample

from .telemetry import GPU_GAUGES

log = logging.getLogger("rightsizer.gpu")

# NVML return codes (nvml.h); kept here so a fake module needs only the functions
_NOT_SUPPORTED = 3
_DEVICE_GONE = frozenset({15, 1, 9})  # GPU_IS_LOST, UNINITIALIZED, DRIVER_NOT_LOADED

OnSamples = Callable[[tuple[GpuSample, ...]], None]


def _load_pynvml() -> ModuleType | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


class GpuSampler:
    """Reads every GPU through NVML; a clean no-op where there is none (see module docstring)."""

    def __init__(self, nvml: Any | None = None) -> None:
        self._nvml = nvml if nvml is not None else _load_pynvml()
        self._handles: list[tuple[int, Any, str | None]] = []
        self._logged: set[tuple[object, ...]] = set()
        self._last: tuple[GpuSample, ...] = ()
        self.available = False
        self.reason: str | None = None  # why unavailable
        self._init()

    def _init(self) -> None:
        nv = self._nvml
        if nv is None:
            self._off("pynvml (nvidia-ml-py) is not installed")
            return
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            self._off(f"NVML did not initialise ({_describe(exc)})")
            return
        try:
            count = int(nv.nvmlDeviceGetCount())
        except nv.NVMLError as exc:
            self._shutdown()
            self._off(f"NVML could not count GPUs ({_describe(exc)})")
            return
        for i in range(count):
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(i)
            except nv.NVMLError as exc:
                self._once(("handle", i), "GPU %d skipped: no NVML handle (%s)", i, _describe(exc))
                continue
            self._handles.append((i, handle, self._name(handle)))
        if not self._handles:
            self._shutdown()
            self._off("no NVIDIA GPU found")
            return
        self.available = True
        names = ", ".join(f"{i}: {n or 'unknown'}" for i, _, n in self._handles)
        log.info("GPU telemetry on %d GPU(s): %s", len(self._handles), names)

    def _off(self, reason: str) -> None:
        self.reason = reason
        log.info("GPU telemetry off: %s", reason)

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as exc:
            log.debug("nvmlShutdown failed: %s", _describe(exc))

    def _name(self, handle: Any) -> str | None:
        name = self._read("name", self._nvml.nvmlDeviceGetName, handle)
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        return None if name is None else str(name)

    def _once(self, key: tuple[object, ...], msg: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(msg, *args)

    def _read(self, field: str, fn: Callable[..., Any], *args: Any) -> Any:
        """One NVML reading; None when it fails (logged once per field and error code)."""
        try:
            return fn(*args)
        except self._nvml.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code != _NOT_SUPPORTED:
                self._once(("read", field, code), "NVML %s failed: %s", field, _describe(exc))
            if code in _DEVICE_GONE:
                raise _DeviceGone from exc
            return None

    @property
    def last(self) -> tuple[GpuSample, ...]:
        """The samples of the last ``run`` iteration (empty before the first)."""
        return self._last

    def sample(self) -> tuple[GpuSample, ...]:
        """Read every GPU now (blocking: call from a thread on a running loop)."""
        if not self.available:
            return ()
        out = []
        for index, handle, name in self._handles:
            try:
                out.append(self._sample_one(index, handle, name))
            except _DeviceGone:
                out.append(GpuSample(index=index, name=name))
        self._last = tuple(out)
        return self._last

    def _sample_one(self, index: int, handle: Any, name: str | None) -> GpuSample:
        nv = self._nvml
        mem = self._read("memory", nv.nvmlDeviceGetMemoryInfo, handle)
        util = self._read("utilization", nv.nvmlDeviceGetUtilizationRates, handle)
        power_mw = self._read("power", nv.nvmlDeviceGetPowerUsage, handle)
        temp = self._read("temperature", nv.nvmlDeviceGetTemperature, handle,
                          getattr(nv, "NVML_TEMPERATURE_GPU", 0))  # fmt: skip
        reasons = self._read("throttle_reasons", self._throttle_fn(), handle)
        return GpuSample(
            index=index,
            name=name,
            memory_used_bytes=int(mem.used) if mem is not None else None,
            memory_total_bytes=int(mem.total) if mem is not None else None,
            utilization=float(util.gpu) / 100.0 if util is not None else None,
            power_watts=float(power_mw) / 1000.0 if power_mw is not None else None,
            temperature_c=float(temp) if temp is not None else None,
            throttle_reasons=int(reasons) if reasons is not None else None,
        )

    def _throttle_fn(self) -> Callable[[Any], Any]:
        nv = self._nvml
        # renamed in NVML 12.2 ("clocks event reasons"); the old name is deprecated
        fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
        return fn or nv.nvmlDeviceGetCurrentClocksThrottleReasons  # type: ignore[no-any-return]

    async def run(self, interval_s: float, on_samples: OnSamples | None = None) -> None:
        """Sample every ``interval_s`` in a worker thread until cancelled; returns at once
        when unavailable. NVML is shut down when the loop ends."""
        if not self.available:
            return
        try:
            while True:
                samples = await asyncio.to_thread(self.sample)
                if on_samples is not None:
                    on_samples(samples)
                await asyncio.sleep(interval_s)
        finally:
            self.close()

    def close(self) -> None:
        """Release NVML (idempotent)."""
        self._last = ()
        if self.available:
            self.available = False
            self._shutdown()


class _DeviceGone(Exception):
    """A GPU (or the driver) went away while it was read."""


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    code = getattr(exc, "value", None)
    return f"{text} (NVML error {code})" if code is not None else text


def samples_from_metrics(text: str) -> tuple[GpuSample, ...]:
    """GPU samples back from ``rightsizer_gpu_*`` exposition text (a ``rightsizer gpu-exporter``
    running beside an engine on another node)."""
    from prometheus_client.parser import text_string_to_metric_families

    attrs = {metric: attr for metric, _, attr in GPU_GAUGES}
    by_gpu: dict[int, dict[str, Any]] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            attr = attrs.get(smp.name)
            if attr is None or "gpu" not in smp.labels:
                continue
            fields = by_gpu.setdefault(int(smp.labels["gpu"]), {"name": smp.labels.get("name")})
            value = smp.value
            fields[attr] = int(value) if attr in _INT_FIELDS else float(value)
    return tuple(GpuSample(index=i, **f) for i, f in sorted(by_gpu.items()))


_INT_FIELDS = frozenset({"memory_used_bytes", "memory_total_bytes", "throttle_reasons"})
