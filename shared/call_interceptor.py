"""A base for gRPC server interceptors that run code around each call, unary or server-streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Enters `around(method, context)` for the whole of every call it intercepts (a server stream:
    until its last message), so that a subclass writes its logic once, not once per call kind."""

    def around(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], *, streaming: bool
    ) -> AbstractAsyncContextManager[None]:
        """The context entered around one call of `method` (`/package.Service/Method`); `streaming`
        for a call that answers with a stream."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        around = self.around
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                async with around(method, context, streaming=False):
                    return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                async with around(method, context, streaming=True):
                    async for item in inner_us(request, context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
