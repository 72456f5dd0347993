"""Every failure as `application/problem+json`, and the headers every response carries.

One middleware turns domain errors (`shared.errors`), aiohttp's own HTTP errors (unknown route,
wrong method, body too large) and anything unexpected into a problem document; unexpected
errors are logged with their trace id and never show a stack trace to the client.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.state import REQUEST_ID, SETTINGS, STARTED_RESPONSE, TIMER, TRACEPARENT
from gateway.timing import PhaseTimer
from gateway.tracing import current_trace_id, current_traceparent
from shared.errors import (
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RenderflowError,
    Unauthenticated,
    Unavailable,
    ValidationFailed,
)

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://renderflow.dev/problems/"
# An incoming X-Request-Id is kept when it is short and plain; anything else is replaced.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=@-]{0,127}")


class BadRequest(RenderflowError):
    """The request could not be understood."""

    code = "bad_request"
    http_status = 400
    title = "Bad request"


class MethodNotAllowed(RenderflowError):
    """This resource does not support the method."""

    code = "method_not_allowed"
    http_status = 405
    title = "Method not allowed"

    def __init__(self, message: str | None = None, allowed: set[str] | None = None) -> None:
        super().__init__(message)
        self.allowed = sorted(allowed or ())


class RangeNotSatisfiable(RenderflowError):
    """The requested byte range is not within the resource."""

    code = "range_not_satisfiable"
    http_status = 416
    title = "Range not satisfiable"

    def __init__(self, total_bytes: int) -> None:
        super().__init__()
        self.total_bytes = total_bytes


def request_id_of(incoming: str | None) -> str:
    """The request's id: the client's `X-Request-Id` when sane, else a new one."""
    if incoming and _SANE_REQUEST_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


def problem_body(error: RenderflowError, request_id: str, trace_id: str | None) -> dict[str, Any]:
    """The problem document (RFC 9457 members plus Renderflow's) describing `error`."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + error.code,
        "title": error.title,
        "status": error.http_status,
        "detail": error.message,
        "code": error.code,
        "request_id": request_id,
        "trace_id": trace_id,
    }
    if isinstance(error, ValidationFailed) and error.errors:
        body["errors"] = [{"field": e.field, "message": e.message} for e in error.errors]
    return body


def problem_response(error: RenderflowError, request_id: str, trace_id: str | None) -> web.Response:
    """`error` as a problem+json response with the headers its status calls for."""
    headers: dict[str, str] = {}
    if isinstance(error, RateLimited | Unavailable):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    if isinstance(error, Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer realm="renderflow"'
    if isinstance(error, MethodNotAllowed):
        headers["Allow"] = ", ".join(error.allowed)
    if isinstance(error, RangeNotSatisfiable):
        headers["Content-Range"] = f"bytes */{error.total_bytes}"
    return web.Response(
        status=error.http_status,
        body=orjson.dumps(problem_body(error, request_id, trace_id)),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


def _from_http_exception(exc: web.HTTPException) -> RenderflowError:
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("No such resource.")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(f"{exc.method} is not allowed here.", set(exc.allowed_methods))
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge()
    if exc.status == 400:
        return BadRequest(exc.reason)
    error = RenderflowError(exc.reason)
    error.http_status = exc.status
    error.code = re.sub(r"[^a-z0-9]+", "_", exc.reason.lower()).strip("_") or "error"
    error.title = exc.reason
    return error


def _as_error(exc: Exception, request: web.Request) -> RenderflowError:
    where = {"method": request.method, "path": request.path, "request_id": request[REQUEST_ID]}
    if isinstance(exc, web.HTTPException):
        return _from_http_exception(exc)
    if isinstance(exc, RenderflowError):
        if exc.http_status >= 500:
            level = logging.ERROR if exc.http_status == 500 else logging.WARNING
            log.log(level, "request failed", extra={**where, "code": exc.code, "error": exc.message})
        return exc
    log.exception("unexpected error", extra=where)
    return RenderflowError()


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Gives the request its id and timer, and turns whatever the handler raises into a problem."""
    request[REQUEST_ID] = request_id_of(request.headers.get("X-Request-Id"))
    request[TRACEPARENT] = current_traceparent() or ""
    request[TIMER] = PhaseTimer(request.app[SETTINGS].budgets)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = _as_error(exc, request)
    except Exception as exc:
        if request.get(STARTED_RESPONSE):
            # Too late for a problem document: the status line has gone out. Drop the connection.
            log.exception("error after the response started", extra={"request_id": request[REQUEST_ID]})
            raise
        error = _as_error(exc, request)
    return problem_response(error, request[REQUEST_ID], current_trace_id())


async def add_common_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: the request id, trace context and phase timings on every response."""
    request[STARTED_RESPONSE] = True
    request_id = request.get(REQUEST_ID)
    if request_id:
        response.headers["X-Request-Id"] = request_id
    traceparent = request.get(TRACEPARENT)
    if traceparent:
        response.headers["traceparent"] = traceparent
    timer = request.get(TIMER)
    if timer is not None:
        response.headers["Server-Timing"] = timer.server_timing()
