"""The online estimator, seen from a proxy: records in, the latest report out.

The estimator's refresh (fits, simulations, capacity searches) is pure-Python CPU work of up to
hundreds of milliseconds. Run on a thread of the proxy's process it holds the GIL and delays
the event loop, and with it every relayed chunk and TTFT. So a proxy runs it in a child
process (``EstimatorProcess``, the default): records and engine snapshots go to the child in
batches over a pipe (one orjson frame every ``FLUSH_S`` or ``FLUSH_RECORDS``), the child
refreshes every ``refresh_interval_s`` and sends back the report (a JSON dict) and its gauge
families. The proxy process does no simulation.

``InProcessEstimator`` keeps the estimator in the calling process (refresh in a thread): for
the standalone ``rightsizer estimator`` service, the demo and tests.

Failures: a refresh that raises is counted (``rightsizer_estimator_refresh_failures_total``)
and logged, at most once a minute with the count since the last line; a child that dies is
restarted after a back-off (counted the same way). Records beyond ``BUFFER_MAX`` waiting for
the child are dropped and counted (``rightsizer_estimator_records_dropped_total``). Nothing
here can fail a request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import pickle
import struct
import sys
import time
from typing import Any, Protocol

import orjson

from estimator.records import BackendSnapshot, RequestRecord

log = logging.getLogger("rightsizer.estimation")

FLUSH_S = 0.1
FLUSH_RECORDS = 500
BUFFER_MAX = 50_000
_HEADER = struct.Struct("!I")
GaugeFamily = tuple[str, str, tuple[str, ...], list[tuple[tuple[str, ...], float]]]


class EstimatorRunner(Protocol):
    """What the proxy holds: O(1) observers on the request path, the latest report, a task,
    and counters that telemetry reads at scrape time."""

    stats: RunnerStats

    def observe(self, record: RequestRecord) -> None: ...
    def observe_backend(self, snapshot: BackendSnapshot) -> None: ...
    def report(self) -> dict[str, Any] | None: ...
    def families(self) -> list[GaugeFamily]: ...
    async def run(self) -> None: ...


class RunnerStats:
    """Counters of an estimator runner (exported by ``proxy.telemetry``)."""

    __slots__ = ("_last_log", "_unlogged", "dropped", "failures", "refresh_seconds", "refreshes")

    def __init__(self) -> None:
        self.refreshes = 0
        self.refresh_seconds = 0.0
        self.failures = 0
        self.dropped = 0
        self._last_log = -1e18
        self._unlogged = 0

    def refreshed(self, seconds: float) -> None:
        self.refreshes += 1
        self.refresh_seconds += seconds

    def failed(self, reason: str, every_s: float = 60.0) -> None:
        """Count a failed refresh; log it, at most once per ``every_s`` with the count."""
        self.failures += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_log >= every_s:
            more = f" ({self._unlogged - 1} more since the last line)" if self._unlogged > 1 else ""
            log.error("estimator refresh failed: %s%s", reason, more)
            self._last_log, self._unlogged = now, 0


class InProcessEstimator:
    """The estimator in this process; ``run`` refreshes it in a worker thread on a timer
    (``interval_s`` None: no timer, the owner refreshes it, as the demo does)."""

    def __init__(self, est: Any, interval_s: float | None) -> None:
        self.est, self.interval_s = est, interval_s
        self.stats = RunnerStats()

    def observe(self, record: RequestRecord) -> None:
        self.est.observe(record)

    def observe_backend(self, snapshot: BackendSnapshot) -> None:
        self.est.observe_backend(snapshot)

    def report(self) -> dict[str, Any] | None:
        r = self.est.report()
        return None if r is None else r.to_dict()  # type: ignore[no-any-return]

    def families(self) -> list[GaugeFamily]:
        r = self.est.report()
        return [] if r is None else r.gauge_families()  # type: ignore[no-any-return]

    async def run(self) -> None:
        if self.interval_s is None:
            await asyncio.Event().wait()  # until cancelled
        while True:
            await asyncio.sleep(self.interval_s or 0.0)
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self.est.refresh)
            except Exception as exc:  # the estimator must never take its host down
                self.stats.failed(f"{type(exc).__name__}: {exc}")
                continue
            self.stats.refreshed(time.perf_counter() - started)


class _Outbox:
    """Records and snapshots waiting to go to an estimator in another process: ``observe*``
    are O(1) on the request path; ``batch`` waits up to ``FLUSH_S`` (less when
    ``FLUSH_RECORDS`` are waiting) and takes everything as one JSON frame, or None."""

    def __init__(self) -> None:
        self.stats = RunnerStats()
        self._records: collections.deque[RequestRecord] = collections.deque()
        self._snapshots: collections.deque[BackendSnapshot] = collections.deque(maxlen=1024)
        self._wake = asyncio.Event()

    def observe(self, record: RequestRecord) -> None:
        q = self._records
        if len(q) >= BUFFER_MAX:
            q.popleft()
            self.stats.dropped += 1
        q.append(record)
        if len(q) >= FLUSH_RECORDS:
            self._wake.set()

    def observe_backend(self, snapshot: BackendSnapshot) -> None:
        self._snapshots.append(snapshot)

    async def batch(self) -> bytes | None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLUSH_S):
                await self._wake.wait()
        self._wake.clear()
        records = [self._records.popleft() for _ in range(len(self._records))]
        snaps = [self._snapshots.popleft() for _ in range(len(self._snapshots))]
        if not (records or snaps):
            return None
        return orjson.dumps({"records": records, "snapshots": snaps})


class EstimatorProcess(_Outbox):
    """The estimator in a child process (see the module docstring)."""

    def __init__(self, config: Any, experiments: Any = None) -> None:
        """``config``: the ``EstimatorConfig``; ``experiments``: the ``ExperimentsSpec`` of the
        proxy's groups, or None (both are pickled to the child)."""
        super().__init__()
        self.config = config
        self.experiments = experiments
        self._report: dict[str, Any] | None = None
        self._families: list[GaugeFamily] = []

    def report(self) -> dict[str, Any] | None:
        return self._report

    def families(self) -> list[GaugeFamily]:
        return self._families

    # --- the child ---

    async def run(self) -> None:
        """Keep a child running and fed, until cancelled."""
        backoff = 1.0
        while True:
            started = time.monotonic()
            try:
                await self._serve_child()
            except (OSError, EOFError, ValueError, asyncio.IncompleteReadError) as exc:
                self.stats.failed(f"the estimator process stopped ({type(exc).__name__})")
            if time.monotonic() - started > 60:
                backoff = 1.0
            await asyncio.sleep(backoff)
            backoff = min(30.0, backoff * 2)

    async def _serve_child(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.programs.estimator_worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        try:
            _send(proc.stdin, pickle.dumps((self.config, self.experiments)))
            reader = asyncio.create_task(self._read_reports(proc.stdout))
            try:
                await self._feed(proc.stdin, reader)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _feed(self, stdin: asyncio.StreamWriter, reader: asyncio.Task[None]) -> None:
        interval = float(self.config.refresh_interval_s)
        next_refresh = time.monotonic() + interval
        while not reader.done():
            frame = await self.batch()
            if frame is not None:
                _send(stdin, frame)
            if time.monotonic() >= next_refresh:
                _send(stdin, orjson.dumps({"refresh": time.time()}))
                next_refresh = time.monotonic() + interval
            await stdin.drain()
        reader.result()  # the child's end: raise what stopped it

    async def _read_reports(self, stdout: asyncio.StreamReader) -> None:
        while True:
            (size,) = _HEADER.unpack(await stdout.readexactly(_HEADER.size))
            msg = orjson.loads(await stdout.readexactly(size))
            if msg.get("error"):
                self.stats.failed(str(msg["error"]))
                continue
            self._report = msg["report"]
            self._families = [(n, d, tuple(ls), [(tuple(k), v) for k, v in s])
                              for n, d, ls, s in msg["families"]]  # fmt: skip
            self.stats.refreshed(float(msg.get("seconds", 0.0)))


def _send(stream: asyncio.StreamWriter, payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)) + payload)


class SocketEstimator(_Outbox):
    """A worker's view of the machine's one estimator (``serve --workers N``): records go to
    its unix socket in batches; the report is read from the file it replaces after each
    refresh (``proxy.programs.estimator_worker --serve``)."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder
        self._loaded: tuple[float, dict[str, Any]] | None = None

    def _latest(self) -> dict[str, Any] | None:
        path = f"{self.folder}/report.json"
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            return None
        if self._loaded is None or self._loaded[0] != mtime:
            try:
                with open(path, "rb") as f:
                    self._loaded = (mtime, orjson.loads(f.read()))
            except (OSError, orjson.JSONDecodeError):
                return None if self._loaded is None else self._loaded[1]
            st = self._loaded[1].get("stats", {})
            self.stats.refreshes = int(st.get("refreshes", 0))
            self.stats.refresh_seconds = float(st.get("refresh_seconds", 0.0))
            self.stats.failures = int(st.get("failures", 0))
        return self._loaded[1]

    def report(self) -> dict[str, Any] | None:
        latest = self._latest()
        return None if latest is None else latest.get("report")

    def families(self) -> list[GaugeFamily]:
        latest = self._latest()
        if latest is None:
            return []
        return [(n, d, tuple(ls), [(tuple(k), v) for k, v in s])
                for n, d, ls, s in latest.get("families", ())]  # fmt: skip

    async def run(self) -> None:
        """Keep a connection to the estimator and send batches, until cancelled."""
        while True:
            try:
                _, writer = await asyncio.open_unix_connection(f"{self.folder}/estimator.sock")
            except OSError:
                await asyncio.sleep(1.0)
                continue
            try:
                while True:
                    frame = await self.batch()
                    if frame is not None:
                        _send(writer, frame)
                        await writer.drain()
            except (OSError, ConnectionError):
                await asyncio.sleep(1.0)
            finally:
                writer.close()
