"""The shared gRPC bootstrap: domain errors cross the wire typed, unexpected ones become INTERNAL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.trace import SpanKind

from shared.errors import NotFound, RateLimited, RenderflowError, Unavailable, ValidationFailed
from shared.grpc_client import create_channel
from shared.grpc_server import create_server, start
from shared.rpc_errors import rpc_errors
from tests.support.observed_stack import Recorder

_RAISES: dict[str, Exception] = {
    "not_found": NotFound("no such render"),
    "invalid": ValidationFailed.field("params.width", "must be at most 2048"),
    "limited": RateLimited(retry_after=2.5),
    "bug": KeyError("boom"),
    "unavailable": Unavailable("the artifact store could not read the output"),
}
_CALLS: list[str] = []


async def _unary(request: bytes, context: Any) -> bytes:
    _CALLS.append(request.decode())
    raise _RAISES[request.decode()]


async def _stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield b"first"
    raise _RAISES[request.decode()]


@pytest.fixture
async def target() -> AsyncIterator[str]:
    handle = create_server(["test.Errors"], token=None)
    identity = lambda b: b  # noqa: E731
    handle.server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Errors",
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(_unary, identity, identity),
                    "Stream": grpc.unary_stream_rpc_method_handler(_stream, identity, identity),
                },
            )
        ]
    )
    port = await start(handle, "127.0.0.1:0")
    yield f"127.0.0.1:{port}"
    await handle.server.stop(None)


async def _call_unary(target: str, what: str) -> None:
    async with create_channel(target) as channel:
        method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Errors/Unary")
        with rpc_errors():
            await method(what.encode())


async def test_domain_errors_arrive_typed(target: str) -> None:
    with pytest.raises(NotFound, match="no such render"):
        await _call_unary(target, "not_found")
    with pytest.raises(ValidationFailed) as invalid:
        await _call_unary(target, "invalid")
    assert [(e.field, e.message) for e in invalid.value.errors] == [("params.width", "must be at most 2048")]
    with pytest.raises(RateLimited) as limited:
        await _call_unary(target, "limited")
    assert limited.value.retry_after == 2.5


async def test_a_handler_s_own_unavailable_is_answered_once_not_retried(target: str) -> None:
    # The channel retries UNAVAILABLE for peers that never got the call; a handler that waited for
    # a store and gave up must not be run again (and its caller kept waiting as many times).
    _CALLS.clear()
    with pytest.raises(Unavailable, match="could not read the output"):
        await _call_unary(target, "unavailable")
    assert _CALLS == ["unavailable"]


async def test_unexpected_error_is_internal_without_details(target: str) -> None:
    with pytest.raises(RenderflowError) as caught:
        await _call_unary(target, "bug")
    assert type(caught.value) is RenderflowError
    assert "boom" not in caught.value.message


async def test_stream_error_after_items(target: str) -> None:
    received: list[bytes] = []
    async with create_channel(target) as channel:
        method: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream("/test.Errors/Stream")
        with pytest.raises(NotFound), rpc_errors():
            async for item in method(b"not_found"):
                received.append(item)
    assert received == [b"first"]


async def test_health_reports_serving(target: str) -> None:
    async with create_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service="test.Errors"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_failed_call_has_a_client_span_and_a_successful_one_only_its_servers(
    target: str, recorder: Recorder
) -> None:
    recorder.spans.clear()
    with pytest.raises(NotFound):
        await _call_unary(target, "not_found")
    async with create_channel(target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        assert (await check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
    async with create_channel("127.0.0.1:1") as channel:  # nothing listens there
        with pytest.raises(grpc.aio.AioRpcError):
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    finished = [(s.name, s.kind, (s.attributes or {}).get("rpc.grpc.status_code")) for s in recorder.spans]
    not_found, unavailable = grpc.StatusCode.NOT_FOUND.value[0], grpc.StatusCode.UNAVAILABLE.value[0]
    assert sorted(finished, key=str) == sorted(
        [
            ("/test.Errors/Unary", SpanKind.SERVER, not_found),
            ("/test.Errors/Unary", SpanKind.CLIENT, not_found),
            ("/grpc.health.v1.Health/Check", SpanKind.SERVER, 0),
            ("/grpc.health.v1.Health/Check", SpanKind.CLIENT, unavailable),
        ],
        key=str,
    )
