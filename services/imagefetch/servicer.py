"""The gRPC face of the image-fetch service: protobuf in, domain call, protobuf out. Nothing else."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
from renderflow.v1 import imagefetch_pb2, imagefetch_pb2_grpc

from services.imagefetch.delivery import Deliverer
from services.imagefetch.domain import Delivery, DeliveryOrder, FetchOrder, FetchOutcome, Progress
from services.imagefetch.service import ImageService
from shared.errors import ValidationFailed

SERVICE_NAME: str = imagefetch_pb2.DESCRIPTOR.services_by_name["ImageFetchService"].full_name

# Answer this long before the caller's gRPC deadline, so that a timeout reaches it as a typed
# result rather than as DEADLINE_EXCEEDED.
RESPONSE_MARGIN_S = 0.05

Context = grpc.aio.ServicerContext[Any, Any]


class ImageFetchServicer(imagefetch_pb2_grpc.ImageFetchServiceServicer):
    """Serves ImageFetchService from an ImageService and a Deliverer."""

    def __init__(self, service: ImageService, deliverer: Deliverer) -> None:
        self._service = service
        self._deliverer = deliverer

    async def Fetch(
        self, request: imagefetch_pb2.FetchRequest, context: Context
    ) -> imagefetch_pb2.FetchResult:
        outcome = await self._service.fetch(_order(request), _budget(context))
        return _result(outcome)

    async def FetchWithProgress(
        self, request: imagefetch_pb2.FetchRequest, context: Context
    ) -> AsyncIterator[imagefetch_pb2.FetchProgress]:
        async for update in self._service.watch(_order(request), _budget(context)):
            if isinstance(update, Progress):
                received = imagefetch_pb2.BytesReceived(
                    bytes=update.received, total_bytes=update.total or 0, attempt=update.attempt
                )
                yield imagefetch_pb2.FetchProgress(received=received)
            else:
                yield imagefetch_pb2.FetchProgress(result=_result(update))

    async def FetchMany(
        self, request: imagefetch_pb2.FetchManyRequest, context: Context
    ) -> AsyncIterator[imagefetch_pb2.FetchResult]:
        orders = [_order(item, f"requests[{index}].") for index, item in enumerate(request.requests)]
        async for index, outcome in self._service.fetch_many(orders, request.concurrency, _budget(context)):
            yield _result(outcome, index)

    async def Deliver(
        self, request: imagefetch_pb2.DeliverRequest, context: Context
    ) -> imagefetch_pb2.DeliverResult:
        delivery = await self._deliverer.deliver(_delivery_order(request), _budget(context))
        return _delivery_result(delivery)


def _budget(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else remaining - RESPONSE_MARGIN_S


def _order(request: imagefetch_pb2.FetchRequest, prefix: str = "") -> FetchOrder:
    if request.deadline_ms < 0:
        raise ValidationFailed.field(f"{prefix}deadline_ms", "must not be negative")
    return FetchOrder(
        url=request.url, deadline_s=request.deadline_ms / 1000 or None, no_cache=request.no_cache
    )


def _result(outcome: FetchOutcome, index: int = 0) -> imagefetch_pb2.FetchResult:
    image, failure = outcome.image, outcome.failure
    return imagefetch_pb2.FetchResult(
        url=outcome.url,
        index=index,
        image=None
        if image is None
        else imagefetch_pb2.Image(
            data=image.data,
            content_type=image.content_type,
            width=image.width,
            height=image.height,
            size_bytes=image.size_bytes,
            final_url=image.final_url,
        ),
        # Never the failure's `detail`: it is for this service's log and trace, and may name
        # internal addresses.
        failure=None
        if failure is None
        else imagefetch_pb2.FetchFailure(
            reason=failure.reason, message=failure.message, retryable=failure.retryable
        ),
        cache_hit=outcome.cache_hit,
        attempts=outcome.attempts,
        duration_ms=outcome.duration_ms,
    )


def _delivery_order(request: imagefetch_pb2.DeliverRequest) -> DeliveryOrder:
    if not math.isfinite(request.timeout_s) or request.timeout_s < 0:
        raise ValidationFailed.field("timeout_s", "must be a number of seconds, not negative")
    return DeliveryOrder(
        url=request.url,
        headers=dict(request.headers),
        body=request.body,
        timeout_s=request.timeout_s or None,
    )


def _delivery_result(delivery: Delivery) -> imagefetch_pb2.DeliverResult:
    # Never the delivery's `detail`: it is for this service's log and trace, and may name internal
    # addresses.
    return imagefetch_pb2.DeliverResult(
        outcome=delivery.outcome,
        status=delivery.status,
        latency_ms=delivery.latency_ms,
        retry_after_s=delivery.retry_after_s,
        message=delivery.message,
        response_excerpt=delivery.response_excerpt,
    )
