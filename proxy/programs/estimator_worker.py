"""The estimator's child process (``proxy.estimation.EstimatorProcess`` starts it).

Protocol, length-prefixed frames (4-byte big-endian size, then the payload) on stdin/stdout:
first frame in, the pickled ``EstimatorConfig`` (from the parent, trusted); then JSON frames in,
``{"records": [...], "snapshots": [...]}`` or ``{"refresh": <epoch>}``; each refresh answers one
JSON frame out, ``{"report": {...}, "families": [...], "seconds": s}`` or ``{"error": "..."}``.
It exits when stdin closes (the proxy stopped).
"""

from __future__ import annotations

import pickle
import struct
import sys
import time
from typing import Any, BinaryIO

import orjson

from estimator.records import BackendSnapshot, RequestRecord
from estimator.service import Estimator

_HEADER = struct.Struct("!I")


def _read(stream: BinaryIO) -> bytes | None:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(head)
    body = stream.read(size)
    return body if len(body) == size else None


def _write(stream: BinaryIO, msg: dict[str, Any]) -> None:
    payload = orjson.dumps(msg)
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _refresh(est: Estimator, now: float) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        report = est.refresh(now)
    except Exception as exc:  # reported to the parent, which counts and logs it
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "report": report.to_dict(),
        "families": report.gauge_families(),
        "seconds": time.perf_counter() - started,
    }


def main() -> int:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    first = _read(stdin)
    if first is None:
        return 1
    est = Estimator(pickle.loads(first))
    while (frame := _read(stdin)) is not None:
        msg = orjson.loads(frame)
        for d in msg.get("records", ()):
            est.observe(RequestRecord.from_dict(d))
        for d in msg.get("snapshots", ()):
            est.observe_backend(BackendSnapshot.from_dict(d))
        if "refresh" in msg:
            _write(stdout, _refresh(est, float(msg["refresh"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
