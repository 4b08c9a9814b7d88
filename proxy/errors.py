"""The proxy's error tree and the one function that renders OpenAI-style error bodies.

    ProxyError
    ├── InvalidRequest          400  invalid_request_error   (also a ValueError)
    │   └── BodyTooLarge        413  invalid_request_error
    ├── Unauthorized            401  authentication_error
    ├── ModelNotFound           404  invalid_request_error   code=model_not_found
    ├── MethodNotAllowed        405  invalid_request_error
    ├── Shed                    429  rate_limit_error        + Retry-After, x-rightsizer-shed-reason
    ├── NoHealthyBackend        503  service_unavailable     + Retry-After
    ├── UpstreamError           502  upstream_error          (also a ConnectionError)
    └── UpstreamTimeout         504  upstream_timeout        (also a TimeoutError)

This module is the only place HTTP statuses for errors are chosen. Messages say what was
wrong; they never carry ``str(exc)`` of an unexpected exception.
"""

from __future__ import annotations

from typing import ClassVar

import orjson
from aiohttp import web


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
