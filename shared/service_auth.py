"""The service token: every call to a Renderflow gRPC service must carry it, as the metadata
`authorization: Bearer <RENDERFLOW_SERVICE_TOKEN>`.

The services trust the user id inside each request, so who may call them at all is what keeps one
user's renders and keys from another: a process that reaches a service port without the token can
call nothing but the exempt services below. Servers check it in `ServiceAuthInterceptor`
(`shared.grpc_server`), clients attach it in `client_interceptors` (`shared.grpc_client`).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from shared.errors import RenderflowError
from shared.rpc_errors import to_status

METADATA_KEY = "authorization"
TOKEN_PREFIX = "rfsvc_"
EXEMPT = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME})
"""Services callable without the token: the health check (probes and the supervisor hold no
token) and server reflection, which describes the schema and cannot call anything."""


def new_service_token() -> str:
    """A random token (its prefix lets the test suite find one written where it must not be)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class ServiceTokenRefused(RenderflowError):
    """The call does not carry the service token."""

    # UNAUTHENTICATED to any gRPC caller; but with the code `internal`, Renderflow's own clients
    # (`shared.rpc_errors`) take it for a fault of the deployment, which the gateway answers with
    # a logged 500, never a 401 telling an end user that their API key is wrong.
    grpc_status = grpc.StatusCode.UNAUTHENTICATED


class ServiceAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call of a non-exempt service without the token, UNAUTHENTICATED.

    It decides before the call is dispatched: any kind of call is covered (client-streaming ones
    too), and an authorized call runs its handler as it is, without another wrapper."""

    def __init__(self, token: str) -> None:
        self._expected = _bearer(token).encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.split("/")[1] in EXEMPT:
            return handler
        presented = _presented(handler_call_details.invocation_metadata)
        if presented is not None and hmac.compare_digest(presented.encode(), self._expected):
            return handler
        if presented is None:
            message = f"missing service token: send the metadata '{METADATA_KEY}: Bearer <token>'"
        else:
            message = "wrong service token: it is not this deployment's RENDERFLOW_SERVICE_TOKEN"
        return _refusing(handler, ServiceTokenRefused(message))


def _bearer(token: str) -> str:
    return f"Bearer {token}"


def _presented(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == METADATA_KEY:
            return value if isinstance(value, str) else ""
    return None


def _refusing(handler: grpc.RpcMethodHandler[Any, Any], error: RenderflowError) -> Any:
    """A handler of the same kind as `handler` that aborts with `error`'s status."""
    status = to_status(error)

    async def unary(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)

    async def stream(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await context.abort(status.code, status.details, status.trailing_metadata)
        yield  # never reached: an async generator, like every stream handler the interceptors wrap

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    behaviour = stream if handler.response_streaming else unary
    return make(behaviour, handler.request_deserializer, handler.response_serializer)


class _Attach:
    """Sets the token's metadata on each call (a channel takes one interceptor per kind of call)."""

    def __init__(self, token: str) -> None:
        self._value = _bearer(token)

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata[METADATA_KEY] = self._value
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryUnary(_Attach, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _UnaryStream(_Attach, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _StreamUnary(_Attach, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_token(details), requests)


class _StreamStream(_Attach, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_token(details), requests)


def client_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that make every call of a channel carry `token`.

    Metadata, not call credentials: grpc sends call credentials over secure channels only, and the
    services listen in plain HTTP/2 (inside the cluster's network)."""
    return [_UnaryUnary(token), _UnaryStream(token), _StreamUnary(token), _StreamStream(token)]
