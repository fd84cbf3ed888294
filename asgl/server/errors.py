"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every error the server returns, native routes included, uses this body, so one client
parser handles all of them. Handlers raise `ApiError` (or the engine's `InvalidRequest`);
the error middleware turns either into a response.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Optional

import msgspec
from aiohttp import web

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
# A client's own request id is echoed only if it is short and plain (it goes into the log).
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

# OpenAI's error types by status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorBody(msgspec.Struct):
    error: ErrorInfo


class ApiError(Exception):
    """Raise from a handler to answer with an error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def bad_request(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param)


def error_body(status: int, message: str, param: Optional[str] = None,
               code: Optional[str] = None) -> ErrorBody:
    return ErrorBody(ErrorInfo(message=message, type=_TYPES.get(status, "error"),
                               param=param, code=code))


_encode = msgspec.json.Encoder().encode


def classify(exc: BaseException) -> Optional[ApiError]:
    """The client-facing error for an exception we expect, or None for a bug."""
    from asgl.engine.contracts.errors import EngineNotRunning
    from asgl.engine.contracts.errors import InvalidRequest

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc), exc.param)
    if isinstance(exc, EngineNotRunning):
        return ApiError(503, "the engine is not running (starting or shutting down)",
                        headers={"Retry-After": "1"})
    return None


def error_response(status: int, message: str, param: Optional[str] = None,
                   code: Optional[str] = None,
                   headers: Optional[dict[str, str]] = None) -> web.Response:
    return web.Response(status=status, body=_encode(error_body(status, message, param, code)),
                        content_type="application/json", headers=headers)


def request_id(request: web.Request) -> str:
    """The id that ties a failed request's response to its log lines: the client's
    X-Request-Id when it is plain, else a fresh one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex


def internal_error(request: web.Request, exc: BaseException) -> web.Response:
    """A 500 for a bug (never a client's fault): the request id in the body and in a header,
    the traceback in the log under the same id. The server goes on serving."""
    rid = request_id(request)
    logger.error("internal error on %s %s (request id %s)", request.method, request.path, rid,
                 exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__} (request id {rid})",
                          code="internal_error", headers={REQUEST_ID_HEADER: rid})
