"""Issue 10's items that the default configuration must get right, one test per item, against
ONE real proxy in front of the fault-injecting backend, which journals every request it
receives and echoes what arrived (method, path, headers; credentials as SHA-256 digests).

The backend process is configured twice: ``keyed`` (models ``keyed``, with
``backends[].api_key``) and ``open`` (models ``open``, no key), so credential forwarding is
checked both ways. No test here needs a config key that does not exist yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support import adversarial_corpus as corpus
from tests.support.adversarial import (
    ADMIN_TOKEN,
    BACKEND_KEY,
    CLIENT_KEY,
    USER_SENTINEL,
    LogWatch,
    end_process,
    port_of,
    record_index,
    rss_bytes,
    serve_raw,
    sha256,
    start_faulty,
    stop_quietly,
    wait_records,
)
from tests.support.faulty_backend import escapes_v1
from tests.support.procs import Proc, http_get, read_records, start_proxy
from tests.support.rawhttp import RawResponse, exchange, request_bytes

pytestmark = [pytest.mark.integration, pytest.mark.adversarial]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("defaults")
    journal = tmp / "journal.jsonl"
    faulty = start_faulty(["keyed", "open"], journal=journal)
    log = tmp / "requests.jsonl"
    config = {
        "backends": [
            {"url": faulty.url, "name": "keyed", "models": ["keyed"], "api_key": BACKEND_KEY,
             "dialect": "none"},
            {"url": faulty.url, "name": "open", "models": ["open"], "dialect": "none"},
        ],
        "health": {"unhealthy_after": 1_000_000},
    }  # fmt: skip
    proxy = start_proxy([], config=config, request_log=log,
                        env={"RIGHTSIZER_SERVER__ADMIN_TOKEN": ADMIN_TOKEN})  # fmt: skip
    try:
        yield {"proxy": proxy, "faulty": faulty, "journal": journal, "log": log}
    finally:
        stop_quietly(proxy, faulty)


def _send(stack: dict[str, Any], raw: bytes, timeout_s: float = 10.0) -> RawResponse:
    return asyncio.run(exchange(port_of(stack["proxy"]), raw, timeout_s=timeout_s))


def _echo(
    stack: dict[str, Any], model: str, headers: list[tuple[str, str]], rid: str
) -> dict[str, Any]:
    body = {"model": model, "prompt": "x", "max_tokens": 1, "fault": "echo"}
    resp = _send(stack, corpus.post(corpus.COMPL, body, rid, headers))  # type: ignore[arg-type]
    assert resp.status == 200, (resp.status, resp.body[:300])
    echo = orjson.loads(resp.decoded_body())
    assert echo.get("object") == "echo", echo
    return echo  # type: ignore[no-any-return]


def _journal(stack: dict[str, Any], rid: str) -> list[dict[str, Any]]:
    path: Path = stack["journal"]
    out = []
    for line in path.read_bytes().splitlines():
        entry = orjson.loads(line)
        if rid in entry["headers"].get("x-request-id", []):
            out.append(entry)
    return out


@pytest.mark.timeout(120)
def test_session_ids_are_not_kept_per_value(stack: dict[str, Any]) -> None:
    """Item 8: 2,000 requests with distinct 15 kB x-session-id values under the default
    routing policy (prefix, not session): RSS grows at most 15 MB (4,000 kept 58 MB)."""
    proxy: Proc = stack["proxy"]
    port = port_of(proxy)
    body = orjson.dumps({"model": "open", "prompt": "x", "max_tokens": 1})

    def raws(tag: str, n: int) -> list[bytes]:
        return [request_bytes("POST", corpus.COMPL, body=body, headers=[
            ("Content-Type", "application/json"), ("x-session-id", f"{tag}{i:06d}" + "s" * 15_000)])
            for i in range(n)]  # fmt: skip

    asyncio.run(_blast(port, raws("warm", 200)))  # buffers and pools at their working size
    rss0 = rss_bytes(proxy.proc.pid)
    statuses = asyncio.run(_blast(port, raws("run", 2000)))
    grown = rss_bytes(proxy.proc.pid) - rss0
    assert statuses.count(200) == 2000, sorted(set(statuses), key=str)
    assert grown <= 15 << 20, f"RSS grew {grown >> 20} MB holding 2,000 x 15 kB session ids"


async def _blast(port: int, raws: list[bytes]) -> list[int | None]:
    sem = asyncio.Semaphore(12)

    async def one(raw: bytes) -> int | None:
        async with sem:
            return (await exchange(port, raw, timeout_s=10)).status

    return list(await asyncio.gather(*(one(r) for r in raws)))


END_TO_END = [
    ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ("tracestate", "congo=t61rcWkgMzE"),
    ("OpenAI-Beta", "assistants=v2"),
    ("User-Agent", "adversarial-tests/1.0"),
    ("X-Custom-Thing", "kept as is"),
    ("Accept-Language", "de-CH"),
    ("OpenAI-Organization", "org-adversarial"),
]


@pytest.mark.timeout(30)
def test_end_to_end_headers_are_forwarded(stack: dict[str, Any]) -> None:
    """Item 15: tracing, OpenAI-Beta, User-Agent and custom headers reach the engine as sent."""
    echo = _echo(stack, "open", END_TO_END, "def-e2e-1")
    got = echo["headers"]
    missing = [(k, v) for k, v in END_TO_END if got.get(k.lower()) != [v]]
    assert not missing, f"not forwarded as sent: {missing}; the engine saw {sorted(got)}"


HOP_BY_HOP = [
    ("Connection", "keep-alive, X-Hop-Listed"),
    ("X-Hop-Listed", "listed in Connection: hop-by-hop"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Authorization", "Basic c2VjcmV0"),
    ("Proxy-Connection", "keep-alive"),
    ("Upgrade", "h2c"),
    ("X-Rightsizer-Debug", "proxy's own control header"),
]


@pytest.mark.timeout(30)
def test_hop_by_hop_and_proxy_headers_are_not_forwarded(stack: dict[str, Any]) -> None:
    """Item 15: hop-by-hop headers (RFC 9110 7.6.1, and those named in Connection) and the
    proxy's own x-rightsizer-* controls stop at the proxy, as nginx and Envoy do; Host is
    the backend's (nginx's proxy_set_header Host $proxy_host default)."""
    echo = _echo(stack, "open", HOP_BY_HOP, "def-hop-1")
    got = echo["headers"]
    leaked = [k for k, _ in HOP_BY_HOP if k.lower() in got and k.lower() != "connection"]
    leaked += ["connection"] if "x-hop-listed" in got.get("connection", [""])[0].lower() else []
    assert not leaked, f"forwarded although hop-by-hop or the proxy's own: {leaked}"
    faulty: Proc = stack["faulty"]
    assert got.get("host") == [faulty.url.split("//", 1)[1]], got.get("host")


@pytest.mark.timeout(30)
def test_client_key_is_not_forwarded_by_default(stack: dict[str, Any]) -> None:
    """Item 12: without backends[].api_key the client's own key stays at the proxy unless
    the operator sets forward_client_auth."""
    echo = _echo(stack, "open", [("Authorization", f"Bearer {CLIENT_KEY}")], "def-auth-open")
    auth = echo["headers"].get("authorization", [])
    assert sha256(f"Bearer {CLIENT_KEY}") not in auth, "the client's API key reached the backend"


@pytest.mark.timeout(30)
def test_backend_key_replaces_the_client_key(stack: dict[str, Any]) -> None:
    """Item 12: with backends[].api_key the backend sees exactly one Authorization: its own
    (today both the client's and the backend's are sent)."""
    echo = _echo(stack, "keyed", [("Authorization", f"Bearer {CLIENT_KEY}")], "def-auth-keyed")
    auth = echo["headers"].get("authorization", [])
    assert auth == [sha256(f"Bearer {BACKEND_KEY}")], (
        f"{len(auth)} Authorization header(s) upstream; the client's is among them: "
        f"{sha256(f'Bearer {CLIENT_KEY}') in auth}"
    )


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", ["GET", "DELETE", "PUT", "PATCH", "POST"])
def test_client_method_path_and_query_are_kept(stack: dict[str, Any], method: str) -> None:
    """Item 2: a GET /v1/files arrives as GET (today as POST), with its query string."""
    rid = f"def-method-{method}"
    body = orjson.dumps({"purpose": "x"}) if method in ("PUT", "PATCH", "POST") else None
    raw = request_bytes(method, "/v1/files/file-abc/content?limit=2&after=x%2Fy",
                        headers=[("x-request-id", rid), ("Content-Type", "application/json")], body=body)  # fmt: skip
    resp = _send(stack, raw)
    assert resp.status == 200, (resp.status, resp.body[:200])
    echo = orjson.loads(resp.decoded_body())
    assert (echo["method"], echo["raw_path"]) == (
        method,
        "/v1/files/file-abc/content?limit=2&after=x%2Fy",
    )
    wait_records(stack["log"], [rid])
    (rec,) = record_index(stack["log"])[rid]
    assert rec["status"] == 200 and rec["outcome"] == "ok", rec


@pytest.mark.timeout(60)
def test_traversal_never_reaches_a_backend(stack: dict[str, Any]) -> None:
    """Item 2: a /v1 path that leaves /v1 once normalised is refused with an OpenAI-style
    400/404 (with or without the backend's key); paths that leave /v1 only for lenient
    servers (TRICKY) may get any answer, but what reaches the backend stays under /v1 even
    read as leniently as any server might."""
    bad = []
    for i, path in enumerate(corpus.TRAVERSALS + corpus.TRICKY):
        clear_cut = path in corpus.TRAVERSALS
        for method in ("GET", "POST"):
            for model in ("keyed", "open"):
                rid = f"def-trav-{i}-{method}-{model}"
                raw = (corpus.post(path, {"model": model, "prompt": "x"}, rid) if method == "POST"
                       else corpus.get(path, rid))  # fmt: skip
                resp = _send(stack, raw)
                refused = resp.status in (400, 404) and b'"error"' in resp.body
                ok_body = refused or not clear_cut  # TRICKY: any status, as long as nothing leaks
                reached = [e["raw_path"] for e in _journal(stack, rid) if escapes_v1(e["raw_path"])]
                if not ok_body or reached:
                    bad.append(f"{method} {path} ({model}): {resp.status}, backend saw {reached}")
                if method == "GET":
                    break  # a GET has no body: the model does not matter
    assert not bad, f"{len(bad)} traversals were not refused:\n" + "\n".join(bad)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("sent", "wanted"), [
    ("critical", "normal"), ("-1", "normal"), ("0", "normal"), ("high", "normal"),
    ("normal", "normal"), ("low", "low"), ("sheddable", "sheddable"),
])  # fmt: skip
def test_anonymous_priority_is_capped_at_normal(
    stack: dict[str, Any], sent: str, wanted: str
) -> None:
    """Item 12: an anonymous client cannot raise itself above auth.anonymous_max_priority
    (default normal); higher asks are clamped (the issue says "capped"), lower ones kept."""
    rid = f"def-prio-{sent}"
    body = {"model": "open", "prompt": "x", "max_tokens": 1}
    resp = _send(stack, corpus.post(corpus.COMPL, body, rid, [("x-priority", sent)]))
    assert resp.status == 200, (resp.status, resp.body[:200])
    wait_records(stack["log"], [rid])
    (rec,) = record_index(stack["log"])[rid]
    assert rec["priority"] == wanted, (
        f"x-priority {sent!r} from an anonymous client ran as {rec['priority']!r}"
    )


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_admin_bearer_scheme_is_case_insensitive(stack: dict[str, Any], scheme: str) -> None:
    """Item 13: RFC 9110 11.1, the auth scheme is case-insensitive."""
    raw = corpus.get(
        "/admin/estimator", f"def-admin-{scheme}", [("Authorization", f"{scheme} {ADMIN_TOKEN}")]
    )
    resp = _send(stack, raw)
    assert resp.status in (200, 503), (resp.status, resp.body[:200])


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "value", [b"Bearer \xff\xfe", b"\xff", b"Bearer " + ADMIN_TOKEN.encode() + b"\xe9"]
)
def test_admin_non_utf8_authorization_is_401(stack: dict[str, Any], value: bytes) -> None:
    """Item 3: a non-UTF-8 Authorization header on /admin/* with a token set gave 500."""
    watch = LogWatch(stack["proxy"].log_path)
    watch.mark()
    resp = _send(
        stack, corpus.get("/admin/estimator", "def-admin-bytes", [("Authorization", value)])
    )
    assert resp.status == 401 and b'"authentication_error"' in resp.body, (
        resp.status,
        resp.body[:200],
    )
    assert not watch.problems(), watch.problems()


@pytest.mark.timeout(30)
def test_user_field_is_not_a_label_or_log_field(stack: dict[str, Any]) -> None:
    """Item 1: the body's `user` must not become a raw metrics label or request-log field
    (hash it or drop it)."""
    user = f"{USER_SENTINEL}-alice@example.com"
    rid = "def-user-1"
    resp = _send(
        stack,
        corpus.post(
            corpus.COMPL, {"model": "open", "prompt": "x", "max_tokens": 1, "user": user}, rid
        ),
    )
    assert resp.status == 200, resp.status
    wait_records(stack["log"], [rid])
    proxy: Proc = stack["proxy"]
    assert user not in proxy.metrics_text(), "the raw `user` is a /metrics label"
    assert user not in stack["log"].read_text(), "the raw `user` is in the request log"
    assert user not in proxy.log_path.read_text(errors="replace"), (
        "the raw `user` is in the proxy log"
    )


# --- start-up: admin exposed (item 13); separate processes ---


@pytest.mark.timeout(60)
def test_refuses_non_loopback_bind_without_admin_token(stack: dict[str, Any]) -> None:
    """Item 13: on a non-loopback address without server.admin_token the proxy refuses to
    start (unless server.allow_open_admin), naming the setting."""
    proc, _, log_path = serve_raw("0.0.0.0", stack["faulty"].url, {})
    try:
        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            rc = None
        out = log_path.read_text(errors="replace")
        assert rc not in (None, 0), "the proxy started on 0.0.0.0 with /admin open to everyone"
        assert "admin_token" in out, out[-500:]
    finally:
        end_process(proc)


@pytest.mark.timeout(60)
def test_non_loopback_bind_with_admin_token_starts(stack: dict[str, Any]) -> None:
    proc, port, log_path = serve_raw(
        "0.0.0.0", stack["faulty"].url, {"RIGHTSIZER_SERVER__ADMIN_TOKEN": ADMIN_TOKEN}
    )
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                if http_get(f"http://127.0.0.1:{port}/health", timeout=1)[0] == 200:
                    break
            time.sleep(0.1)
        assert proc.poll() is None, log_path.read_text(errors="replace")[-500:]
        assert http_get(f"http://127.0.0.1:{port}/admin/estimator")[0] == 401
    finally:
        end_process(proc)


@pytest.mark.timeout(30)
def test_records_are_one_per_request(stack: dict[str, Any]) -> None:
    """Every request of this module that reached a /v1 handler left exactly one record."""
    counts: dict[str, int] = {}
    for r in read_records(stack["log"]):
        counts[str(r["request_id"])] = counts.get(str(r["request_id"]), 0) + 1
    dup = {k: n for k, n in counts.items() if n > 1}
    assert not dup, dup
