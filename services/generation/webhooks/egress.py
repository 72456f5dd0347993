"""The generation service's gRPC edge towards the image fetcher for webhooks: every delivery is a
POST the image fetcher makes (`Deliver`), behind its SSRF guard."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from renderflow.v1 import imagefetch_pb2, imagefetch_pb2_grpc

from shared.rpc_errors import rpc_errors

_RPC_MARGIN_S = 2.0
"""How much longer than the attempt the call may take (the image fetcher's own timeout fires first)."""


class ImageFetchEgress:
    """`await egress(url, headers, body, timeout_s)`: one delivery attempt."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = imagefetch_pb2_grpc.ImageFetchServiceStub(channel)

    async def __call__(
        self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> imagefetch_pb2.DeliverResult:
        request = imagefetch_pb2.DeliverRequest(
            url=url, headers=dict(headers), body=body, timeout_s=timeout_s
        )
        with rpc_errors():
            result: imagefetch_pb2.DeliverResult = await self._stub.Deliver(
                request, timeout=timeout_s + _RPC_MARGIN_S
            )
        return result
