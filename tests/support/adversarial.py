"""What the adversarial tests share: the fault-injecting backend as a process, the fake secrets,
the judge that checks one exchange against what issue 10 demands, and the process-level
probes (the proxy's log, RSS, ``/metrics`` series) with their bounds.

The judge's rules, for every request the proxy answered:

- a status, within the case's bound of time (else *hung*); never 500 for client input;
- 4xx/5xx: the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}`` unless
  the record shows the request went upstream (a backend's own error body is passed through
  unchanged, as the README promises and as nginx and Envoy do);
- 200 ``text/event-stream``: a complete stream whose last event is ``data: [DONE]`` or a final
  ``data: {"error": ...}`` event;
- a JSON body that parses once its ``Content-Encoding`` is removed;
- no fake secret (``sk-adversarial-SECRET-...``) in the response headers or body;
- ``x-request-id`` echoed;
- exactly one request-log record per request that reached a ``/v1`` handler, with the
  response's status and the outcome that status means (at most one for the rest).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.support.procs import Proc, free_port, http_get, read_records
from tests.support.rawhttp import Part, RawResponse, sse_events

FAULTY = Path(__file__).with_name("faulty_backend.py")
SECRET_MARK = "sk-adversarial-SECRET"
CLIENT_KEY = f"{SECRET_MARK}-client-0c1d2e3f"
TENANT_KEY = f"{SECRET_MARK}-tenant-a-7a8b9c"
BACKEND_KEY = f"{SECRET_MARK}-backend-4d5e6f"
ADMIN_TOKEN = f"{SECRET_MARK}-admin-1a2b3c"
USER_SENTINEL = "advx-user-SENTINEL"  # the body's `user`: never a raw label or log field
MODEL_SENTINEL = "advx-model-"  # unknown model names: never a label or estimator state
PRIVATE_MARKERS = ("FAULTY-BACKEND-PRIVATE", "vllm:num_requests", "# TYPE vllm")
LOG_FORBIDDEN = ("Traceback", " ERROR ", "SECRET", USER_SENTINEL)
SUMMARY_LINES: list[str] = []  # the fault tests' one-line results, printed at the end


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- processes ---


def start_faulty(models: Sequence[str] = ("faulty",), *, journal: Path | None = None) -> Proc:
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="rightsizer-faulty-", suffix=".log")[1])
    args = [sys.executable, str(FAULTY), "--port", str(port), "--models", ",".join(models)]
    if journal is not None:
        args += ["--journal", str(journal)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    p = Proc(f"faulty-{port}", f"http://127.0.0.1:{port}", proc, log_path)
    p.extra["journal"] = journal
    p.wait_ready("/health")
    return p


def serve_raw(
    host: str, backend: str, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """``rightsizer serve`` on ``host`` without waiting for it (it may refuse to start)."""
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix=f"rightsizer-serve-{port}-", suffix=".log")[1])
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RIGHTSIZER_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--host", host, "--port", str(port),
             "--backend", backend, "--no-estimator"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**clean, **env},
        )  # fmt: skip
    return proc, port, log_path


def end_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s, by pid."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def port_of(p: Proc) -> int:
    return int(p.url.rsplit(":", 1)[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def alive(p: Proc) -> bool:
    try:
        return p.proc.poll() is None and http_get(p.url + "/health", timeout=5.0)[0] == 200
    except OSError:
        return False


def stop_quietly(*procs: Proc) -> None:
    for p in procs:
        if p.proc.poll() is None:
            try:
                os.kill(p.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                continue
        p.stop()


# --- the proxy's own log ---


class LogWatch:
    """Reads what a process logged since the last mark."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def new_text(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read().decode("utf-8", "replace")

    def problems(self) -> list[str]:
        """Lines of the log since the mark that break issue 10's rules (tracebacks, ERROR
        lines, fake secrets, raw `user` values)."""
        bad = []
        for line in self.new_text().splitlines():
            hit = [w for w in LOG_FORBIDDEN if w in line]
            if hit:
                bad.append(f"log line has {hit}: {line[:300]}")
        return bad


# --- /metrics ---


@dataclass
class MetricsShape:
    series: int
    size_bytes: int
    longest_label: int
    text: str


_LABEL_VALUE = re.compile(r'="((?:[^"\\]|\\.)*)"')


def metrics_shape(p: Proc) -> MetricsShape:
    status, body = http_get(p.url + "/metrics", timeout=30.0)
    assert status == 200, status
    text = body.decode("utf-8", "replace")
    samples = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    longest = max((len(m) for ln in samples for m in _LABEL_VALUE.findall(ln)), default=0)
    return MetricsShape(len(samples), len(body), longest, text)


# --- cases and the judge ---


@dataclass
class Case:
    """One adversarial input. ``statuses``: the statuses that are right (None: any 2xx-4xx,
    as for client input). ``record``: ``required`` (exactly one), ``optional`` (at most one,
    truthful if present). ``check``: extra rules, returning problems."""

    name: str
    group: str
    parts: bytes | Sequence[Part]
    rid: str | None = None
    statuses: frozenset[int] | None = None
    record: str = "required"
    head_only: bool = False
    timeout_s: float = 10.0
    no_response_ok: bool = False  # the client itself gives up (partial request, then close)
    read: bool = True  # False: the client closes right after sending
    outcomes: frozenset[str] | None = None  # overrides the outcome the status implies
    check: Callable[[Case, RawResponse, list[dict[str, Any]]], list[str]] | None = None


@dataclass
class Result:
    case: Case
    resp: RawResponse
    records: list[dict[str, Any]] = field(default_factory=list)


def error_shape_problem(obj: Any) -> str | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("error"), dict):
        return "not an OpenAI error object"
    err = obj["error"]
    missing = [k for k in ("message", "type", "param", "code") if k not in err]
    if missing:
        return f"error object lacks {missing}"
    if not isinstance(err["message"], str) or not isinstance(err["type"], str):
        return "error.message/error.type are not strings"
    return None


def stream_end(body: bytes) -> tuple[str, dict[str, Any] | None]:
    """('done' | 'error' | 'cut', the final error object)."""
    events = sse_events(body)
    if not events:
        return "cut", None
    last = events[-1].strip()
    data = b"\n".join(ln[5:].strip() for ln in last.split(b"\n") if ln.startswith(b"data:"))
    if data == b"[DONE]":
        return "done", None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "cut", None
    if isinstance(obj, dict) and "error" in obj:
        return "error", obj
    return "cut", None


def implied_outcomes(resp: RawResponse) -> frozenset[str]:
    st = resp.status
    shed = resp.header("x-rightsizer-shed-reason") is not None
    if st is None:
        return frozenset({"client_cancelled"})
    if 200 <= st < 400:
        ctype = resp.header("content-type") or ""
        if ctype.startswith("text/event-stream"):
            end, err = stream_end(resp.decoded_body())
            if end == "error":
                kind = str((err or {}).get("error", {}).get("type", ""))
                if "timeout" in kind:
                    return frozenset({"timeout"})
                return frozenset({"upstream_error", "timeout", "shutdown"})
        return frozenset({"ok"})
    if st == 429:
        return frozenset({"shed"}) if shed else frozenset({"client_error", "shed"})
    if st == 503:
        return frozenset({"shed"}) if shed else frozenset({"upstream_error"})
    if st == 504:
        return frozenset({"timeout"})
    if st >= 500:
        return frozenset({"upstream_error"})
    if st == 499:
        return frozenset({"client_cancelled"})
    return frozenset({"client_error"})


def _secret_problems(resp: RawResponse) -> list[str]:
    out = []
    head = " ".join(f"{k}: {v}" for k, v in resp.headers)
    for where, blob in (("headers", head.encode()), ("body", resp.body),
                        ("decoded body", resp.decoded_body())):  # fmt: skip
        if SECRET_MARK.encode() in blob:
            out.append(f"a fake secret is echoed in the response {where}")
    return out


UNPARSED = frozenset({"malformed_request", "header_too_large", "too_many_headers"})
"""Error codes of requests refused before their headers were parsed: there is no client
x-request-id to echo, so the proxy's own id is right (Envoy does the same)."""


def _error_code(body: bytes) -> object:
    try:
        err = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return err.get("code") if isinstance(err, dict) else None


def judge(res: Result) -> list[str]:
    """Everything wrong with one exchange (empty: fine)."""
    case, resp, recs = res.case, res.resp, res.records
    problems: list[str] = []
    if resp.timed_out:
        problems.append(f"hung: no complete response within {case.timeout_s:g}s")
    elif resp.status is None and not case.no_response_ok:
        problems.append(f"no response (connection {resp.error or 'closed'})")
    st = resp.status
    if st is not None:
        problems += _status_problems(case, resp, recs)
    problems += _secret_problems(resp)
    problems += _record_problems(case, resp, recs)
    if case.check is not None and not resp.timed_out:
        problems += case.check(case, resp, recs)
    return problems


def _status_problems(case: Case, resp: RawResponse, recs: list[dict[str, Any]]) -> list[str]:
    st = resp.status
    assert st is not None
    out: list[str] = []
    body = resp.decoded_body()
    ctype = (resp.header("content-type") or "").lower()
    # the backend's own answer, relayed unchanged: the record says it went upstream (a 5xx:
    # and that the backend failed). The emulator itself answers 500 to some garbage.
    upstream = any(r.get("backend") for r in recs)
    backend_failed = any(r.get("backend") and r.get("outcome") == "upstream_error" for r in recs)
    if case.statuses is not None:
        if st not in case.statuses:
            out.append(f"status {st}, wanted one of {sorted(case.statuses)}")
    elif st >= 500 and not backend_failed:
        out.append(f"status {st} for client input (wanted a 2xx/4xx)")
    if st >= 400 and not case.head_only:
        try:
            problem = error_shape_problem(orjson.loads(body))
        except orjson.JSONDecodeError:
            problem = f"body is not JSON ({ctype or 'no content-type'}): {body[:80]!r}"
        if problem and not upstream:
            out.append(f"{st} error body: {problem}")
    # the README: every response carries x-request-id; checked on errors and on what reached
    # a /v1 handler (not on local 2xx answers such as /health)
    due = st >= 400 or bool(recs) or case.record == "required"
    if resp.header("x-request-id") is None and due:
        out.append("no x-request-id in the response")
    elif (
        case.rid is not None
        and resp.header("x-request-id") not in (case.rid, None)
        and _error_code(body) not in UNPARSED
    ):
        out.append(f"x-request-id {resp.header('x-request-id')!r} is not the one sent")
    if st == 200 and ctype.startswith("text/event-stream") and not case.head_only:
        end, err = stream_end(body)
        if end == "cut" or not resp.complete:
            out.append(f"stream ends without [DONE] or an error event: ...{body[-120:]!r}")
        elif end == "error" and error_shape_problem(err):
            out.append(f"final SSE error event: {error_shape_problem(err)}")
    elif st < 300 and "json" in ctype and not case.head_only and resp.complete:
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            enc = resp.header("content-encoding")
            out.append(f"JSON body does not parse (content-encoding {enc!r}): {body[:40]!r}")
    return out


def _record_problems(case: Case, resp: RawResponse, recs: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    if case.record == "required" and not recs and not resp.timed_out:
        out.append("no request-log record for this request")
    if len(recs) > 1:
        out.append(f"{len(recs)} records for one request")
    if not recs or resp.timed_out:
        return out
    rec = recs[-1]
    want_status = resp.status if resp.status is not None else 499
    if rec.get("status") != want_status:
        out.append(f"record status {rec.get('status')!r}, the client got {want_status}")
    wanted = case.outcomes or implied_outcomes(resp)
    if rec.get("outcome") not in wanted:
        out.append(f"record outcome {rec.get('outcome')!r}, wanted {sorted(wanted)}")
    return out


def record_index(path: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in read_records(path):
        out.setdefault(str(r.get("request_id")), []).append(r)
    return out


def wait_records(path: Path, ids: Iterable[str], timeout_s: float = 10.0) -> None:
    """Until every id has a record (or the timeout), then until the log has not grown for
    half a second (late records, duplicates)."""
    want = set(ids)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if want <= record_index(path).keys():
            break
        time.sleep(0.1)
    size, still = -1, 0
    while still < 5 and time.monotonic() < deadline + 5:
        now = path.stat().st_size if path.exists() else 0
        still = still + 1 if now == size else 0
        size = now
        time.sleep(0.1)


def summarize(results: Sequence[tuple[Result, list[str]]], limit: int = 60) -> str:
    bad = [(r, p) for r, p in results if p]
    lines = [f"{len(bad)} of {len(results)} cases broke the rules:"]
    for r, probs in bad[:limit]:
        rid = r.case.rid or r.resp.header("x-request-id")
        st = r.resp.status
        lines.append(
            f"  [{r.case.group}] {r.case.name} (id {rid}, status {st}): {'; '.join(probs)}"
        )
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


def loopback_socket_count(pid: int) -> int:
    """Open sockets of a process (for the connection-cap checks)."""
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith("socket:"):
                n += 1
        except OSError:
            continue
    return n
