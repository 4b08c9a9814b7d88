"""The estimator's own process (``proxy.estimation`` starts it; nothing imports it).

Frames are length-prefixed (4-byte big-endian size, then the payload). The first frame on
stdin is the pickled ``EstimatorConfig`` (from the parent, trusted). Then, in one of two modes:

- pipe (one proxy process): JSON frames in on stdin, ``{"records": [...], "snapshots":
  [...]}`` or ``{"refresh": <epoch>}``; each refresh answers one JSON frame on stdout,
  ``{"report": {...}, "families": [...], "seconds": s}`` or ``{"error": "..."}``. It exits
  when stdin closes (the proxy stopped).
- ``--serve DIR`` (the workers of ``serve --workers N``): records frames from any number of
  workers on the unix socket ``DIR/estimator.sock``; every ``refresh_interval_s`` it
  refreshes and replaces ``DIR/report.json`` (report, gauge families and counters) for the
  workers to read. It exits when stdin closes (the supervisor stopped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pickle
import signal
import struct
import sys
import time
from pathlib import Path
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


def _ingest(est: Estimator, msg: dict[str, Any]) -> None:
    for d in msg.get("records", ()):
        est.observe(RequestRecord.from_dict(d))
    for d in msg.get("snapshots", ()):
        est.observe_backend(BackendSnapshot.from_dict(d))


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


def pipe_mode(est: Estimator, stdin: BinaryIO, stdout: BinaryIO) -> int:
    while (frame := _read(stdin)) is not None:
        msg = orjson.loads(frame)
        _ingest(est, msg)
        if "refresh" in msg:
            _write(stdout, _refresh(est, float(msg["refresh"])))
    return 0


async def _serve(est: Estimator, folder: Path, interval_s: float) -> None:
    stats = {"refreshes": 0, "refresh_seconds": 0.0, "failures": 0, "last_error": None}

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ValueError):
            while True:
                (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                _ingest(est, orjson.loads(await reader.readexactly(size)))
        writer.close()

    sock = folder / "estimator.sock"
    server = await asyncio.start_unix_server(conn, path=str(sock))
    stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
    async with server:
        while not stdin_closed.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stdin_closed), interval_s)
            if stdin_closed.done():
                break
            out = await asyncio.to_thread(_refresh, est, time.time())
            if "error" in out:
                stats["failures"] += 1  # type: ignore[operator]
                stats["last_error"] = out["error"]
            else:
                stats["refreshes"] += 1  # type: ignore[operator]
                stats["refresh_seconds"] += out["seconds"]  # type: ignore[operator]
            tmp = folder / "report.json.tmp"
            tmp.write_bytes(orjson.dumps({**out, "stats": stats}))
            os.replace(tmp, folder / "report.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="estimator_worker")
    p.add_argument("--serve", help="folder: serve workers on its estimator.sock")
    args = p.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):  # it stops when its parent closes stdin
        signal.signal(sig, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    first = _read(stdin)
    if first is None:
        return 1
    config, experiments = pickle.loads(first)  # (EstimatorConfig, ExperimentsSpec | None)
    est = Estimator(config, experiments=experiments)
    if args.serve:
        asyncio.run(_serve(est, Path(args.serve), float(config.refresh_interval_s)))
        return 0
    return pipe_mode(est, stdin, stdout)


if __name__ == "__main__":
    raise SystemExit(main())
