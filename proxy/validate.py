"""Request parsing and validation: what the proxy must know before routing, with 4xx errors
that say what was wrong. Everything else in the body is the backend's to validate.

Also the two things a request carries upstream besides its body: the normalised ``/v1`` path
(``upstream_path``: nothing outside ``/v1/`` is ever reached through the proxy) and the
forwarded headers (``upstream_headers``: end-to-end headers pass, hop-by-hop headers, the
proxy's own controls and credentials do not).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

from .config import PRIORITY_CLASSES
from .errors import InvalidRequest
from .routing.prefix_index import CHARS_PER_TOKEN

_INT_TO_CLASS = dict(enumerate(PRIORITY_CLASSES))
CLASS_INDEX = {name: i for i, name in enumerate(PRIORITY_CLASSES)}


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedRequest:
    body: dict[str, Any]
    raw: bytes  # the body as the client sent it
    model: str
    stream: bool
    include_usage: bool  # the client asked for the usage chunk itself
    has_stream_options: bool
    max_tokens: int | None
    prompt_chars: int

    @property
    def est_prompt_tokens(self) -> int:
        return max(1, self.prompt_chars // CHARS_PER_TOKEN)


def _require(cond: bool, message: str, param: str) -> None:
    if not cond:
        raise InvalidRequest(message, param=param)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parts_chars(parts: list[Any], i: int) -> int:
    """Characters of a content-part array; a text part's ``text`` must be a string."""
    chars = 0
    for j, p in enumerate(parts):
        _require(
            isinstance(p, dict),
            f"'messages[{i}].content[{j}]' must be an object.",
            f"messages[{i}].content[{j}]",
        )
        text = p.get("text")
        if text is None and p.get("type") != "text":
            continue  # an image, audio or file part: no text to count
        _require(
            isinstance(text, str),
            f"'messages[{i}].content[{j}].text' must be a string.",
            f"messages[{i}].content[{j}].text",
        )
        chars += len(text)
    return chars


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
            chars += _parts_chars(content, i)
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
        return CHARS_PER_TOKEN * len(prompt)
    if ok and all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
        return CHARS_PER_TOKEN * sum(len(p) for p in prompt)
    raise InvalidRequest(
        "'prompt' must be a string, an array of strings, an array of token ids "
        "or an array of token-id arrays.",
        param="prompt",
    )


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def parse_body(raw: bytes, endpoint: str) -> ParsedRequest:
    """Parse and check a chat/completions body. ``endpoint``: "chat" or "completions"."""
    body = parse_json_object(raw)
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
        raw=raw,
        model=str(model),
        stream=bool(stream),
        include_usage=include_usage,
        has_stream_options="stream_options" in body,
        max_tokens=max_tokens,
        prompt_chars=chars,
    )


_USAGE_OPTION = b'{"stream_options":{"include_usage":true},'


def upstream_body(p: ParsedRequest) -> tuple[bytes, bool]:
    """The body to send upstream, and whether the usage chunk must be stripped on the way back.

    For streams, the proxy always asks for ``stream_options.include_usage`` so token counts are
    exact; when the client didn't ask, the extra usage chunk is removed from what it sees.
    The client's bytes are forwarded unchanged when nothing is added; the option is spliced in
    front of the body's first key when the body has no ``stream_options`` (no re-encoding).
    """
    if not p.stream or p.include_usage:
        return p.raw, False
    if not p.has_stream_options:
        raw = p.raw.lstrip()
        if raw.startswith(b"{"):
            return _USAGE_OPTION + raw[1:], True
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
    if value in CLASS_INDEX:
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


def cap_priority(priority: str, ceiling: str) -> str:
    """``priority`` lowered to ``ceiling`` when it asks for more."""
    return priority if CLASS_INDEX[priority] >= CLASS_INDEX[ceiling] else ceiling


def user_tenant(user: str) -> str:
    """The tenant name for a body's ``user`` field: a digest, never the raw value (it is a
    client-chosen string: an e-mail address, a session id)."""
    digest = hashlib.blake2b(user.encode("utf-8", "surrogateescape"), digest_size=6).hexdigest()
    return f"user-{digest}"


def parse_tenant(header: str | None, body: Mapping[str, Any] | None) -> str:
    """Tenant: ``x-tenant`` header, else a digest of the body's ``user``, else ``default``."""
    if header:
        _require(
            len(header) <= 128 and header.isprintable(),
            "Header 'x-tenant' must be at most 128 printable characters.",
            "x-tenant",
        )
        return header
    user = body.get("user") if body else None
    if isinstance(user, str) and user:
        return user_tenant(user)
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


def upstream_path(raw_path: str, query: str = "") -> str:
    """The client's ``/v1/...`` path, checked to stay under ``/v1/`` however loosely a backend
    might read it: percent-decoded once as strict UTF-8 (an overlong or invalid sequence is
    refused), then no dot segment (also ``..;param``, as Tomcat-style servers read it), no empty
    segment, no backslash, no control character, and no ``%`` left (a double-encoded dot or
    slash becomes one at a server that decodes twice). Nginx and Envoy normalise or refuse
    such paths; a proxy that forwards them lets clients reach the backend's other endpoints
    with the backend's credentials. Raises ``InvalidRequest`` (400) otherwise. ``query`` is
    forwarded as the client sent it (still encoded)."""
    try:
        decoded = unquote(raw_path, errors="strict") if "%" in raw_path else raw_path
    except UnicodeDecodeError:
        decoded = "\x00"  # not UTF-8 once decoded: refused below
    segments = [seg.split(";", 1)[0] for seg in decoded.split("/")[1:]]
    bad = (
        not decoded.startswith("/v1/")
        or any(seg in ("", ".", "..") for seg in segments)
        or "\\" in decoded
        or "%" in decoded
        or not decoded.isprintable()
    )
    if bad:
        raise InvalidRequest(
            "The path must stay under /v1/ (no '.', '..' or empty segments, no backslash, no "
            "double percent-encoding, valid UTF-8).",
            param="path",
        )
    return raw_path + (f"?{query}" if query else "")


HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "trailers", "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding",
     "content-encoding", "expect", "proxy-connection", "authorization"}
)  # fmt: skip
"""Request headers never forwarded as they came: hop-by-hop (RFC 9110 §7.6.1), the ones the
proxy sets itself (host, length, ``accept-encoding: identity``; ``content-encoding``: the proxy
decodes a compressed request body and sends it plain), ``expect``, and credentials (the
transport adds the backend's key, or the client's where ``forward_client_auth``)."""

PROXY_CONTROLS = frozenset({"x-priority", "x-tenant", "x-request-deadline-ms"})


def upstream_headers(
    headers: Iterable[tuple[str, str]],
    *,
    request_id: str,
    deny: frozenset[str] = frozenset(),
    json_body: bool = True,
) -> dict[str, str]:
    """End-to-end client headers to forward (lower-cased names), plus the proxy's own.

    Dropped: hop-by-hop headers, those named by ``connection``, the proxy's controls
    (``x-priority``, ``x-tenant``, ``x-request-deadline-ms``, ``x-rightsizer-*``), ``deny``
    and ``authorization`` (the transport sets it per backend). ``json_body``: the body sent is
    the proxy's JSON (inference), so the content type is set, not forwarded.
    """
    out: dict[str, str] = {}
    named: set[str] = set()
    for name, value in headers:
        k = name.lower()
        if k == "connection":
            named.update(t.strip().lower() for t in value.split(","))
        if k in HOP_BY_HOP or k in PROXY_CONTROLS or k in deny or k.startswith("x-rightsizer-"):
            continue
        out[k] = value if k not in out else f"{out[k]}, {value}"
    for k in named:
        out.pop(k, None)
    out["x-request-id"] = request_id
    if json_body:
        out["content-type"] = "application/json"
    out["accept-encoding"] = "identity"
    return out
