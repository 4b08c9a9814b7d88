"""The record sink: one ``RequestRecord`` per request, to metrics, the request log and every
subscriber (the estimator, tests, the demo). Submission never blocks and never raises: the
log is written by a background thread through a bounded queue (overflow dropped and
counted), and a failing subscriber is logged once and counted, not propagated."""

from __future__ import annotations

import logging
import logging.handlers
import queue
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from estimator.records import RequestRecord

from .config import RequestLogConfig
from .request import InferenceRequest, Measurement
from .telemetry import Metrics

log = logging.getLogger("rightsizer.recorder")


class _LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return str(record.msg)


class RequestLog:
    """JSON lines, rotated by size, written off the event loop."""

    def __init__(self, cfg: RequestLogConfig, metrics: Metrics, queue_size: int = 10_000) -> None:
        assert cfg.path is not None
        Path(cfg.path).parent.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.metrics = metrics
        handler = logging.handlers.RotatingFileHandler(
            cfg.path, maxBytes=cfg.max_bytes, backupCount=cfg.backups, encoding="utf-8"
        )
        handler.setFormatter(_LineFormatter())
        self._queue: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=queue_size)
        self._listener = logging.handlers.QueueListener(self._queue, handler)
        self._handler = handler
        self._listener.start()

    def write(self, rec: RequestRecord, body: Mapping[str, Any] | None) -> None:
        if self.cfg.log_prompts and body is not None:
            line = orjson.dumps({**rec.to_dict(), "request_body": body}).decode()
        else:
            line = orjson.dumps(rec).decode()  # orjson serialises the dataclass natively
        item = logging.LogRecord("rightsizer.requests", logging.INFO, "", 0, line, None, None)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.metrics.records_dropped.labels("request_log").inc()

    def close(self) -> None:
        self._listener.stop()
        self._handler.close()


Subscriber = Callable[[RequestRecord], None]


class Recorder:
    def __init__(self, metrics: Metrics, request_log: RequestLog | None = None) -> None:
        self.metrics = metrics
        self.request_log = request_log
        self._subscribers: list[tuple[str, Subscriber]] = []
        self._failed: set[str] = set()

    def subscribe(self, name: str, fn: Subscriber) -> None:
        self._subscribers.append((name, fn))

    def submit(
        self,
        meas: Measurement,
        req: InferenceRequest | None,
        endpoint: str,
        body: Mapping[str, Any] | None = None,
    ) -> RequestRecord:
        rec = meas.to_record(req, endpoint)
        self.metrics.record(rec, meas.gaps)
        return self._deliver(rec, meas, body)

    def submit_shadow(self, meas: Measurement, req: InferenceRequest) -> RequestRecord:
        """A shadow copy's record: the group metrics, the log and the subscribers, never the
        client-facing request metrics (no client saw it)."""
        return self._deliver(meas.to_record(req, req.endpoint), meas, None)

    def _deliver(
        self, rec: RequestRecord, meas: Measurement, body: Mapping[str, Any] | None
    ) -> RequestRecord:
        if rec.group is not None:
            self.metrics.record_group(rec, meas.gaps)
        if self.request_log is not None:
            self.request_log.write(rec, body)
        for name, fn in self._subscribers:
            try:
                fn(rec)
            except Exception:  # a subscriber's bug must not fail the request; logged, counted
                self.metrics.records_dropped.labels(name).inc()
                if name not in self._failed:
                    self._failed.add(name)
                    log.exception("record subscriber %s failed (further failures counted)", name)
        return rec

    def close(self) -> None:
        if self.request_log is not None:
            self.request_log.close()
