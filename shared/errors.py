"""The one error hierarchy of Renderflow, and its mapping to gRPC status codes and HTTP.

Storage errors become these at the storage edge; these become gRPC statuses in one server
interceptor (`shared.grpc_server`); gRPC statuses become these again in one client helper
(`shared.grpc_client`); the gateway renders them as problem+json in one middleware.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class FieldError:
    """One invalid input field, by its path in the request (`params.width`, `items[3].prompt`)."""

    field: str
    message: str


class RenderflowError(Exception):
    """Something went wrong inside Renderflow."""

    code = "internal"
    grpc_status = grpc.StatusCode.INTERNAL
    http_status = 500
    title = "Internal error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or self.title).strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class Unauthenticated(RenderflowError):
    """A valid API key is required."""

    code = "unauthenticated"
    grpc_status = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    title = "Unauthenticated"


class NotFound(RenderflowError):
    """No such resource (or it belongs to someone else)."""

    code = "not_found"
    grpc_status = grpc.StatusCode.NOT_FOUND
    http_status = 404
    title = "Not found"


class Conflict(RenderflowError):
    """The resource already exists, or is in a state that does not allow this."""

    code = "conflict"
    grpc_status = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409
    title = "Conflict"


class FailedPrecondition(Conflict):
    """The resource is not in a state that allows this."""

    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


class Gone(NotFound):
    """The resource existed and has been deleted (an output past its retention, or deleted)."""

    code = "gone"
    http_status = 410
    title = "Gone"


class PayloadTooLarge(RenderflowError):
    """The request body is too large."""

    code = "payload_too_large"
    grpc_status = grpc.StatusCode.OUT_OF_RANGE
    http_status = 413
    title = "Payload too large"


class RequestTimeout(RenderflowError):
    """The request did not arrive in time."""

    code = "request_timeout"
    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 408
    title = "Request timeout"


class ValidationFailed(RenderflowError):
    """The request is invalid."""

    code = "validation_failed"
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 422
    title = "Validation failed"

    def __init__(self, message: str | None = None, errors: list[FieldError] | None = None) -> None:
        super().__init__(message)
        self.errors = list(errors or [])

    @classmethod
    def field(cls, field: str, message: str) -> ValidationFailed:
        return cls(f"{field}: {message}", [FieldError(field, message)])


class RateLimited(RenderflowError):
    """Too many requests; try again after `retry_after` seconds."""

    code = "rate_limited"
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    title = "Too many requests"

    def __init__(self, message: str | None = None, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QuotaExceeded(RateLimited):
    """Too many renders queued or running; try again when some have finished."""

    code = "quota_exceeded"
    title = "Quota exceeded"


class Unavailable(RenderflowError):
    """A service Renderflow depends on is unavailable; try again shortly."""

    code = "unavailable"
    grpc_status = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    title = "Service unavailable"

    def __init__(self, message: str | None = None, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(Unavailable):
    """The operation did not finish in time."""

    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    title = "Deadline exceeded"


ERROR_TYPES: tuple[type[RenderflowError], ...] = (
    RenderflowError,
    Unauthenticated,
    NotFound,
    Gone,
    Conflict,
    FailedPrecondition,
    PayloadTooLarge,
    RequestTimeout,
    ValidationFailed,
    RateLimited,
    QuotaExceeded,
    Unavailable,
    DeadlineExceeded,
)

# A status with no Renderflow error behind it (from grpc itself, a proxy, a dead peer).
_BY_STATUS: dict[grpc.StatusCode, type[RenderflowError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: NotFound,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: Conflict,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Conflict,
    grpc.StatusCode.OUT_OF_RANGE: PayloadTooLarge,
    grpc.StatusCode.INVALID_ARGUMENT: ValidationFailed,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimited,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Unavailable,
}


def error_type(code: str, status: grpc.StatusCode) -> type[RenderflowError]:
    """The error class for a Renderflow error code, falling back on the gRPC status."""
    candidates = [t for t in ERROR_TYPES if t.code == code]
    for candidate in candidates:
        if candidate.grpc_status == status:
            return candidate
    if candidates:
        return candidates[0]
    return _BY_STATUS.get(status, RenderflowError)
