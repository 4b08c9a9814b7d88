"""Fault tests with counts (issue 10, "Prove it"): real processes, real signals.

Each test drives requests through the real proxy while a fault happens and counts:

- tried: requests sent;
- lost: no HTTP response at all, or no request-log record for it;
- hung: no end (a complete body, ``[DONE]`` or a final SSE error event) within the bound;
- wrong: a response or record that is not what the fault allows (status, how the stream
  ended, the record's status and outcome).

The goal is 0 lost, 0 hung, 0 wrong, with the proxy's RSS bounded (``RSS_GROWTH_MAX``) and
no traceback, ERROR line or secret in its log. Each test prints one line for README's
reliability section (collected at the end of the run: "reliability summary").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from tests.support import adversarial_corpus as corpus
from tests.support.adversarial import (
    SUMMARY_LINES,
    Case,
    LogWatch,
    Result,
    judge,
    port_of,
    record_index,
    rss_bytes,
    start_faulty,
    stop_quietly,
    stream_end,
    wait_records,
)
from tests.support.procs import (
    Proc,
    metric_value,
    start_emulator,
    start_proxy,
    wait_for,
)
from tests.support.rawhttp import exchange, read_until
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.adversarial]

RSS_GROWTH_MAX = 50 << 20
STREAM = frozenset({200})


@dataclass
class Tally:
    """tried / lost / hung / wrong for one fault, with the first few reasons."""

    name: str
    tried: int = 0
    lost: int = 0
    hung: int = 0
    wrong: int = 0
    why: list[str] = field(default_factory=list)
    extra: str = ""
    faults: list[str] = field(default_factory=list)  # not one request's: the log, the engine

    def flag(self, problem: str) -> None:
        self.faults.append(problem)

    def add(self, label: str, problems: Sequence[str]) -> None:
        self.tried += 1
        if not problems:
            return
        text = "; ".join(problems)
        if any(p.startswith("hung") for p in problems):
            self.hung += 1
        elif any(p.startswith(("no response", "no request-log record")) for p in problems):
            self.lost += 1
        else:
            self.wrong += 1
            if len(self.why) < 12:
                self.why.append(f"{label}: {text}")
            return
        self.why.insert(0, f"{label}: {text}")  # lost and hung first

    def line(self) -> str:
        more = f"; also: {'; '.join(self.faults[:3])}" if self.faults else ""
        return (f"{self.name}: tried {self.tried}, lost {self.lost}, hung {self.hung}, "
                f"wrong {self.wrong}{self.extra}{more}")  # fmt: skip

    @property
    def clean(self) -> bool:
        return (self.lost, self.hung, self.wrong) == (0, 0, 0) and not self.faults

    def check(self) -> None:
        SUMMARY_LINES.append(self.line())
        print(self.line())
        assert self.clean, self.line() + "\n" + "\n".join(self.why + self.faults)


def _log(p: Proc) -> Path:
    log = p.extra["log"]
    assert isinstance(log, Path)
    return log


def _proxy(backends: list[str], tmp: Path, config: dict[str, Any] | None = None,
           env: dict[str, str] | None = None, extra: Sequence[str] = ()) -> Proc:  # fmt: skip
    cfg: dict[str, Any] = {"health": {"interval_s": 0.5, "timeout_s": 2.0}}
    cfg.update(config or {})
    log = tmp / "requests.jsonl"
    p = start_proxy(backends, config=cfg, request_log=log, env=env, extra=extra)
    p.extra["log"] = log
    return p


def _stream_case(rid: str, model: str = "emu", max_tokens: int = 100, timeout_s: float = 20.0,
                 **fields: Any) -> Case:  # fmt: skip
    body = corpus.compl_body(model, max_tokens=max_tokens, stream=True, **fields)
    return Case(
        rid,
        "fault",
        corpus.post(corpus.COMPL, body, rid),
        rid=rid,
        statuses=STREAM,
        timeout_s=timeout_s,
    )


def _plain_case(rid: str, statuses: set[int], model: str = "emu", max_tokens: int = 50,
                timeout_s: float = 20.0) -> Case:  # fmt: skip
    body = corpus.compl_body(model, max_tokens=max_tokens)
    return Case(rid, "fault", corpus.post(corpus.COMPL, body, rid), rid=rid, statuses=frozenset(statuses),
                timeout_s=timeout_s)  # fmt: skip


async def _run(port: int, cases: Sequence[Case], start_delay_s: float = 0.0) -> list[Result]:
    await asyncio.sleep(start_delay_s)
    resps = await asyncio.gather(*(exchange(port, c.parts, timeout_s=c.timeout_s) for c in cases))
    return [Result(c, r) for c, r in zip(cases, resps, strict=True)]


def _settle(p: Proc, rss0: int, watch: LogWatch, tally: Tally) -> None:
    """The scenario's end: the proxy's memory growth and log problems go into ``tally``,
    which then must hold no failure; growth past ``RSS_GROWTH_MAX`` fails too."""
    grown = rss_bytes(p.proc.pid) - rss0
    tally.extra = f", RSS +{grown >> 20} MB"
    for problem in watch.problems()[:5]:
        tally.flag(problem)
    assert grown <= RSS_GROWTH_MAX
    tally.check()


def _judge_all(p: Proc, results: list[Result], tally: Tally,
               extra_check: Callable[[Result], list[str]] | None = None,
               ignore: tuple[str, ...] = ()) -> None:  # fmt: skip
    log = _log(p)
    wait_records(log, [r.case.rid for r in results if r.case.rid], timeout_s=15)
    index = record_index(log)
    for r in results:
        r.records = index.get(r.case.rid or "", [])
        problems = [x for x in judge(r) if not x.startswith(ignore)]
        if extra_check is not None and not r.resp.timed_out:
            problems += extra_check(r)
        tally.add(r.case.name, problems)


# --- backend killed mid-stream (SIGKILL) ---


@pytest.mark.timeout(90)
def test_backend_killed_mid_stream(tmp_path: Path) -> None:
    a = start_emulator("emu", ttft=0.02, itl=0.02)
    b = start_emulator("emu", ttft=0.02, itl=0.02)
    p = _proxy([a.url, b.url], tmp_path)
    try:
        watch = LogWatch(p.log_path)
        watch.mark()
        rss0 = rss_bytes(p.proc.pid)
        port = port_of(p)
        first = [_stream_case(f"kill-s{i}", max_tokens=150) for i in range(24)]
        first += [_plain_case(f"kill-p{i}", {200, 502}, max_tokens=100) for i in range(8)]
        after = [_stream_case(f"kill-after-s{i}", max_tokens=20) for i in range(8)]
        after += [_plain_case(f"kill-after-p{i}", {200}, max_tokens=20) for i in range(8)]

        async def scenario() -> list[Result]:
            running = asyncio.ensure_future(_run(port, first))
            await asyncio.sleep(0.7)
            a.kill()  # SIGKILL, by its process group (our own child)
            later = await _run(port, after, start_delay_s=0.3)
            return [*await running, *later]

        results = asyncio.run(scenario())
        tally = Tally("backend SIGKILL mid-stream (2 engines, 1 killed)")
        _judge_all(p, results, tally)
        _settle(p, rss0, watch, tally)
    finally:
        stop_quietly(p, a, b)


# --- backend stalled (SIGSTOP, then SIGCONT) ---


@pytest.mark.timeout(90)
def test_backend_stalled_then_resumed(tmp_path: Path) -> None:
    a = start_emulator("emu", ttft=0.02, itl=0.02)
    b = start_emulator("emu", ttft=0.02, itl=0.02)
    p = _proxy([a.url, b.url], tmp_path, config={  # ejected for 2 s, re-checked every 0.5 s
        "health": {"interval_s": 0.5, "timeout_s": 2.0, "eject_s": 2.0}, "timeouts": {"read_s": 1.5}})  # fmt: skip
    try:
        watch = LogWatch(p.log_path)
        watch.mark()
        rss0 = rss_bytes(p.proc.pid)
        port = port_of(p)
        first = [_stream_case(f"stop-s{i}", max_tokens=150) for i in range(16)]
        first += [_plain_case(f"stop-p{i}", {200, 504}, max_tokens=100) for i in range(8)]
        # sent while the engine is stopped: a request routed to it before the health check
        # marks it down can only time out (504); the rest go to the other engine
        during = [_plain_case(f"stop-during-p{i}", {200, 504}, max_tokens=10) for i in range(8)]
        during += [_stream_case(f"stop-during-s{i}", max_tokens=10) for i in range(8)]
        for c in during:  # a stream whose engine never answers gets 504 before its headers
            c.statuses = frozenset({200, 504})
        resumed = [_plain_case(f"stop-after-p{i}", {200}, max_tokens=10) for i in range(8)]
        resumed += [_stream_case(f"stop-after-s{i}", max_tokens=10) for i in range(8)]

        async def scenario() -> list[Result]:
            running = asyncio.ensure_future(_run(port, first))
            await asyncio.sleep(0.7)
            os.kill(a.proc.pid, signal.SIGSTOP)
            try:
                mid = await _run(port, during, start_delay_s=0.5)
                await asyncio.sleep(max(0.0, 3.0 - 0.5))
            finally:
                os.kill(a.proc.pid, signal.SIGCONT)
            await asyncio.to_thread(_wait_backends_up, p, 2)
            return [*await running, *mid, *await _run(port, resumed)]

        results = asyncio.run(scenario())
        tally = Tally("backend SIGSTOP 3 s then SIGCONT (2 engines, 1 stalled)")

        def stream_timeouts(r: Result) -> list[str]:
            end, err = stream_end(r.resp.decoded_body())
            if r.case.statuses == STREAM and end == "error" and "timeout" not in str(err):
                return [f"a stalled stream ended with {err}, wanted an upstream_timeout event"]
            return []

        _judge_all(p, results, tally, stream_timeouts)
        _settle(p, rss0, watch, tally)
    finally:
        stop_quietly(p, a, b)


def _wait_backends_up(p: Proc, n: int) -> None:
    def up() -> bool:
        with contextlib.suppress(OSError):
            return metric_value(p.metrics_text(), "rightsizer_backend_up") >= n
        return False

    wait_for(up, timeout_s=15)


# --- Redis killed / stalled and restarted under load ---


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    r = RedisServer(persist_dir=str(tmp_path))  # what Redis acknowledged survives a SIGKILL
    r.start()
    yield r
    r.stop()


def _stream_record_ids(port: int) -> list[str]:
    c = redis.Redis(port=port)
    try:
        ids = []
        for _id, fields in c.xrange("rightsizer:records", "-", "+"):
            ids += [str(rec["request_id"]) for rec in orjson.loads(fields[b"rs"])]
        return ids
    finally:
        c.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["kill", "sigstop"])
def test_redis_outage_under_load(tmp_path: Path, redis_server: RedisServer, fault: str) -> None:
    """Item 11: requests never fail because of Redis, and the records stream keeps every
    record of the outage (a bounded outbox, resent after recovery); any record finally
    dropped is counted in rightsizer_records_dropped_total{sink="redis_stream"}."""
    emu = start_emulator("emu", ttft=0.005, itl=0.002)
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    p = _proxy([emu.url], tmp_path, config={"shared": {"sync_interval_s": 0.05, "op_timeout_s": 0.25},
                                            "health": {}},  # the default health checks
               extra=["--redis-url", url])  # fmt: skip
    try:
        watch = LogWatch(p.log_path)
        watch.mark()
        rss0 = rss_bytes(p.proc.pid)
        port = port_of(p)
        cases = [(_stream_case if i % 2 else lambda rid, **kw: _plain_case(rid, {200}, **kw))(
            f"redis-{fault}-{i}", max_tokens=4) for i in range(420)]  # fmt: skip

        async def paced() -> list[Result]:
            tasks = []
            t0 = time.monotonic()
            for i, c in enumerate(cases):  # 60 requests/s for 7 s
                await asyncio.sleep(max(0.0, t0 + i / 60 - time.monotonic()))
                if i == 120:  # t = 2 s
                    redis_server.signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
                if i == 240:  # t = 4 s
                    if fault == "kill":
                        await asyncio.to_thread(redis_server.start)
                    else:
                        redis_server.signal(signal.SIGCONT)
                tasks.append(asyncio.ensure_future(_run(port, [c])))
            return [r for rs in await asyncio.gather(*tasks) for r in rs]

        results = asyncio.run(paced())
        tally = Tally(
            f"Redis {'SIGKILL + restart' if fault == 'kill' else 'SIGSTOP + SIGCONT'} 2 s under load"
        )
        _judge_all(p, results, tally)
        sent = {r.case.rid for r in results}

        def settled() -> bool:
            text = p.metrics_text()
            return metric_value(text, "rightsizer_shared_state_up") == 1 and sent <= set(
                _stream_record_ids(redis_server.port)
            )

        with contextlib.suppress(TimeoutError):
            wait_for(settled, timeout_s=8, interval_s=0.3)
        in_stream = _stream_record_ids(redis_server.port)
        missing = sent - set(in_stream)
        dups = len(in_stream) - len(set(in_stream))
        dropped = metric_value(
            p.metrics_text(), "rightsizer_records_dropped_total", sink="redis_stream"
        )
        grown = rss_bytes(p.proc.pid) - rss0
        tally.extra = (f"; records stream: {len(missing)} of {len(sent)} missing, {int(dropped)} counted "
                       f"as dropped, {dups} duplicates; RSS +{grown >> 20} MB")  # fmt: skip
        for problem in watch.problems()[:5]:
            tally.flag(problem)
        SUMMARY_LINES.append(tally.line())
        print(tally.line())
        assert tally.clean, tally.line() + "\n" + "\n".join(tally.why + tally.faults)
        assert len(missing) == dropped, (
            f"{len(missing)} records lost from the stream, {int(dropped)} counted"
        )
        assert not missing, f"{len(missing)} of {len(sent)} records never reached the stream"
        assert grown <= RSS_GROWTH_MAX
    finally:
        stop_quietly(p, emu)


# --- SIGTERM to the proxy with streams in flight ---


def _sigterm_proxy(tmp: Path, emu: Proc, grace_s: float) -> Proc:
    return _proxy([emu.url], tmp, env={"RIGHTSIZER_SERVER__SHUTDOWN_GRACE_S": str(grace_s)})


def _exit_time(p: Proc, t_term: float, limit_s: float) -> float | None:
    try:
        p.proc.wait(timeout=max(0.1, t_term + limit_s - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic() - t_term


@pytest.mark.timeout(90)
def test_sigterm_inside_grace_lets_streams_finish(tmp_path: Path) -> None:
    """Item 7: streams that end within server.shutdown_grace_s (6 s) all complete with
    [DONE] and ok records; the proxy exits once they are done, inside the grace."""
    emu = start_emulator("emu", ttft=0.02, itl=0.02)
    p = _sigterm_proxy(tmp_path, emu, 6.0)
    try:
        watch = LogWatch(p.log_path)
        watch.mark()
        port = port_of(p)
        cases = [_stream_case(f"term-in-s{i}", max_tokens=75) for i in range(16)]  # ~1.5 s each
        cases += [_plain_case(f"term-in-p{i}", {200}, max_tokens=75) for i in range(4)]

        async def scenario() -> tuple[list[Result], float]:
            running = asyncio.ensure_future(_run(port, cases))
            await asyncio.sleep(0.4)
            os.kill(p.proc.pid, signal.SIGTERM)
            return await running, time.monotonic()

        results, _ = asyncio.run(scenario())
        t_exit = _exit_time(p, time.monotonic(), 8.0)
        tally = Tally("proxy SIGTERM, streams inside the 6 s grace")
        _judge_all(p, results, tally, lambda r: [] if stream_end(r.resp.body)[0] != "error" or r.case.statuses != STREAM
                   else ["a stream inside the grace was cut"])  # fmt: skip
        tally.extra = f"; exited {'never' if t_exit is None else 'after the streams'}"
        for problem in watch.problems()[:5]:
            tally.flag(problem)
        assert t_exit is not None, "the proxy did not exit within the grace after its streams ended"
        tally.check()
    finally:
        stop_quietly(p, emu)


@pytest.mark.timeout(90)
def test_sigterm_past_grace_ends_streams_with_shutdown_event(tmp_path: Path) -> None:
    """Item 7: streams still open when server.shutdown_grace_s (2 s) runs out get a final SSE
    error event saying shutdown, at the deadline (honoured once: not 2x the grace), and a
    record saying so (not client_cancelled)."""
    grace = 2.0
    emu = start_emulator("emu", ttft=0.02, itl=0.02)
    p = _sigterm_proxy(tmp_path, emu, grace)
    try:
        watch = LogWatch(p.log_path)
        watch.mark()
        port = port_of(p)
        cases = [
            _stream_case(f"term-past-s{i}", max_tokens=500, timeout_s=grace + 8) for i in range(16)
        ]
        ends: dict[str, float] = {}

        async def one(c: Case) -> Result:
            r = await exchange(port, c.parts, timeout_s=c.timeout_s)
            ends[c.rid or ""] = time.monotonic()
            return Result(c, r)

        async def scenario() -> tuple[list[Result], float]:
            running = asyncio.ensure_future(asyncio.gather(*(one(c) for c in cases)))
            await asyncio.sleep(0.5)
            t = time.monotonic()
            os.kill(p.proc.pid, signal.SIGTERM)
            return list(await running), t

        results, t_term = asyncio.run(scenario())
        t_exit = _exit_time(p, t_term, grace + 5)
        tally = Tally(f"proxy SIGTERM, streams past the {grace:g} s grace")

        def shutdown_event(r: Result) -> list[str]:
            out = []
            end, err = stream_end(r.resp.body)
            if end != "error" or "shutdown" not in orjson.dumps(err).decode():
                out.append(
                    f"the stream ended with {end} {err}, wanted a final 'shutdown' error event"
                )
            at = ends[r.case.rid or ""] - t_term
            if not grace - 0.5 <= at <= grace + 1.5:
                out.append(f"cut {at:.1f}s after SIGTERM (grace {grace:g}s)")
            for rec in r.records:
                if (
                    rec.get("outcome") in ("ok", "client_cancelled")
                    or "shutdown" not in orjson.dumps(rec).decode()
                ):
                    out.append(f"record outcome {rec.get('outcome')!r} does not say shutdown")
            return out

        # the record's outcome is judged by shutdown_event (its name is the lead's to choose)
        _judge_all(p, results, tally, shutdown_event, ignore=("record outcome",))
        tally.extra = f"; exited {'never' if t_exit is None else f'{t_exit:.1f}s'} after SIGTERM"
        for problem in watch.problems()[:5]:
            tally.flag(problem)
        assert t_exit is not None and t_exit <= grace + 3, (
            f"exit {t_exit} s after SIGTERM, grace {grace} s"
        )
        tally.check()
    finally:
        stop_quietly(p, emu)


@pytest.mark.timeout(60)
def test_sigterm_turns_ready_503_while_draining(tmp_path: Path) -> None:
    """Item 7: at SIGTERM /ready answers 503 (so load balancers drain first) while the
    in-flight stream finishes."""
    emu = start_emulator("emu", ttft=0.02, itl=0.02)
    p = _sigterm_proxy(tmp_path, emu, 5.0)
    try:
        port = port_of(p)

        async def scenario() -> tuple[list[int | str], Result]:
            running = asyncio.ensure_future(_run(port, [_stream_case("ready-s", max_tokens=100)]))
            for _ in range(100):  # the stream is in flight (on a busy host it can take a while)
                await asyncio.sleep(0.05)
                text = await asyncio.to_thread(p.metrics_text)
                if metric_value(text, "rightsizer_backend_inflight_requests") >= 1:
                    break
            os.kill(p.proc.pid, signal.SIGTERM)
            seen: list[int | str] = []
            for _ in range(5):
                await asyncio.sleep(0.1)
                r = await exchange(port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n", timeout_s=2)
                seen.append(r.status if r.status is not None else (r.error or "no answer"))
            return seen, (await running)[0]

        seen, stream = asyncio.run(scenario())
        assert stream.resp.status == 200 and stream_end(stream.resp.body)[0] == "done", (
            stream.resp.body[-200:]
        )
        assert seen and all(s == 503 for s in seen), f"/ready during the drain: {seen}"
    finally:
        stop_quietly(p, emu)


# --- client disconnects ---


def _events(raw: bytes) -> int:
    return raw.count(b"data: ")


@pytest.mark.timeout(90)
def test_client_disconnects_mid_stream(tmp_path: Path) -> None:
    """30 clients close their stream after 1-5 events: each is recorded client_cancelled
    (499), the engine stops generating for them, and nothing is logged as an error."""
    emu = start_emulator("emu", ttft=0.02, itl=0.02)
    p = _proxy([emu.url], tmp_path)
    try:
        watch = LogWatch(p.log_path)
        watch.mark()
        rss0 = rss_bytes(p.proc.pid)
        port = port_of(p)
        rids = [f"disc-{i}" for i in range(30)]

        async def scenario() -> list[tuple[bytes, str]]:
            return list(await asyncio.gather(*(
                read_until(port, corpus.post(corpus.COMPL, corpus.compl_body(max_tokens=300, stream=True), rid),
                           lambda got, k=1 + i % 5: _events(got) >= k, timeout_s=10)
                for i, rid in enumerate(rids))))  # fmt: skip

        got = asyncio.run(scenario())
        tally = Tally("client disconnects mid-stream (30 streams)")
        wait_records(_log(p), rids)
        index = record_index(_log(p))
        for rid, (_raw, why) in zip(rids, got, strict=True):
            problems = []
            if why != "done":
                problems.append(
                    f"hung: the stream did not start ({why})"
                    if why == "timeout"
                    else f"no response ({why})"
                )
            recs = index.get(rid, [])
            if not recs:
                problems.append("no request-log record")
            elif len(recs) > 1 or (recs[0]["outcome"], recs[0]["status"]) != (
                "client_cancelled",
                499,
            ):
                problems.append(
                    f"records {[(r['outcome'], r['status']) for r in recs]}, wanted client_cancelled/499"
                )
            tally.add(rid, problems)
        running = lambda: metric_value(emu.metrics_text(), "vllm:num_requests_running")  # noqa: E731
        try:
            wait_for(lambda: running() == 0, timeout_s=5)
        except TimeoutError:
            tally.flag(f"the engine still runs {running():g} requests of clients that left")
        for problem in watch.problems()[:5]:
            tally.flag(problem)
        grown = rss_bytes(p.proc.pid) - rss0
        tally.extra = f", RSS +{grown >> 20} MB"
        tally.check()
    finally:
        stop_quietly(p, emu)


@pytest.mark.timeout(90)
def test_client_closes_right_after_done_is_a_completed_request(tmp_path: Path) -> None:
    """Item 14: a client that closes as soon as it read ``data: [DONE]`` (the openai SDK's
    sync streams, guidellm, aiohttp clients) completed its request: record ok with its
    tokens, counted in TTFT and the token counters, and no ERROR logged. The engine ends its
    response 0.5 s after [DONE] (``linger``), the window the proxy must not misread."""
    faulty = start_faulty(["faulty"])
    emu = start_emulator("emu", ttft=0.02, itl=0.005)
    p = _proxy([], tmp_path, config={"backends": [
        {"url": faulty.url, "name": "faulty", "dialect": "none"}, {"url": emu.url, "name": "emu"}]})  # fmt: skip
    try:
        watch = LogWatch(p.log_path)
        watch.mark()
        port = port_of(p)
        ttft0 = metric_value(p.metrics_text(), "rightsizer_time_to_first_token_seconds_count")
        reqs = [(f"done-linger-{i}", corpus.compl_body("faulty", fault="linger", stream=True, max_tokens=5))
                for i in range(20)]  # fmt: skip
        reqs += [
            (f"done-emu-{i}", corpus.compl_body("emu", stream=True, max_tokens=5))
            for i in range(20)
        ]

        async def scenario() -> list[tuple[bytes, str]]:
            return list(await asyncio.gather(*(
                read_until(port, corpus.post(corpus.COMPL, body, rid), lambda got: b"data: [DONE]" in got, timeout_s=10)
                for rid, body in reqs)))  # fmt: skip

        got = asyncio.run(scenario())
        tally = Tally("client closes right after [DONE] (40 streams)")
        wait_records(_log(p), [rid for rid, _ in reqs])
        index = record_index(_log(p))
        for (rid, _), (_raw, why) in zip(reqs, got, strict=True):
            problems = [] if why == "done" else [f"no response ({why})"]
            recs = index.get(rid, [])
            if not recs:
                problems.append("no request-log record")
            elif len(recs) > 1 or (
                recs[0]["outcome"],
                recs[0]["status"],
                recs[0]["completion_tokens"],
            ) != ("ok", 200, 5):
                r0 = recs[0]
                problems.append(
                    f"record {r0['outcome']}/{r0['status']}/{r0['completion_tokens']} tokens, wanted ok/200/5"
                )
            tally.add(rid, problems)
        ttft = (
            metric_value(p.metrics_text(), "rightsizer_time_to_first_token_seconds_count") - ttft0
        )
        if ttft != len(reqs):
            tally.flag(f"the TTFT histogram counted {ttft:g} of {len(reqs)} completed streams")
        for problem in watch.problems()[:5]:
            tally.flag(problem)
        tally.check()
    finally:
        stop_quietly(p, emu, faulty)
