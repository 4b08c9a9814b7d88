from __future__ import annotations

import orjson
import pytest

from proxy.errors import InvalidRequest
from proxy.validate import (
    parse_body,
    parse_priority,
    parse_tenant,
    upstream_body,
    upstream_headers,
    upstream_path,
    user_tenant,
)


def chat(**kw: object) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}], **kw})


def test_chat_fields() -> None:
    p = parse_body(chat(stream=True, max_tokens=5), "chat")
    assert (p.model, p.stream, p.include_usage, p.max_tokens, p.prompt_chars) == (
        "m",
        True,
        False,
        5,
        5,
    )


@pytest.mark.parametrize(
    ("prompt", "chars"),
    [("abcd", 4), (["ab", "cd"], 4), ([1, 2, 3], 12), ([[1, 2], [3]], 12)],
    ids=["string", "strings", "token-ids", "token-id-lists"],
)
def test_completion_prompt_forms(prompt: object, chars: int) -> None:
    assert (
        parse_body(orjson.dumps({"model": "m", "prompt": prompt}), "completions").prompt_chars
        == chars
    )


@pytest.mark.parametrize(
    ("raw", "endpoint", "param"),
    [
        (b"", "chat", None),
        (b"nope", "chat", None),
        (b"1", "chat", None),
        (b'{"model": 3, "messages": []}', "chat", "model"),
        (b'{"model": "m", "messages": []}', "chat", "messages"),
        (b'{"model": "m", "messages": [1]}', "chat", "messages[0]"),
        (b'{"model": "m", "messages": [{"role": "u", "content": 5}]}', "chat", "messages[0].content"),
        (b'{"model": "m", "prompt": {"x": 1}}', "completions", "prompt"),
        (b'{"model": "m", "prompt": []}', "completions", "prompt"),
        (b'{"model": "m"}', "completions", "prompt"),
        (b'{"model": "m", "prompt": "x", "stream_options": 1}', "completions", "stream_options"),
        (b'{"model": "m", "prompt": "x", "max_tokens": 1.5}', "completions", "max_tokens"),
        (b'{"model": "m", "prompt": "x", "max_tokens": true}', "completions", "max_tokens"),
        (b'{"model": "m", "prompt": "x", "n": 0}', "completions", "n"),
    ],
    ids=["empty", "not-json", "not-object", "model-type", "messages-empty", "message-type",
         "content-type", "prompt-object", "prompt-empty", "prompt-missing", "stream-options",
         "max-tokens-float", "max-tokens-bool", "n-zero"],
)  # fmt: skip
def test_invalid_bodies_name_the_param(raw: bytes, endpoint: str, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_body(raw, endpoint)
    assert info.value.param == param
    assert info.value.status == 400


def test_upstream_body_adds_usage_only_when_needed() -> None:
    p = parse_body(chat(stream=True), "chat")
    body, strip = upstream_body(p)
    assert strip and orjson.loads(body)["stream_options"] == {"include_usage": True}
    p = parse_body(chat(stream=True, stream_options={"include_usage": True}), "chat")
    assert upstream_body(p)[1] is False
    p = parse_body(chat(), "chat")
    body, strip = upstream_body(p)
    assert not strip and "stream_options" not in orjson.loads(body)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, "normal"), ("HIGH", "high"), ("sheddable", "sheddable"), ("0", "critical"),
     ("3", "low"), ("99", "sheddable"), ("-4", "critical")],
)  # fmt: skip
def test_priority(raw: str | None, expected: str) -> None:
    assert parse_priority(raw) == expected


def test_bad_priority_and_tenant() -> None:
    with pytest.raises(InvalidRequest, match="x-priority"):
        parse_priority("urgent")
    with pytest.raises(InvalidRequest, match="x-tenant"):
        parse_tenant("a" * 200, None)
    # the body's user is a client-chosen string: it becomes a digest, never a label or log field
    assert parse_tenant(None, {"user": "bob"}) == user_tenant("bob") != "bob"
    assert user_tenant("bob").startswith("user-") and len(user_tenant("x" * 10_000)) == 17
    assert parse_tenant("team-a", {"user": "bob"}) == "team-a"
    assert parse_tenant(None, {}) == "default"


@pytest.mark.parametrize("text", [None, 3, True, ["x"]], ids=["null", "number", "bool", "list"])
def test_content_part_text_must_be_a_string(text: object) -> None:
    body = orjson.dumps(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
    )
    with pytest.raises(InvalidRequest) as info:
        parse_body(body, "chat")
    assert info.value.param == "messages[0].content[0].text" and info.value.status == 400


def test_non_text_parts_are_not_counted() -> None:
    parts = [{"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "hey"}]
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": parts}]})
    assert parse_body(body, "chat").prompt_chars == 3


def test_upstream_body_forwards_the_clients_bytes_when_nothing_changes() -> None:
    raw = b'{"model": "m",  "messages": [{"role": "user", "content": "x"}], "stream": true,' \
          b' "stream_options": {"include_usage": true}}'  # fmt: skip
    assert upstream_body(parse_body(raw, "chat")) == (raw, False)
    spliced, strip = upstream_body(parse_body(raw.replace(b', "stream_options"', b', "x"'), "chat"))
    assert strip and orjson.loads(spliced)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    "path",
    ["/v1/../admin/estimator", "/v1/%2e%2e/metrics", "/v1//../../x", "/v1/./models",
     "/v1/a%2f..%2f..%2fmetrics", "/v2/x", "/v1/a\\..\\b", "/v1/%00"],
)  # fmt: skip
def test_paths_that_leave_v1_are_refused(path: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        upstream_path(path)
    assert info.value.status == 400


def test_paths_under_v1_are_forwarded_as_given() -> None:
    assert upstream_path("/v1/files/abc%20d", "limit=2") == "/v1/files/abc%20d?limit=2"
    assert upstream_path("/v1/embeddings") == "/v1/embeddings"


def test_forwarded_headers() -> None:
    got = upstream_headers(
        [("Authorization", "Bearer sk-client"), ("traceparent", "00-abc-def-01"),
         ("OpenAI-Beta", "assistants=v2"), ("User-Agent", "openai-python"), ("Connection", "x-drop"),
         ("x-drop", "1"), ("Keep-Alive", "5"), ("x-priority", "critical"), ("x-tenant", "t"),
         ("x-rightsizer-debug", "1"), ("X-Custom", "a"), ("x-custom", "b"), ("x-secret", "s"),
         ("Accept-Encoding", "gzip"), ("x-request-id", "spoofed")],
        request_id="rid", deny=frozenset({"x-secret"}),
    )  # fmt: skip
    assert got == {
        "traceparent": "00-abc-def-01", "openai-beta": "assistants=v2",
        "user-agent": "openai-python", "x-custom": "a, b", "x-request-id": "rid",
        "content-type": "application/json", "accept-encoding": "identity",
    }  # fmt: skip
