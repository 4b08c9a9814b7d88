"""Request parsing and validation: what the proxy must know before routing, with 4xx errors
that say what was wrong. Everything else in the body is the backend's to validate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .errors import InvalidRequest

PRIORITY_CLASSES = ("critical", "high", "normal", "low", "sheddable")
_INT_TO_CLASS = {0: "critical", 1: "high", 2: "normal", 3: "low", 4: "sheddable"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedRequest:
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool  # the client asked for the usage chunk itself
    max_tokens: int | None
    prompt_chars: int

    @property
    def est_prompt_tokens(self) -> int:
        return max(1, self.prompt_chars // 4)


def _require(cond: bool, message: str, param: str) -> None:
    if not cond:
        raise InvalidRequest(message, param=param)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _messages_chars(messages: Any) -> int:
    _require(
        isinstance(messages, list) and len(messages) > 0,
        "'messages' must be a non-empty array of message objects.",
        "messages",
    )
    chars = 0
    for i, m in enumerate(messages):
        _require(isinstance(m, dict), f"'messages[{i}]' must be an object.", f"messages[{i}]")
        _require(
            isinstance(m.get("role"), str),
            f"'messages[{i}].role' is required and must be a string.",
            f"messages[{i}].role",
        )
        content = m.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
        else:
            _require(
                content is None,
                f"'messages[{i}].content' must be a string, an array of parts or null.",
                f"messages[{i}].content",
            )
    return chars


def _prompt_chars(prompt: Any) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    ok = isinstance(prompt, list) and len(prompt) > 0
    if ok and all(isinstance(p, str) for p in prompt):
        return sum(len(p) for p in prompt)
    if ok and all(_is_int(t) for t in prompt):
        return 4 * len(prompt)
    if ok and all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
        return 4 * sum(len(p) for p in prompt)
    raise InvalidRequest(
        "'prompt' must be a string, an array of strings, an array of token ids "
        "or an array of token-id arrays.",
        param="prompt",
    )


def parse_body(raw: bytes, endpoint: str) -> ParsedRequest:
    """Parse and check a chat/completions body. ``endpoint``: "chat" or "completions"."""
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    _require(
        isinstance(model, str) and bool(model), "'model' is required and must be a string.", "model"
    )
    if endpoint == "chat":
        chars = _messages_chars(body.get("messages"))
    else:
        _require("prompt" in body, "'prompt' is required.", "prompt")
        chars = _prompt_chars(body["prompt"])
    stream = body.get("stream", False)
    _require(isinstance(stream, bool) or stream is None, "'stream' must be a boolean.", "stream")
    opts = body.get("stream_options")
    _require(
        opts is None or isinstance(opts, dict),
        "'stream_options' must be an object.",
        "stream_options",
    )
    include_usage = bool(opts and opts.get("include_usage"))
    max_tokens = None
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if v is not None:
            _require(_is_int(v) and v >= 0, f"'{key}' must be a non-negative integer.", key)
            max_tokens = v if max_tokens is None else max_tokens
    n = body.get("n")
    _require(n is None or (_is_int(n) and n >= 1), "'n' must be a positive integer.", "n")
    return ParsedRequest(
        body=body,
        model=str(model),
        stream=bool(stream),
        include_usage=include_usage,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        prompt_chars=chars,
    )


def upstream_body(p: ParsedRequest) -> tuple[bytes, bool]:
    """The body to send upstream, and whether the usage chunk must be stripped on the way back.

    For streams, the proxy always asks for ``stream_options.include_usage`` so token counts are
    exact; when the client didn't ask, the extra usage chunk is removed from what it sees.
    """
    if not p.stream or p.include_usage:
        return orjson.dumps(p.body), False
    body = dict(p.body)
    opts = dict(body.get("stream_options") or {})
    opts["include_usage"] = True
    body["stream_options"] = opts
    return orjson.dumps(body), True


def parse_priority(raw: str | None, default: str = "normal") -> str:
    """``x-priority``: a class name or an integer (0 = critical ... 4+ = sheddable)."""
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in PRIORITY_CLASSES:
        return value
    try:
        n = int(value)
    except ValueError:
        raise InvalidRequest(
            f"Header 'x-priority' must be one of {', '.join(PRIORITY_CLASSES)} or an integer, "
            f"got {raw[:40]!r}.",
            param="x-priority",
        ) from None
    return _INT_TO_CLASS.get(min(max(n, 0), 4), "sheddable")


def parse_tenant(header: str | None, body: dict[str, Any] | None) -> str:
    """Tenant: ``x-tenant`` header, else the body's ``user``, else ``default``."""
    if header:
        _require(
            len(header) <= 128 and header.isprintable(),
            "Header 'x-tenant' must be at most 128 printable characters.",
            "x-tenant",
        )
        return header
    user = body.get("user") if body else None
    if isinstance(user, str) and user:
        return user[:128]
    return "default"


def parse_deadline_ms(raw: str | None) -> float | None:
    """``x-request-deadline-ms``: how long the client will wait for a start, in seconds."""
    if raw is None or raw == "":
        return None
    try:
        ms = float(raw)
    except ValueError:
        ms = -1.0
    if not 0 < ms <= 86_400_000:
        raise InvalidRequest(
            "Header 'x-request-deadline-ms' must be a positive number of milliseconds, "
            f"got {raw[:40]!r}.",
            param="x-request-deadline-ms",
        )
    return ms / 1000.0
