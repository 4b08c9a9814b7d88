from __future__ import annotations

import orjson
import pytest

from proxy.errors import InvalidRequest
from proxy.validate import parse_body, parse_priority, parse_tenant, upstream_body


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
    assert parse_tenant(None, {"user": "bob"}) == "bob"
    assert parse_tenant("team-a", {"user": "bob"}) == "team-a"
    assert parse_tenant(None, {}) == "default"
