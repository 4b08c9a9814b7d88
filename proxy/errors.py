"""The proxy's error tree and the one function that renders OpenAI-style error bodies.

    ProxyError
    ├── InvalidRequest          400  invalid_request_error   (also a ValueError)
    │   ├── BodyTooLarge        413  invalid_request_error
    │   └── HeaderFieldsTooLarge 431 invalid_request_error
    │   ├── RequestTimeout      408  invalid_request_error   (the client was too slow)
    │   └── ExpectationFailed   417  invalid_request_error
    ├── Unauthorized            401  authentication_error
    ├── ModelNotFound           404  invalid_request_error   code=model_not_found
    ├── NotFound                404  invalid_request_error   (an admin resource: an experiment)
    ├── MethodNotAllowed        405  invalid_request_error
    ├── Shed                    429  rate_limit_error        + Retry-After, x-rightsizer-shed-reason
    ├── NoHealthyBackend        503  service_unavailable     + Retry-After
    ├── ShuttingDown            503  service_unavailable     code=shutdown, + Retry-After
    ├── UpstreamError           502  upstream_error          (also a ConnectionError)
    └── UpstreamTimeout         504  upstream_timeout        (also a TimeoutError)

This module is the only place HTTP statuses for errors are chosen. Messages say what was
wrong; they never carry ``str(exc)`` of an unexpected exception (``ProxyError`` itself is the
500 for those). ``protocol_error`` gives the same body to the errors aiohttp answers itself,
before a request reaches the app (``proxy.server``).
"""

from __future__ import annotations

from typing import ClassVar

import orjson
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong


class ProxyError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    close: ClassVar[bool] = False  # the connection's framing is lost: close it after answering

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, object]:
        return error_body(self.message, self.type, param=self.param, code=self.code)


class InvalidRequest(ProxyError, ValueError):
    status = 400
    type = "invalid_request_error"


class BodyTooLarge(InvalidRequest):
    status = 413


class HeaderFieldsTooLarge(InvalidRequest):
    status = 431


class RequestTimeout(InvalidRequest):
    status = 408
    close = True


class MalformedBody(InvalidRequest):
    close = True


class ExpectationFailed(InvalidRequest):
    status = 417

    def __init__(self) -> None:
        super().__init__("Only 'Expect: 100-continue' is supported.", param="expect")


class Unauthorized(ProxyError):
    status = 401
    type = "authentication_error"


class ModelNotFound(ProxyError, LookupError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, model: str, available: list[str]) -> None:
        shown = ", ".join(available[:20]) or "none"
        super().__init__(
            f"The model '{model}' does not exist or no backend serves it. Available: {shown}.",
            param="model",
            code="model_not_found",
        )


class NotFound(ProxyError, LookupError):
    status = 404
    type = "invalid_request_error"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"


class _RetryAfter(ProxyError):
    def __init__(
        self, message: str, *, retry_after_s: float = 1.0, reason: str, code: str | None = None
    ) -> None:
        super().__init__(message, code=code or reason)
        self.retry_after_s = retry_after_s
        self.reason = reason

    def headers(self) -> dict[str, str]:
        return {
            "Retry-After": str(max(1, round(self.retry_after_s))),
            "x-rightsizer-shed-reason": self.reason,
        }


class Shed(_RetryAfter):
    status = 429
    type = "rate_limit_error"


class NoHealthyBackend(_RetryAfter):
    status = 503
    type = "service_unavailable"


class ShuttingDown(_RetryAfter):
    status = 503
    type = "service_unavailable"

    def __init__(self, message: str = "The proxy is shutting down.") -> None:
        super().__init__(message, reason="shutdown", retry_after_s=1.0)


class UpstreamError(ProxyError, ConnectionError):
    status = 502
    type = "upstream_error"


class UpstreamTimeout(ProxyError, TimeoutError):
    status = 504
    type = "upstream_timeout"


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(err: ProxyError, request_id: str | None = None) -> web.Response:
    headers = err.headers()
    if request_id:
        headers["x-request-id"] = request_id
    resp = web.Response(
        status=err.status,
        body=orjson.dumps(err.body()),
        content_type="application/json",
        headers=headers,
    )
    if err.close:
        resp.force_close()
    return resp


def sse_error_event(err: ProxyError) -> bytes:
    """The final event of a stream that failed after it started."""
    return b"data: " + orjson.dumps(err.body()) + b"\n\n"


def protocol_error(status: int, exc: BaseException | None, message: str | None) -> ProxyError:
    """The error for a request aiohttp could not parse or serve (``status`` is aiohttp's own).

    A header or request line over ``server.max_header_bytes``, or more headers than
    ``server.max_headers``, is 431 (Request Header Fields Too Large, RFC 6585); any other
    unparsable request is 400 naming the kind of problem. The message never quotes what the
    client sent: a malformed header may hold a credential. A failure of the server itself is
    500 (504 for aiohttp's own timeout) without details.
    """
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else "the"
        return HeaderFieldsTooLarge(
            f"A request header or the request line is longer than {limit} bytes (the proxy's "
            "server.max_header_bytes).",
            code="header_too_large",
        )
    if status < 500 and "too many headers" in (message or "").lower():
        return HeaderFieldsTooLarge(
            "Too many request headers (the proxy's server.max_headers).", code="too_many_headers"
        )
    if status < 500:
        return InvalidRequest(
            f"Malformed HTTP request: {_parser_words(exc, message)}.", code="malformed_request"
        )
    if status == 504:
        return UpstreamTimeout("The request timed out.")
    return ProxyError("Internal error while handling the request.")


def _parser_words(exc: BaseException | None, message: str | None) -> str:
    """What aiohttp's parser said was wrong, without the bytes it quotes after it
    ("Invalid header token:\n\n  b'Host x'" -> "Invalid header token")."""
    words = (message or "").split(":\n", 1)[0].split("\n", 1)[0]
    for quote in ("'", '"', "b'"):
        words = words.split(quote, 1)[0]
    words = words.strip().rstrip(":").strip()
    if words and len(words) <= 80 and words.isprintable():
        return words
    return _MALFORMED.get(type(exc).__name__, "malformed HTTP request")


_MALFORMED = {
    "InvalidHeader": "a header is malformed",
    "BadStatusLine": "the request line is malformed",
    "BadHttpMethod": "the request line has an invalid method",
    "InvalidURLError": "the request target (URL) is malformed",
    "TransferEncodingError": "the Transfer-Encoding framing is invalid",
    "ContentLengthError": "the Content-Length is invalid or does not match the body",
    "ContentEncodingError": "the Content-Encoding is invalid",
}
