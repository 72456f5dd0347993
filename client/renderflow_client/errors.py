"""What can go wrong, as exceptions: each answer of Renderflow that is an error is a problem+json
document (RFC 9457) with a stable `code`, a `request_id` and a `trace_id` to quote; the exception
carries them, its field errors, and whether trying again may help (`retryable`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

    from renderflow_client.models import Render


@dataclass(frozen=True)
class FieldError:
    """One invalid field of a request, named by its path (`params.width`, `items[3].prompt`) or by
    the header or parameter (`Idempotency-Key`)."""

    field: str
    message: str


class RenderflowError(Exception):
    """An error of a call to Renderflow."""

    retryable: bool = False
    """Whether the same call may succeed later (after `retry_after`, when given)."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str = "",
        request_id: str | None = None,
        trace_id: str | None = None,
        errors: tuple[FieldError, ...] = (),
        retry_after: float | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        self.trace_id = trace_id
        self.errors = errors
        self.retry_after = retry_after
        self.problem = problem or {}

    def __str__(self) -> str:
        ids = ", ".join(f"{name} {value}" for name, value in self._ids() if value)
        return f"{self.message} ({ids})" if ids else self.message

    def _ids(self) -> list[tuple[str, str | None]]:
        return [("code", self.code), ("request", self.request_id), ("trace", self.trace_id)]


class ApiError(RenderflowError):
    """Renderflow answered with an error (`status`, `code`)."""


class BadRequest(ApiError):
    """400: the request cannot be understood."""


class AuthenticationError(ApiError):
    """401: no API key, or an unknown or revoked one."""


class NotFoundError(ApiError):
    """404: no such resource, or it is another user's (the two look the same)."""


class ConflictError(ApiError):
    """409: the resource is not in a state that allows the call (cancelling a render that
    succeeded, downloading one that has not)."""


class GoneError(NotFoundError):
    """410: the output was deleted (by its user, or past its retention)."""


class PayloadTooLarge(ApiError):
    """413: the body (an upload, a request) is over the server's cap."""


class ValidationError(ApiError):
    """422: the request is invalid; `errors` names each field."""


class RateLimitedError(ApiError):
    """429: the key's submit rate, the user's quota of active renders or of open streams; try
    again after `retry_after`."""

    retryable = True


class ServerError(ApiError):
    """500: a fault of Renderflow (logged under `trace_id`)."""


class UnavailableError(ApiError):
    """503, 504: a service behind the gateway is away or slow; try again after `retry_after`."""

    retryable = True


class ConnectionFailed(RenderflowError):
    """The gateway could not be reached, or the connection broke before an answer."""

    retryable = True


class WaitTimeout(RenderflowError):
    """A wait ended before the render did; `render` is how it stood then (it goes on)."""

    retryable = True

    def __init__(self, message: str, render: Render) -> None:
        super().__init__(message, trace_id=render.trace_id or None)
        self.render = render


class RenderFailed(RenderflowError):
    """A render waited for ended without an output: failed, cancelled or expired. `render` has
    its `error` (code, reason, message)."""

    def __init__(self, render: Render) -> None:
        error = render.error
        detail = f"{error.code}/{error.reason}: {error.message}" if error else "no error given"
        super().__init__(
            f"render {render.id} {render.status} ({detail})",
            code=error.code if error else "",
            trace_id=render.trace_id or None,
        )
        self.render = render
        self.retryable = bool(error and error.retryable)


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    410: GoneError,
    413: PayloadTooLarge,
    422: ValidationError,
    429: RateLimitedError,
    500: ServerError,
    503: UnavailableError,
    504: UnavailableError,
}


def error_from_response(response: httpx.Response, body: bytes) -> ApiError:
    """The exception an error answer stands for, from its problem document when it has one."""
    problem: dict[str, Any] = {}
    if response.headers.get("content-type", "").split(";")[0].strip().endswith("json"):
        try:
            parsed = json.loads(body)
            problem = parsed if isinstance(parsed, dict) else {}
        except ValueError:
            problem = {}
    kind = _BY_STATUS.get(response.status_code, ServerError if response.status_code >= 500 else ApiError)
    message = str(
        problem.get("detail") or problem.get("title") or body[:200].decode(errors="replace").strip()
    )
    errors = tuple(
        FieldError(str(e.get("field", "")), str(e.get("message", "")))
        for e in problem.get("errors") or ()
        if isinstance(e, dict)
    )
    return kind(
        message or f"HTTP {response.status_code}",
        status=response.status_code,
        code=str(problem.get("code") or ""),
        request_id=problem.get("request_id") or response.headers.get("x-request-id"),
        trace_id=problem.get("trace_id"),
        errors=errors,
        retry_after=retry_after(response),
        problem=problem,
    )


def retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After of delta-seconds (Renderflow sends no dates), or None."""
    value = response.headers.get("retry-after", "").strip()
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
