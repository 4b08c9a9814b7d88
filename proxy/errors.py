"""The proxy's error tree and the one function that renders OpenAI-style error bodies.

    ProxyError
    ├── InvalidRequest          400  invalid_request_error   (also a ValueError)
    │   ├── BodyTooLarge        413  invalid_request_error
    │   └── HeaderFieldsTooLarge 431 invalid_request_error
    ├── Unauthorized            401  authentication_error
    ├── ModelNotFound           404  invalid_request_error   code=model_not_found
    ├── MethodNotAllowed        405  invalid_request_error
    ├── Shed                    429  rate_limit_error        + Retry-After, x-rightsizer-shed-reason
    ├── NoHealthyBackend        503  service_unavailable     + Retry-After
    ├── UpstreamError           502  upstream_error          (also a ConnectionError)
    └── UpstreamTimeout         504  upstream_timeout        (also a TimeoutError)

This module is the only place HTTP statuses for errors are chosen. Messages say what was
wrong; they never carry ``str(exc)`` of an unexpected exception. ``JsonErrorRunner`` extends
the same body to the errors aiohttp answers itself, before a request reaches the app.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, ClassVar

import orjson
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler


class ProxyError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"

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
    return web.Response(
        status=err.status,
        body=orjson.dumps(err.body()),
        content_type="application/json",
        headers=headers,
    )


def sse_error_event(err: ProxyError) -> bytes:
    """The final event of a stream that failed after it started."""
    return b"data: " + orjson.dumps(err.body()) + b"\n\n"


def protocol_error(status: int, exc: BaseException | None, message: str | None) -> ProxyError:
    """The error for a request aiohttp could not parse or serve (``status`` is aiohttp's own).

    A header or request line over ``server.max_header_bytes``, or more headers than
    ``server.max_headers``, is 431 (Request Header Fields Too Large, RFC 6585); any other
    unparsable request is 400 with the parser's own words, which say what and where
    (``Invalid header token: b'Host x'``); a failure of the server itself is 500 (504 for
    aiohttp's own timeout) without details.
    """
    if isinstance(exc, LineTooLong):
        line, limit = (*exc.args, "", "")[:2]
        return HeaderFieldsTooLarge(
            f"a request header or the request line is longer than {limit} bytes (the proxy's "
            f"server.max_header_bytes): {str(line)[:60]}"
        )
    if status < 500 and "too many headers" in (message or "").lower():
        return HeaderFieldsTooLarge("too many request headers (the proxy's server.max_headers)")
    if status < 500:
        return InvalidRequest(f"malformed HTTP request: {message or HTTPStatus(status).phrase}")
    if status == 504:
        return UpstreamTimeout("the request timed out")
    return ProxyError("internal error while handling the request")


class _JsonErrorHandler(RequestHandler):
    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises once a reply began
        resp = error_response(protocol_error(status, exc, message))
        resp.force_close()  # as aiohttp does: the connection's framing may be lost
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer a request aiohttp rejects before the app
    sees it (a malformed request line or header, a header over the limits) with the
    OpenAI-style JSON body every other error of the proxy has, where aiohttp answers
    ``text/plain``. aiohttp has no hook for that answer but ``RequestHandler.handle_error``;
    its ``Server`` makes the handlers, so the server the app made is given the subclass
    that makes ours (``tests/integration/test_proxy_emulated.py`` checks it end to end).
    """

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer
        return server
