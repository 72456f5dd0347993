"""Domain errors to gRPC statuses and back, with the error code and field errors as rich details.

A status carries a `google.rpc.ErrorInfo` (reason = the Renderflow error code, metadata such as
`retry_after`) and, for invalid input, a `google.rpc.BadRequest` listing each field.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from shared.errors import (
    FieldError,
    RateLimited,
    RenderflowError,
    Unavailable,
    ValidationFailed,
    error_type,
)

ERROR_DOMAIN = "renderflow.dev"


def to_status(error: RenderflowError) -> grpc.Status:
    """The gRPC status (code, message, trailing details) that carries `error`."""
    info = error_details_pb2.ErrorInfo(reason=error.code, domain=ERROR_DOMAIN)
    if isinstance(error, RateLimited | Unavailable):
        info.metadata["retry_after"] = f"{error.retry_after:g}"
    details = [info]
    if isinstance(error, ValidationFailed) and error.errors:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=e.field, description=e.message)
                    for e in error.errors
                ]
            )
        )
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = status_pb2.Status(
        code=getattr(code_pb2, error.grpc_status.name),
        message=error.message,
        details=packed,
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


def from_rpc_error(error: grpc.aio.AioRpcError) -> RenderflowError:
    """The domain error a failed call stands for; statuses from outside Renderflow map by code."""
    status = _status_details(error)
    code = ""
    retry_after: float | None = None
    fields: list[FieldError] = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            code = info.reason
            if "retry_after" in info.metadata:
                retry_after = float(info.metadata["retry_after"])
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [FieldError(v.field, v.description) for v in bad.field_violations]
    kind = error_type(code, error.code())
    message = error.details() or None
    if not code and kind is not RenderflowError:
        # A status raised by grpc itself (peer down, deadline): keep its text for logs only.
        message = None
    result: RenderflowError
    if issubclass(kind, ValidationFailed):
        result = kind(message, fields)
    elif issubclass(kind, RateLimited | Unavailable):
        result = kind(message, retry_after if retry_after is not None else 1.0)
    else:
        result = kind(message)
    return result


def _status_details(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    for key, value in error.trailing_metadata() or ():
        if key == rpc_status.GRPC_DETAILS_METADATA_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


@contextmanager
def rpc_errors() -> Iterator[None]:
    """Turns a failed gRPC call inside the block into the domain error it stands for."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc
