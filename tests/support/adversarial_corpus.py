"""The adversarial corpus: hand-written and hypothesis-generated inputs over bodies, headers,
paths, methods, encodings and connection behaviour, each a ``Case`` the judge in
``tests/support/adversarial.py`` checks (see there for the rules every case must meet).

The proxy under test (``tests/adversarial/test_corpus.py``) runs in front of an emulated
engine serving ``emu`` and the fault-injecting backend serving ``faulty``, with tenant keys,
an admin token and short upstream timeouts (``timeouts.read_s`` 2 s, ``total_s`` 5 s).

Generated cases come from hypothesis strategies drawn with ``derandomize=True``, a fixed
number of examples and no shrinking, so the corpus is the same on every run.

Where issue 10 is silent, a case expects what nginx or Envoy do with the same input; the
comment at the case says so.
"""

from __future__ import annotations

import gzip
import json
import posixpath
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import unquote

import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.support.adversarial import (
    ADMIN_TOKEN,
    CLIENT_KEY,
    MODEL_SENTINEL,
    PRIVATE_MARKERS,
    SECRET_MARK,
    TENANT_KEY,
    USER_SENTINEL,
    Case,
)
from tests.support.rawhttp import RawResponse, request_bytes, sse_events

Headers = list[tuple[str | bytes, str | bytes]]
CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
INFERENCE = (CHAT, COMPL)
ANY_OK = None  # client input: any 2xx-4xx
TRAVERSAL_STATUSES = frozenset({400, 404})  # the issue leaves 400 or 404 open
ADMIN_STATUSES = frozenset({200, 401, 503})


class Ids:
    """Unique, valid x-request-id values (the proxy echoes and records them)."""

    def __init__(self, group: str) -> None:
        self.group, self.n = group, 0

    def __call__(self) -> str:
        self.n += 1
        return f"advx-{self.group}-{self.n}"


def chat_body(model: str = "emu", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            **extra}  # fmt: skip


def compl_body(model: str = "emu", **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "hi", "max_tokens": 2, **extra}


def post(
    path: str | bytes,
    body: bytes | dict[str, Any] | None,
    rid: str | None,
    headers: Headers = (),  # type: ignore[assignment]
    *,
    content_type: bool = True,
) -> bytes:
    raw = orjson.dumps(body) if isinstance(body, dict) else body
    hs: Headers = []
    if content_type:
        hs.append(("Content-Type", "application/json"))
    if rid is not None:
        hs.append(("x-request-id", rid))
    hs += list(headers)
    return request_bytes("POST", path, headers=hs, body=raw)


def get(path: str | bytes, rid: str | None, headers: Headers = ()) -> bytes:  # type: ignore[assignment]
    hs: Headers = [("x-request-id", rid)] if rid is not None else []
    return request_bytes("GET", path, headers=hs + list(headers))


# --- path rules ---


def leak_check(case: Case, resp: RawResponse, recs: list[dict[str, Any]]) -> list[str]:
    body = resp.decoded_body()
    return [f"response carries a backend-private marker {m!r}" for m in PRIVATE_MARKERS
            if m.encode() in body]  # fmt: skip


# --- record rules ---


# methods a proxy forwards (nginx answers TRACE with 405 itself; OPTIONS may be answered locally)
_STANDARD_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD")


def needs_record(method: str, path: str | bytes) -> str:
    """A request that reaches a /v1 handler of the proxy gets exactly one record: POST to
    the inference paths, any standard method to another plain /v1 path (forwarded). Others
    (local endpoints, paths outside /v1, wrong methods, rejected paths) at most one."""
    p = path if isinstance(path, str) else path.decode("latin-1")
    p = p.split("?", 1)[0]
    if p in INFERENCE:
        return "required" if method == "POST" else "optional"
    plain = re.fullmatch(r"/v1/[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*", p) is not None
    if plain and p != "/v1/models" and method in _STANDARD_METHODS:
        return "required"
    return "optional"


# --- extra checks ---


def tokens_exact(n: int, finish: str | None = "length") -> Callable[..., list[str]]:
    """The record has the backend's exact token counts (usage read), when the answer was ok."""

    def check(case: Case, resp: RawResponse, recs: list[dict[str, Any]]) -> list[str]:
        if not recs or recs[-1].get("outcome") != "ok":
            return []
        rec, out = recs[-1], []
        if rec.get("completion_tokens") != n or rec.get("tokens_estimated"):
            out.append(
                f"record completion_tokens {rec.get('completion_tokens')!r} "
                f"(estimated: {rec.get('tokens_estimated')}), the backend reported {n}"
            )
        if finish is not None and rec.get("finish_reason") != finish:
            out.append(f"record finish_reason {rec.get('finish_reason')!r}, wanted {finish!r}")
        return out

    return check


def no_usage_leak(case: Case, resp: RawResponse, recs: list[dict[str, Any]]) -> list[str]:
    """The usage chunk the proxy asked for on the client's behalf never reaches it."""
    for ev in sse_events(resp.decoded_body()):
        data = ev.strip()[5:].strip() if ev.strip().startswith(b"data:") else b""
        try:
            obj = json.loads(data) if data and data != b"[DONE]" else None
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("choices") == [] and obj.get("usage"):
            return ["the injected usage chunk leaked to a client that did not ask for it"]
    return []


def done_exactly(case: Case, resp: RawResponse, recs: list[dict[str, Any]]) -> list[str]:
    """A complete stream from the backend reaches the client complete: [DONE], no error."""
    if resp.status == 200 and not resp.decoded_body().rstrip().endswith(b"[DONE]"):
        return ["a complete backend stream did not end with [DONE] at the client"]
    return []


def both(*checks: Callable[..., list[str]]) -> Callable[..., list[str]]:
    def check(case: Case, resp: RawResponse, recs: list[dict[str, Any]]) -> list[str]:
        return [p for c in checks for p in c(case, resp, recs)]

    return check


def within(seconds: float) -> Callable[..., list[str]]:
    def check(case: Case, resp: RawResponse, recs: list[dict[str, Any]]) -> list[str]:
        if resp.elapsed_s > seconds:
            return [f"took {resp.elapsed_s:.1f}s, wanted at most {seconds:g}s"]
        return []

    return check


def body_below(limit: int) -> Callable[..., list[str]]:
    def check(case: Case, resp: RawResponse, recs: list[dict[str, Any]]) -> list[str]:
        if len(resp.body) >= limit:
            return [f"the client received {len(resp.body) >> 20} MiB of one unterminated "
                    f"event (wanted the stream cut with an error event below {limit >> 20} MiB)"]  # fmt: skip
        return []

    return check


# --- hand-written: bodies ---

_CHAT_BODIES: list[tuple[str, bytes]] = [
    ("baseline", orjson.dumps(chat_body())),
    ("baseline-stream", orjson.dumps(chat_body(stream=True))),
    ("empty", b""),
    ("space", b" "),
    ("open-brace", b"{"),
    ("empty-object", b"{}"),
    ("array", b"[]"),
    ("null", b"null"),
    ("number", b"1"),
    ("string", b'"x"'),
    ("trailing-comma", b'{"model":"emu",}'),
    ("nan", b'{"model":"emu","messages":[{"role":"user","content":"x"}],"temperature":NaN}'),
    (
        "infinity",
        b'{"model":"emu","messages":[{"role":"user","content":"x"}],"temperature":Infinity}',
    ),
    ("1e400", b'{"model":"emu","messages":[{"role":"user","content":"x"}],"max_tokens":1e400}'),
    (
        "int-2^64",
        b'{"model":"emu","messages":[{"role":"user","content":"x"}],"max_tokens":18446744073709551616}',
    ),
    (
        "int-2^70",
        b'{"model":"emu","messages":[{"role":"user","content":"x"}],"seed":1180591620717411303424}',
    ),
    (
        "dup-model",
        b'{"model":"emu","model":"advx-model-dup","messages":[{"role":"user","content":"x"}],"max_tokens":2}',
    ),
    ("bom", b"\xef\xbb\xbf" + orjson.dumps(chat_body())),
    ("utf16", "\ufeff".encode("utf-16-le") + json.dumps(chat_body()).encode("utf-16-le")),
    ("trailing-garbage", orjson.dumps(chat_body()) + b"}}garbage"),
    ("trailing-newline", orjson.dumps(chat_body()) + b"\n\n"),
    (
        "latin1-in-string",
        b'{"model":"emu","messages":[{"role":"user","content":"caf\xe9"}],"max_tokens":2}',
    ),
    (
        "lone-surrogate",
        b'{"model":"emu","messages":[{"role":"user","content":"\\ud800"}],"max_tokens":2}',
    ),
    (
        "nul-escape",
        b'{"model":"emu","messages":[{"role":"user","content":"a\\u0000b"}],"max_tokens":2}',
    ),
    (
        "raw-control-char",
        b'{"model":"emu","messages":[{"role":"user","content":"a\x01b"}],"max_tokens":2}',
    ),
    ("raw-nul", b'{"model":"emu","messages":[{"role":"user","content":"a\x00b"}],"max_tokens":2}'),
    ("deep-arrays", b"[" * 100_000 + b"]" * 100_000),
    ("deep-objects", b'{"a":' * 5000 + b"1" + b"}" * 5000),
    (
        "deep-content",
        b'{"model":"emu","messages":[{"role":"user","content":'
        + b"[" * 3000
        + b"]" * 3000
        + b"}]}",
    ),
    (
        "big-valid-prompt",
        orjson.dumps(chat_body(messages=[{"role": "user", "content": "word " * 200_000}])),
    ),
    (
        "over-max-body",
        orjson.dumps(chat_body(messages=[{"role": "user", "content": "x" * 5_000_000}])),
    ),
    (
        "many-messages",
        orjson.dumps(chat_body(messages=[{"role": "user", "content": "x"}] * 20_000)),
    ),
]

_PART_VALUES: list[tuple[str, Any]] = [
    ("null", None), ("int", 1), ("float", 1.5), ("true", True), ("false", False),
    ("list", []), ("dict", {}), ("list-of-str", ["a"]), ("huge-int", 2**63 - 1),
]  # fmt: skip

_MESSAGES: list[tuple[str, Any]] = [
    ("empty-list", []), ("null", None), ("object", {}), ("string", "hi"), ("int", 3),
    ("list-null", [None]), ("list-int", [1]), ("list-list", [[]]), ("list-empty-obj", [{}]),
    ("role-int", [{"role": 1, "content": "x"}]), ("role-null", [{"role": None, "content": "x"}]),
    ("role-list", [{"role": ["user"], "content": "x"}]), ("no-content", [{"role": "user"}]),
    ("content-int", [{"role": "user", "content": 1}]), ("content-true", [{"role": "user", "content": True}]),
    ("content-obj", [{"role": "user", "content": {"text": "x"}}]),
    ("content-nested-list", [{"role": "user", "content": [[{"type": "text", "text": "x"}]]}]),
    ("parts-empty", [{"role": "user", "content": []}]),
    ("part-string", [{"role": "user", "content": ["x"]}]),
    ("part-null", [{"role": "user", "content": [None]}]),
    ("part-no-text", [{"role": "user", "content": [{"type": "text"}]}]),
    ("part-image", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]),
    ("tool-calls-junk", [{"role": "assistant", "content": None, "tool_calls": "x"}, {"role": "user", "content": "x"}]),
    ("role-unknown", [{"role": "wizard", "content": "x"}]),
    ("role-empty", [{"role": "", "content": "x"}]),
]  # fmt: skip

_MODELS: list[tuple[str, Any]] = [
    ("empty", ""), ("null", None), ("int", 1), ("list", []), ("dict", {}), ("true", True),
    ("trailing-space", "emu "), ("upper", "EMU"), ("nul", "emu\x00"),
    ("rtl-override", MODEL_SENTINEL + "\u202eume"),
    ("label-breakers", MODEL_SENTINEL + 'a"b\nc\\d{e}f,g=h'),
    ("newlines", MODEL_SENTINEL + "x\n# TYPE evil counter\nevil 1"),
    ("long-1k", MODEL_SENTINEL + "m" * 1000),
    ("long-100k-a", MODEL_SENTINEL + "a" * 100_000),
    ("long-100k-b", MODEL_SENTINEL + "b" * 100_000),
    ("long-100k-c", MODEL_SENTINEL + "c" * 100_000),
    ("emoji", MODEL_SENTINEL + "\U0001f600" * 50),
    ("path-like", "../../admin/estimator"),
]  # fmt: skip

_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("stream-str", {"stream": "true"}), ("stream-1", {"stream": 1}), ("stream-0", {"stream": 0}),
    ("stream-null", {"stream": None}), ("stream-obj", {"stream": {}}), ("stream-list", {"stream": []}),
    ("so-list", {"stream": True, "stream_options": []}), ("so-str", {"stream": True, "stream_options": "x"}),
    ("so-int", {"stream": True, "stream_options": 1}),
    ("so-usage-str", {"stream": True, "stream_options": {"include_usage": "yes"}}),
    ("so-usage-null", {"stream": True, "stream_options": {"include_usage": None}}),
    ("so-usage-true", {"stream": True, "stream_options": {"include_usage": True}}),
    ("so-no-stream", {"stream_options": {"include_usage": True}}),
    ("mt-neg", {"max_tokens": -1}), ("mt-zero", {"max_tokens": 0}), ("mt-float", {"max_tokens": 1.5}),
    ("mt-str", {"max_tokens": "4"}), ("mt-true", {"max_tokens": True}), ("mt-null", {"max_tokens": None}),
    ("mt-2^31", {"max_tokens": 2**31}), ("mt-2^63", {"max_tokens": 2**63 - 1}),
    ("mct-neg", {"max_completion_tokens": -5}), ("mct-str", {"max_completion_tokens": "x"}),
    ("mct-and-mt", {"max_completion_tokens": 1, "max_tokens": 3}),
    ("n-zero", {"n": 0}), ("n-neg", {"n": -1}), ("n-str", {"n": "2"}), ("n-float", {"n": 1.0}),
    ("n-huge", {"n": 2**40}), ("n-two", {"n": 2}),
    ("user-int", {"user": 1}), ("user-obj", {"user": {}}), ("user-empty", {"user": ""}),
    ("user-sentinel", {"user": USER_SENTINEL + "-plain"}),
    ("user-sentinel-long", {"user": USER_SENTINEL + "-long-" + "u" * 10_000}),
    ("user-sentinel-unicode", {"user": USER_SENTINEL + "-\u00fc\U0001f600"}),
    ("temperature-str", {"temperature": "hot"}), ("tools-junk", {"tools": "x"}),
    ("response-format-junk", {"response_format": 7}), ("logit-bias-huge", {"logit_bias": {str(i): 1 for i in range(5000)}}),
    ("unknown-fields", {"x" * 1000: "y", "nested": {"a": [1, {"b": None}]}}),
]  # fmt: skip

_PROMPTS: list[tuple[str, Any]] = [
    ("empty-str", ""), ("empty-list", []), ("list-empty-str", [""]), ("tokens", [1, 2, 3]),
    ("token-lists", [[1], [2, 3]]), ("empty-token-list", [[]]), ("mixed", [1, "a"]),
    ("bools", [True, False]), ("floats", [1.5]), ("obj", {}), ("null", None), ("int", 7),
    ("huge-token", [2**63 - 1]), ("neg-token", [-1]), ("nested3", [[[1]]]),
    ("long", "p " * 100_000), ("many-strings", ["a"] * 10_000),
]  # fmt: skip


def body_cases() -> list[Case]:
    ids = Ids("body")
    out: list[Case] = []
    for name, raw in _CHAT_BODIES:
        rid = ids()
        out.append(Case(f"chat/{name}", "bodies", post(CHAT, raw, rid), rid=rid))
    for name, value in _PART_VALUES:  # issue 10 item 3: text null/number/bool gave 500
        rid = ids()
        body = chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": value}]}])
        out.append(Case(f"chat/part-text-{name}", "bodies", post(CHAT, body, rid), rid=rid))
    for name, msgs in _MESSAGES:
        rid = ids()
        out.append(
            Case(
                f"chat/messages-{name}",
                "bodies",
                post(CHAT, chat_body(messages=msgs), rid),
                rid=rid,
            )
        )
    for path, make in ((CHAT, chat_body), (COMPL, compl_body)):
        tag = "chat" if path == CHAT else "completions"
        for name, model in _MODELS:
            rid = ids()
            out.append(Case(f"{tag}/model-{name}", "bodies", post(path, make(model), rid), rid=rid))
        for name, fields in _FIELDS:
            rid = ids()
            out.append(Case(f"{tag}/{name}", "bodies", post(path, make(**fields), rid), rid=rid))
    for name, prompt in _PROMPTS:
        rid = ids()
        out.append(
            Case(
                f"completions/prompt-{name}",
                "bodies",
                post(COMPL, compl_body(prompt=prompt), rid),
                rid=rid,
            )
        )
    rid = ids()
    out.append(Case("completions/no-prompt", "bodies", post(COMPL, {"model": "emu"}, rid), rid=rid))
    for name, inp in (
        ("str", "hello"),
        ("list", ["a", "b"]),
        ("ints", [1, 2]),
        ("null", None),
        ("obj", {}),
    ):
        rid = ids()
        body = {"model": "faulty", "input": inp}
        out.append(
            Case(f"embeddings/input-{name}", "bodies", post("/v1/embeddings", body, rid), rid=rid)
        )
    for name, raw in (("no-model", b'{"input":"x"}'), ("not-json", b"{x"), ("array", b"[1]"),
                      ("model-int", b'{"model":5}'), ("unknown-model", b'{"model":"advx-model-emb"}'),
                      ("empty", b"")):  # fmt: skip
        rid = ids()
        out.append(Case(f"embeddings/{name}", "bodies", post("/v1/embeddings", raw, rid), rid=rid))
    return out


# --- hand-written: headers ---

_VALID = orjson.dumps(chat_body())

_HEADER_VALUES: dict[str, list[bytes]] = {
    "x-priority": [b"critical", b"CRITICAL", b" high ", b"-1", b"0", b"4", b"5", b"99999999999999999999999",
                   b"1e3", b"0x1", b"nan", b"", "\u0663".encode(), b"\xff", b"urgent!", b"normal,critical",
                   b"9" * 5000],
    "x-tenant": [b"t", b"t" * 128, b"t" * 129, "\u00fc".encode(), b"\xff\xfe", b"a b", b"x" * 10_000],
    "x-request-deadline-ms": [b"0", b"-1", b"1", b"1e-300", b"nan", b"inf", b"1e309", b"abc", b"86400000",
                              b"86400001", b" 5000 "],
    "x-session-id": [b"s" * 15_000, "\u00fc".encode(), b"\xff\xfe", b""],
    "authorization": [b"Bearer " + CLIENT_KEY.encode(), b"bearer " + TENANT_KEY.encode(),
                      b"BEARER " + TENANT_KEY.encode(), b"Bearer", b"Bearer  ", b"Basic Zm9vOmJhcg==",
                      b"Bearer " + CLIENT_KEY.encode() + b"x" * 15_000, b"Bearer \xff\xfe" + CLIENT_KEY.encode(),
                      b"Bearer " + TENANT_KEY.encode() + b" extra", b"Bearer " + "\u00fc".encode()],
    "content-type": [b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x",
                     b"application/json; charset=utf-16", b"application/json; charset=latin-1", b"\xff"],
    "accept-encoding": [b"gzip", b"br", b"*", b"identity;q=0", b"gzip;q=1.0, identity; q=0", b"zstd"],
    "accept": [b"text/event-stream", b"application/xml", b"*/*;q=0"],
    "openai-beta": [b"assistants=v2"], "traceparent": [b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01", b"garbage"],
    "user-agent": [b"", b"\xff" * 10, b"u" * 8000],
    "x-forwarded-for": [b"1.2.3.4, 127.0.0.1"], "forwarded": [b"for=evil;host=internal"],
    "connection": [b"keep-alive, x-priority", b"close", b"upgrade"],
    "upgrade": [b"websocket", b"h2c"], "te": [b"trailers"], "keep-alive": [b"timeout=1000"],
    "proxy-authorization": [b"Basic " + CLIENT_KEY.encode()],
    "expect": [b"100-continue"],
}  # fmt: skip


def header_cases() -> list[Case]:
    ids = Ids("hdr")
    out: list[Case] = []
    for name, values in _HEADER_VALUES.items():
        for i, value in enumerate(values):
            rid = ids()
            raw = post(CHAT, _VALID, rid, [(name, value)], content_type=name != "content-type")
            out.append(Case(f"{name}[{i}]={value[:24]!r}", "headers", raw, rid=rid))
    # nginx answers 417 to an expectation it does not know; aiohttp does too, before the
    # handler runs (so no record is due)
    rid = ids()
    out.append(Case("expect-unknown", "headers", post(CHAT, _VALID, rid, [("Expect", "x-magic")]), rid=rid,
                    statuses=frozenset({417, 400}), record="optional"))  # fmt: skip
    for n in (100, 129, 300):  # server.max_headers is 128
        rid = ids()
        many = [(f"x-h{i}", "v") for i in range(n)]
        out.append(Case(f"{n}-headers", "headers", post(CHAT, _VALID, rid, many), rid=rid,
                        record="required" if n < 128 else "optional"))  # fmt: skip
    # Total header bytes: issue 10 is silent; nginx (large_client_header_buffers 4x8k) and
    # Envoy (max_request_headers_kb 60) refuse ~1 MB of headers in one request with 431/400.
    rid = ids()
    fat = [(f"x-fat{i}", "f" * 10_000) for i in range(100)]
    out.append(Case("1MB-of-headers", "headers", post(CHAT, _VALID, rid, fat), rid=rid,
                    statuses=frozenset({400, 431}), record="optional"))  # fmt: skip
    rid = ids()
    big_auth = [("Authorization", "Bearer " + CLIENT_KEY + "A" * 20_000)]
    out.append(Case("oversized-authorization", "headers", post(CHAT, _VALID, rid, big_auth), rid=None,
                    statuses=frozenset({400, 431}), record="optional"))  # fmt: skip
    rid = ids()
    two = [("x-request-id", rid), ("x-request-id", rid + "-second")]
    out.append(Case("two-request-ids", "headers", post(CHAT, _VALID, None, two), rid=None))
    rid = ids()
    out.append(Case("two-authorizations", "headers",
                    post(CHAT, _VALID, rid, [("Authorization", "Bearer " + TENANT_KEY),
                                            ("Authorization", "Bearer " + CLIENT_KEY)]), rid=rid))  # fmt: skip
    rid = ids()
    # duplicate singleton fields (RFC 9110 5.3): refused before the app (400) or served
    out.append(Case("two-content-types", "headers",
                    post(CHAT, _VALID, rid, [("Content-Type", "text/plain")]), rid=rid, record="optional"))  # fmt: skip
    out += admin_cases(ids)
    return out


def admin_cases(ids: Ids) -> list[Case]:
    out = []
    tok = ADMIN_TOKEN.encode()
    for i, value in enumerate([None, b"Bearer " + tok, b"bearer " + tok, b"BEARER " + tok, b"Bearer  " + tok,
                               b"Bearer wrong", b"Basic " + tok, b"Bearer \xff\xfe" + tok, b"\xff",
                               b"Bearer " + tok + b"x" * 20_000, b"Bearer " + "\u00fc".encode()]):  # fmt: skip
        rid = ids()
        headers: Headers = [("Authorization", value)] if value is not None else []
        big = value is not None and len(value) > 16_000
        statuses = frozenset({400, 401, 431}) if big else ADMIN_STATUSES
        out.append(Case(f"admin-auth[{i}]={(value or b'')[:16]!r}", "headers", get("/admin/estimator", rid, headers),
                        rid=None if big else rid, statuses=statuses, record="optional"))  # fmt: skip
    # issue 10 item 13: the bearer scheme is case-insensitive (RFC 9110 11.1)
    for i in (2, 3):
        out[i].check = _admin_accepted
    # issue 10 item 3: a non-UTF-8 Authorization header on /admin/* gave 500
    return out


def _admin_accepted(case: Case, resp: RawResponse, recs: list[dict[str, Any]]) -> list[str]:
    if resp.status == 401:
        return ["the admin token with a lower/upper-case 'bearer' scheme was refused (401)"]
    return []


# --- hand-written: paths ---

# /v1 paths that leave /v1 under any reading that resolves dot segments after decoding:
# refused with 400 or 404 (issue 10 item 2) and never forwarded
TRAVERSALS = [
    "/v1/../admin/estimator", "/v1/%2e%2e/metrics", "/v1//../../x", "/v1/%2E%2E/%2E%2E/x",
    "/v1/..%2fadmin/estimator", "/v1/.%2e/metrics", "/v1/%2e./metrics", "/v1/..%2Fmetrics",
    "/v1/%2e%2e%2fmetrics", "/v1/chat/completions/../../../metrics", "/v1/./../x",
    "/v1/../v1/../x", "/v1/models/../../admin/estimator", "/v1/..", "/v1/../", "/v1/%2e%2e",
    "/v1/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
]  # fmt: skip
# /v1 paths that leave /v1 only for some servers (backslashes, ;params, double encoding,
# overlong UTF-8, NUL truncation): the issue is silent on the status; whatever is forwarded
# must stay under /v1 even read as leniently as any server might (``normalised``), which in
# practice means refusing them, as Envoy does with path_with_escaped_slashes_action: REJECT
TRICKY = [
    "/v1/..\\admin\\estimator", "/v1/%5c..%5cmetrics", "/v1/..;/metrics", "/v1/;/../metrics",
    "/v1/%252e%252e/metrics", "/v1/%c0%ae%c0%ae/metrics", "/v1/..%00/metrics",
]  # fmt: skip
INSIDE = [
    "/v1/./models", "/v1//models", "/v1/chat/../completions", "/v1/chat/completions/", "/v1/models/",
    "/v1/files?purpose=../../x", "/v1/%2e/files", "/v1/files/%2f%2fexample.com", "/v1/a/b/c/d/e/f",
    "/v1/files;x=y", "/v1/" + "a" * 4000,
]  # fmt: skip
OUTSIDE = [
    "/", "/x", "/admin", "/admin/", "/admin/estimator/", "/metrics/../metrics", "//v1/models",
    "/v2/chat/completions", "/V1/models", "/v1", "/v1%2fmodels", "/%2e%2e/v1/models",
]  # fmt: skip


def _path_statuses(path: str) -> frozenset[int] | None:
    """A /v1 path whose dot segments (after percent-decoding) leave /v1: 400 or 404 (issue 10
    item 2). Any other path: any 2xx-4xx (``/metrics/../metrics`` may be served as
    ``/metrics``, as Envoy's normalize_path does), and never forwarded outside /v1 even as
    the most lenient server would read it (the leak check)."""
    plain = posixpath.normpath(unquote(path.split("?", 1)[0].split("#", 1)[0]))
    if path.startswith("/v1/") and not (plain + "/").startswith("/v1/"):
        return TRAVERSAL_STATUSES
    return None


def path_cases() -> list[Case]:
    ids = Ids("path")
    out: list[Case] = []
    for path in TRAVERSALS:
        for method in ("GET", "POST"):
            rid = ids()
            raw = post(path, compl_body("faulty"), rid) if method == "POST" else get(path, rid)
            out.append(Case(f"{method} {path}", "paths", raw, rid=rid, statuses=TRAVERSAL_STATUSES,
                            record="optional", check=leak_check))  # fmt: skip
    for path in TRICKY + INSIDE + OUTSIDE:
        for method in ("GET", "POST"):
            rid = ids()
            raw = post(path, compl_body("faulty"), rid) if method == "POST" else get(path, rid)
            out.append(Case(f"{method} {path[:60]}", "paths", raw, rid=rid, statuses=_path_statuses(path),
                            record="optional", check=leak_check))  # fmt: skip
    return out


# --- hand-written: methods ---

METHODS = [
    "GET",
    "POST",
    "PUT",
    "DELETE",
    "PATCH",
    "HEAD",
    "OPTIONS",
    "TRACE",
    "PROPFIND",
    "FOO",
    "get",
]
METHOD_PATHS = [CHAT, COMPL, "/v1/models", "/v1/embeddings", "/v1/files", "/health", "/ready",
                "/metrics", "/admin/estimator", "/x"]  # fmt: skip


def method_cases() -> list[Case]:
    ids = Ids("meth")
    out: list[Case] = []
    for path in METHOD_PATHS:
        for method in METHODS:
            rid = ids()
            body = orjson.dumps(chat_body()) if method in ("POST", "PUT", "PATCH") else None
            hs: Headers = [("x-request-id", rid), ("Content-Type", "application/json")]
            if path == "/admin/estimator":
                hs.append(("Authorization", "Bearer " + ADMIN_TOKEN))
            raw = request_bytes(method, path, headers=hs, body=body)
            statuses = ADMIN_STATUSES | {400, 404, 405} if path == "/admin/estimator" else None
            if path == "/ready":
                statuses = frozenset({200, 503, 400, 404, 405})  # 503 is /ready's own answer
            out.append(Case(f"{method} {path}", "methods", raw, rid=rid, head_only=method == "HEAD",
                            statuses=statuses, record=needs_record(method, path)))  # fmt: skip
    rid = ids()
    out.append(Case("CONNECT authority", "methods",
                    b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\nx-request-id: " + rid.encode() + b"\r\n\r\n",
                    rid=None, statuses=frozenset({400, 404, 405}), record="optional"))  # fmt: skip
    return out


# --- hand-written: encodings (request and response) ---


def encoding_cases() -> list[Case]:
    ids = Ids("enc")
    out: list[Case] = []
    valid = orjson.dumps(chat_body())
    bomb = gzip.compress(
        b'{"model":"emu","messages":[{"role":"user","content":"' + b"0" * 30_000_000 + b'"}]}'
    )
    for name, enc, body in (("gzip", "gzip", gzip.compress(valid)), ("gzip-bomb", "gzip", bomb),
                            ("gzip-corrupt", "gzip", b"\x1f\x8b" + b"junk" * 10),
                            ("deflate-raw", "deflate", valid), ("br", "br", valid), ("zstd", "zstd", valid),
                            ("gzip-gzip", "gzip, gzip", gzip.compress(gzip.compress(valid))),
                            ("unknown", "x-magic", valid), ("identity", "identity", valid)):  # fmt: skip
        rid = ids()
        raw = post(CHAT, body, rid, [("Content-Encoding", enc)])
        # issue 10 is silent on compressed request bodies; nginx and Envoy forward them, a
        # proxy that must read the JSON decodes them within server.max_body_bytes or refuses
        # them (400/413/415); a decompressed body over the limit must not be accepted
        chk = _not_ok if name == "gzip-bomb" else None
        # aiohttp decodes (or refuses) these before the app sees the request: no record due
        out.append(Case(f"request-content-encoding-{name}", "encodings", raw, rid=rid, check=chk,
                        record="optional"))  # fmt: skip
    out += _chunked_cases(ids)
    out += _response_encoding_cases(ids)
    return out


def _not_ok(case: Case, resp: RawResponse, recs: list[dict[str, Any]]) -> list[str]:
    if resp.status == 200:
        return ["a body decompressing past server.max_body_bytes was accepted"]
    return []


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}".encode() + b"\r\n" + data + b"\r\n"


def _chunked_cases(ids: Ids) -> list[Case]:
    valid = orjson.dumps(chat_body())
    out = []
    te = [("Transfer-Encoding", "chunked")]
    variants: list[tuple[str, Headers, bytes, frozenset[int] | None, str]] = [
        ("valid", te, _chunk(valid[:10]) + _chunk(valid[10:]) + b"0\r\n\r\n", None, "required"),
        ("extension", te, b"a;ext=1\r\n" + valid[:10] + b"\r\n" + _chunk(valid[10:]) + b"0\r\n\r\n", None, "required"),
        ("trailers", te, _chunk(valid) + b"0\r\nx-trailer: 1\r\n\r\n", None, "required"),
        ("bad-size", te, b"zz\r\n" + valid + b"\r\n0\r\n\r\n", frozenset({400}), "optional"),
        ("huge-size", te, b"ffffffffffffffffffff\r\n" + valid + b"\r\n0\r\n\r\n", frozenset({400, 413}), "optional"),
        ("negative-size", te, b"-5\r\n" + valid + b"\r\n0\r\n\r\n", frozenset({400}), "optional"),
        # request smuggling: RFC 9112 6.1 lets a server reject both; nginx (>=1.23) answers 400
        ("te-and-cl", [*te, ("Content-Length", "5")], _chunk(valid) + b"0\r\n\r\n", frozenset({400}), "optional"),
        # chunked as the final coding: read as chunked (accepted) or refused; both are safe
        ("te-identity-chunked", [("Transfer-Encoding", "identity, chunked")], _chunk(valid) + b"0\r\n\r\n",
         frozenset({200, 400, 501}), "optional"),
        # an unknown transfer coding: nginx answers 501, Envoy 501/400
        ("te-gzip-only", [("Transfer-Encoding", "gzip")], gzip.compress(valid), frozenset({400, 411, 501}), "optional"),
        ("te-space-chunked", [("Transfer-Encoding", " chunked")], _chunk(valid) + b"0\r\n\r\n", None, "optional"),
        ("te-Chunked-case", [("Transfer-Encoding", "CHUNKED")], _chunk(valid) + b"0\r\n\r\n", None, "optional"),
        ("two-te", [*te, ("Transfer-Encoding", "chunked")], _chunk(valid) + b"0\r\n\r\n", frozenset({200, 400}), "optional"),
    ]  # fmt: skip
    for name, hs, body, statuses, record in variants:
        rid = ids()
        raw = request_bytes("POST", CHAT, headers=[("Content-Type", "application/json"), ("x-request-id", rid), *hs],
                            body=body, content_length=False)  # fmt: skip
        out.append(Case(f"chunked-{name}", "encodings", raw, rid=rid if record == "required" else None,
                        statuses=statuses, record=record))  # fmt: skip
    return out


def _response_encoding_cases(ids: Ids) -> list[Case]:
    """Issue 10 item 4 (gzip from upstream) and the JSON-with-spaces usage chunk."""
    out: list[Case] = []
    for fault in ("gzip", "gzip-always"):
        for stream in (False, True):
            for path, make in ((CHAT, chat_body), (COMPL, compl_body)):
                for ae in ("gzip", "identity", None):
                    rid = ids()
                    hs: Headers = [("Accept-Encoding", ae)] if ae else []
                    body = make("faulty", fault=fault, stream=stream, max_tokens=3)
                    # gzip-always ignores what was asked: decoded correctly, or refused as a
                    # bad upstream answer (502 / a final error event)
                    statuses = frozenset({200}) if fault == "gzip" else frozenset({200, 502})
                    out.append(Case(f"{fault}/{'stream' if stream else 'plain'}{path}/ae={ae}", "encodings",
                                    post(path, body, rid, hs), rid=rid, statuses=statuses,
                                    check=tokens_exact(3)))  # fmt: skip
    for fault in ("spaced", "crlf"):
        for path, make in ((CHAT, chat_body), (COMPL, compl_body)):
            for usage in (False, True):
                rid = ids()
                extra = {"stream_options": {"include_usage": True}} if usage else {}
                body = make("faulty", fault=fault, stream=True, max_tokens=3, **extra)
                # crlf is beyond issue 10's list: SSE allows CRLF line ends (sse-starlette's
                # default); a faithful proxy, like nginx, passes such a stream through complete
                checks = [tokens_exact(3), done_exactly]
                if not usage:
                    checks.append(no_usage_leak)
                out.append(Case(f"{fault}/stream{path}/include_usage={usage}", "encodings",
                                post(path, body, rid), rid=rid, statuses=frozenset({200}),
                                check=both(*checks)))  # fmt: skip
        rid = ids()
        out.append(Case(f"{fault}/plain", "encodings", post(COMPL, compl_body("faulty", fault=fault, max_tokens=3), rid),
                        rid=rid, statuses=frozenset({200}), check=tokens_exact(3)))  # fmt: skip
    return out


# --- hand-written: backend faults ---


def fault_cases() -> list[Case]:
    ids = Ids("fault")
    out: list[Case] = []

    def add(name: str, body: dict[str, Any], statuses: set[int], *, path: str = COMPL,
            timeout_s: float = 12.0, outcomes: set[str] | None = None,
            check: Callable[..., list[str]] | None = None) -> None:  # fmt: skip
        rid = ids()
        out.append(Case(name, "faults", post(path, body, rid), rid=rid, statuses=frozenset(statuses),
                        timeout_s=timeout_s, outcomes=frozenset(outcomes) if outcomes else None,
                        check=check))  # fmt: skip

    f = lambda fault, **kw: compl_body("faulty", fault=fault, max_tokens=3, **kw)  # noqa: E731
    add("stall-headers", f("stall-headers"), {504}, check=within(5))
    add("stall-headers-stream", f("stall-headers", stream=True), {504}, check=within(5))
    add(
        "stall-mid-stream",
        f("stall-mid", stream=True),
        {200},
        outcomes={"timeout"},
        check=within(5),
    )
    add("stall-mid-plain", f("stall-mid"), {504}, check=within(5))
    # issue 10 item 6: timeouts.total_s (5 s here) bounds a dripping non-streamed answer
    add("drip-plain", f("drip", fault_itl=0.1), {504}, outcomes={"timeout"}, check=within(8))
    add(
        "drip-stream",
        compl_body("faulty", fault="drip", stream=True, max_tokens=40, fault_itl=0.3),
        {200},
        outcomes={"timeout"},
        check=within(8),
    )
    # issue 10 item 10: an event with no separator is capped (relay.max_event_bytes)
    add(
        "nosep-40MiB",
        f("nosep", stream=True),
        {200},
        timeout_s=25,
        outcomes={"upstream_error"},
        check=both(body_below(20 << 20), within(15)),
    )
    add("abort-stream", f("abort", stream=True), {200}, outcomes={"upstream_error"})
    add("abort-plain", f("abort"), {502})
    for status in (400, 404, 429, 500, 502, 503):
        add(f"status-{status}", f(f"status-{status}"), {status})
        add(f"status-{status}-stream", f(f"status-{status}", stream=True), {status})
    add("echo", f("echo"), {200})
    add(
        "chat-abort-stream",
        chat_body("faulty", fault="abort", stream=True),
        {200},
        path=CHAT,
        outcomes={"upstream_error"},
    )
    add(
        "chat-stall-mid-stream",
        chat_body("faulty", fault="stall-mid", stream=True),
        {200},
        path=CHAT,
        outcomes={"timeout"},
        check=within(5),
    )
    return out


# --- hand-written: connection behaviour (raw bytes, partial requests) ---


def connection_cases() -> list[Case]:
    ids = Ids("conn")
    out: list[Case] = []
    valid = orjson.dumps(chat_body())

    def head(rid: str | None, extra: bytes = b"") -> bytes:
        r = b"x-request-id: " + rid.encode() + b"\r\n" if rid else b""
        return (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + r
            + extra
        )

    # the client gives up: partial headers, then close (no answer is due, no record)
    for i, cut in enumerate((b"POS", b"POST /v1/chat/completions HTTP/1.1\r\nHo", head(None))):
        out.append(Case(f"partial-headers-close[{i}]", "connections", [cut, 0.2], record="optional",
                        no_response_ok=True, read=False))  # fmt: skip
    # a partial body, then close: the handler saw the request, so one record: client_cancelled
    for i, delay in enumerate((0.0, 0.5)):
        rid = ids()
        parts = [head(rid, b"Content-Length: 1000\r\n\r\n") + valid[:10], delay]
        out.append(Case(f"partial-body-close[{i}]", "connections", parts, rid=rid, no_response_ok=True,
                        read=False, outcomes=frozenset({"client_cancelled"})))  # fmt: skip
    bad_cl: list[tuple[str, bytes, frozenset[int] | None]] = [
        ("cl-letters", b"Content-Length: ab\r\n", frozenset({400})),
        ("cl-negative", b"Content-Length: -1\r\n", frozenset({400})),
        ("cl-plus", b"Content-Length: +10\r\n", frozenset({400})),
        ("cl-float", b"Content-Length: 1e3\r\n", frozenset({400})),
        ("cl-list", b"Content-Length: 10, 10\r\n", frozenset({400})),
        ("cl-two-same", b"Content-Length: %d\r\nContent-Length: %d\r\n" % (len(valid), len(valid)), frozenset({200, 400})),
        ("cl-two-diff", b"Content-Length: %d\r\nContent-Length: 5\r\n" % len(valid), frozenset({400})),
        ("cl-2^64", b"Content-Length: 18446744073709551617\r\n", frozenset({400, 413})),
        ("cl-over-limit", b"Content-Length: 104857600\r\n", frozenset({413})),
        ("cl-hex", b"Content-Length: 0x10\r\n", frozenset({400})),
    ]  # fmt: skip
    for name, line, statuses in bad_cl:
        rid = ids()
        record = "required" if name == "cl-over-limit" else "optional"
        out.append(Case(name, "connections", head(rid, line + b"\r\n") + valid, rid=rid if record == "required" else None,
                        statuses=statuses, record=record, timeout_s=5))  # fmt: skip
    # a valid request followed, in the same packet, by garbage: nginx answers the first and
    # refuses the rest; aiohttp refuses the connection at once (400), which is safe too
    rid = ids()
    out.append(Case("cl-short-then-garbage", "connections",
                    head(rid, b"Content-Length: %d\r\n\r\n" % len(valid)) + valid + b"GARBAGE\r\n\r\n", rid=None,
                    statuses=frozenset({200, 400}), record="optional"))  # fmt: skip
    rid = ids()
    out.append(Case("pipelined-two", "connections",
                    post(CHAT, valid, rid) + post(CHAT, valid, rid + "-b"), rid=rid))  # fmt: skip
    raw_lines: list[tuple[str, bytes, frozenset[int] | None]] = [
        ("http10-no-host", b"GET /health HTTP/1.0\r\n\r\n", None),
        # nginx answers 400/505 to these request lines; aiohttp's parser serves them as
        # HTTP/1.x. Accepted here (chosen differently from nginx): the proxy is the first
        # parser on the path, so no smuggling, and the answer is the local endpoint's own.
        ("http09", b"GET /health\r\n\r\n", frozenset({200, 400, 505})),
        ("http2-version", b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", frozenset({200, 400, 505})),
        ("http99-version", b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", frozenset({400, 505})),
        ("lower-version", b"GET /health http/1.1\r\nHost: x\r\n\r\n", frozenset({400, 505})),
        ("double-space", b"GET  /health HTTP/1.1\r\nHost: x\r\n\r\n", frozenset({200, 400, 404})),
        ("tab-separator", b"GET\t/health\tHTTP/1.1\r\nHost: x\r\n\r\n", frozenset({400})),
        ("no-slash", b"GET health HTTP/1.1\r\nHost: x\r\n\r\n", frozenset({400, 404})),
        ("asterisk", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", frozenset({400, 404, 405, 200})),
        ("absolute-form", b"GET http://evil.example/v1/../admin/estimator HTTP/1.1\r\nHost: x\r\n\r\n", TRAVERSAL_STATUSES | {401}),
        ("nul-in-path", b"GET /v1/mo\x00dels HTTP/1.1\r\nHost: x\r\n\r\n", frozenset({400, 404})),
        ("bad-method-chars", b"G@T /health HTTP/1.1\r\nHost: x\r\n\r\n", frozenset({400, 405})),
        ("long-method", b"A" * 10_000 + b" /health HTTP/1.1\r\nHost: x\r\n\r\n", frozenset({400, 405, 431, 501})),
        ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", frozenset({400})),
        ("bare-lf", b"GET /health HTTP/1.1\nHost: x\n\n", frozenset({200, 400})),
        ("header-no-colon", b"GET /health HTTP/1.1\r\nHost x\r\n\r\n", frozenset({400})),
        # RFC 9112 5.1: whitespace before the colon must be rejected with 400
        ("space-before-colon", b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n", frozenset({400})),
        ("obs-fold", b"GET /health HTTP/1.1\r\nHost: x\r\nx-a: b\r\n c\r\n\r\n", frozenset({400})),
        ("nul-in-header", b"GET /health HTTP/1.1\r\nHost: x\r\nx-a: b\x00c\r\n\r\n", frozenset({400})),
        ("del-in-header", b"GET /health HTTP/1.1\r\nHost: x\r\nx-a: b\x7fc\r\n\r\n", frozenset({400})),
        ("bad-header-name", b"GET /health HTTP/1.1\r\nHost: x\r\nx y: z\r\n\r\n", frozenset({400})),
        ("utf8-header-name", "GET /health HTTP/1.1\r\nHost: x\r\nx-\u00fc: z\r\n\r\n".encode(), frozenset({400})),
        # duplicate Host: RFC 9112 3.2 says 400; nginx and Envoy answer 400
        ("two-hosts", b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", frozenset({400})),
        # missing Host in HTTP/1.1: RFC 9112 3.2 says 400 (nginx); the proxy routes no Host,
        # so 200 is accepted too
        ("no-host-11", b"GET /health HTTP/1.1\r\n\r\n", frozenset({200, 400})),
        ("request-line-20k", b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", frozenset({400, 414, 431})),
        ("header-20k", b"GET /health HTTP/1.1\r\nHost: x\r\nx-big: " + b"b" * 20_000 + b"\r\n\r\n", frozenset({400, 431})),
        ("auth-ctl-secret", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + CLIENT_KEY.encode() + b"\x01\r\n\r\n", frozenset({400})),
        ("auth-nul-secret", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + CLIENT_KEY.encode() + b"\x00\r\nContent-Length: 2\r\n\r\n{}", frozenset({400})),
        ("auth-fold-secret", b"GET /admin/estimator HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\r\n " + ADMIN_TOKEN.encode() + b"\r\n\r\n", frozenset({400, 401})),
    ]  # fmt: skip
    for name, raw, statuses in raw_lines:
        out.append(
            Case(name, "connections", raw, statuses=statuses, record="optional", timeout_s=5)
        )
    # Expect: 100-continue: the body follows the interim answer
    rid = ids()
    out.append(Case("expect-100-continue", "connections",
                    [head(rid, b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(valid)), 0.2, valid],
                    rid=rid))  # fmt: skip
    return out


# --- generated (hypothesis) ---


def draw(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """``n`` examples of ``strategy``, the same on every run (derandomized, no shrinking)."""
    out: list[Any] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def collect(x: Any) -> None:
        out.append(x)

    collect()
    return out


_leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
         | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))  # fmt: skip
JSON = st.recursive(
    _leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10,
)
_model = st.one_of(
    st.sampled_from(["emu", "emu", "emu", "faulty"]),
    st.text(max_size=40).map(lambda s: MODEL_SENTINEL + s),
    JSON,
)
_user = st.text(max_size=30).map(lambda s: USER_SENTINEL + s) | JSON
_part = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio", ""]) | JSON},
    optional={"text": st.text(max_size=50) | JSON, "image_url": JSON},
)
_content = st.none() | st.text(max_size=200) | st.lists(_part | JSON, max_size=4) | JSON
_message = st.fixed_dictionaries(
    {}, optional={"role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | JSON,
                  "content": _content, "name": JSON, "tool_calls": JSON},
)  # fmt: skip
_common = {
    "stream": st.booleans() | JSON,
    "max_tokens": st.integers(-5, 600) | JSON,
    "max_completion_tokens": st.integers(-5, 600) | JSON,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | JSON})
    | JSON,
    "n": st.integers(-2, 3) | JSON,
    "user": _user,
    "temperature": st.floats(-1, 3, allow_nan=False) | JSON,
    "tools": JSON,
}
CHAT_BODY = st.fixed_dictionaries(
    {"model": _model}, optional={"messages": st.lists(_message, max_size=4) | JSON, **_common}
).map(lambda b: {**b, "messages": b.get("messages", [{"role": "user", "content": "x"}])})
COMPL_BODY = st.fixed_dictionaries(
    {"model": _model},
    optional={"prompt": st.text(max_size=200) | st.lists(st.integers(-1, 50_000), max_size=8)
              | st.lists(st.text(max_size=20), max_size=4) | JSON, **_common},
)  # fmt: skip


def _dump(obj: Any, ascii_only: bool) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def generated_body_cases(n_chat: int = 300, n_compl: int = 150) -> list[Case]:
    ids = Ids("genbody")
    out: list[Case] = []
    for path, strat, n in ((CHAT, CHAT_BODY, n_chat), (COMPL, COMPL_BODY, n_compl)):
        for i, body in enumerate(draw(strat, n)):
            rid = ids()
            raw = _dump(body, ascii_only=i % 2 == 0)
            out.append(Case(f"{path} {raw[:100]!r}", "generated-bodies", post(path, raw, rid), rid=rid,
                            timeout_s=15))  # fmt: skip
    return out


HEADER_POOL = ["x-priority", "x-tenant", "x-request-deadline-ms", "x-session-id", "authorization",
               "content-type", "accept", "accept-encoding", "openai-beta", "traceparent", "tracestate",
               "user-agent", "x-request-id", "openai-organization", "openai-project", "cookie",
               "x-forwarded-for", "connection", "te", "upgrade", "expect", "range", "if-none-match",
               "content-encoding", "x-rightsizer-debug"]  # fmt: skip
_VALUE_BYTES = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_header_value = st.one_of(
    _VALUE_BYTES,
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass").replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b"critical", b"-1", b"Bearer " + CLIENT_KEY.encode(), b"bearer " + TENANT_KEY.encode(),
                     b"gzip", b"close", b"100-continue", b"0", b"1e9"]),
    st.binary(max_size=20).map(lambda b: b"Bearer " + CLIENT_KEY.encode() + b.replace(b"\r", b"").replace(b"\n", b"")),
)  # fmt: skip
HEADERS = st.lists(
    st.tuples(st.sampled_from(HEADER_POOL) | st.from_regex(r"x-[a-z0-9-]{1,20}", fullmatch=True), _header_value),
    max_size=6,
)  # fmt: skip
_FIELD_VALUE_OK = set(range(0x20, 0x7F)) | {0x09} | set(range(0x80, 0x100))
_SINGLETONS = {"content-type", "user-agent", "host", "content-length", "transfer-encoding"}


def _wellformed(headers: Sequence[tuple[str, bytes]]) -> bool:
    """Every value is an RFC 9110 field-value (VCHAR, SP, HTAB, obs-text) and no singleton
    field repeats, so the request is valid HTTP and must reach the app (and get a record)."""
    names = [k for k, _ in headers] + ["content-type"]
    if any(names.count(k) > 1 for k in _SINGLETONS):
        return False
    return all(all(c in _FIELD_VALUE_OK for c in v) for _, v in headers)


_DISRUPTIVE = ("connection", "te", "upgrade", "expect", "content-encoding")


def generated_header_cases(n: int = 250) -> list[Case]:
    ids = Ids("genhdr")
    out: list[Case] = []
    for hs in draw(HEADERS, n):
        rid = ids()
        fixed: list[tuple[str, bytes]] = []
        for k, v in hs:
            if k == "x-request-id":  # keep ids unique: the proxy keys records on them
                v = f"advx-genhdr-own-{ids.n}-".encode() + v
            if k != "authorization":  # a key pasted into x-tenant is the client's own doing
                v = v.replace(SECRET_MARK.encode(), b"sk-adversarial-public")
            fixed.append((k, v))
        own_rid = not any(k == "x-request-id" for k, _ in fixed)
        raw = post(CHAT, _VALID, rid if own_rid else None, fixed)  # type: ignore[arg-type]
        record = (
            "required"
            if _wellformed(fixed) and not any(k in _DISRUPTIVE for k, _ in fixed)
            else "optional"
        )
        out.append(Case(f"headers {fixed!r}"[:200], "generated-headers", raw, rid=rid if own_rid else None,
                        record=record))  # fmt: skip
    return out


SEGMENTS = ["..", ".", "%2e%2e", "%2E%2e", ".%2e", "%2e.", "%2f", "%5c", "..;", ";", "", "admin",
            "estimator", "metrics", "x", "models", "chat", "completions", "files", "%00", "%ff", "~",
            "%252e%252e", "..%2f", "..\\", "%c0%ae", "embeddings", "%20", "?", "#"]  # fmt: skip
_seg = st.sampled_from(SEGMENTS) | st.text(alphabet="abcXYZ09-_.~%!$&'()*+,;=:@", max_size=8)
PATHS = st.tuples(
    st.sampled_from(["/v1/", "/v1/", "/v1/", "/", "//", "/v1", "/V1/"]),
    st.lists(_seg, min_size=1, max_size=6),
    st.sampled_from(["GET", "POST"]),
)


def generated_path_cases(n: int = 200) -> list[Case]:
    ids = Ids("genpath")
    out: list[Case] = []
    for prefix, segs, method in draw(PATHS, n):
        rid = ids()
        path = prefix + "/".join(segs)
        raw = post(path, compl_body("faulty"), rid) if method == "POST" else get(path, rid)
        out.append(Case(f"{method} {path}", "generated-paths", raw, rid=rid, record=needs_record(method, path),
                        statuses=_path_statuses(path), check=leak_check))  # fmt: skip
    return out


METHOD_STRAT = st.tuples(
    st.sampled_from(METHODS) | st.from_regex(r"[A-Z]{1,12}", fullmatch=True),
    st.sampled_from([*METHOD_PATHS[:-2], "/v1/files/file-1", "/v1/responses"]),
)


def generated_method_cases(n: int = 60) -> list[Case]:
    ids = Ids("genmeth")
    out: list[Case] = []
    for method, path in draw(METHOD_STRAT, n):
        rid = ids()
        raw = request_bytes(method, path, headers=[("x-request-id", rid), ("Content-Type", "application/json")],
                            body=orjson.dumps(compl_body("faulty")))  # fmt: skip
        statuses = frozenset({200, 503, 400, 404, 405}) if path == "/ready" else None
        out.append(Case(f"{method} {path}", "generated-methods", raw, rid=rid, record=needs_record(method, path),
                        head_only=method == "HEAD", statuses=statuses))  # fmt: skip
    return out


def everything() -> Iterator[Case]:
    yield from body_cases()
    yield from header_cases()
    yield from path_cases()
    yield from method_cases()
    yield from encoding_cases()
    yield from fault_cases()
    yield from connection_cases()
    yield from generated_body_cases()
    yield from generated_header_cases()
    yield from generated_path_cases()
    yield from generated_method_cases()
