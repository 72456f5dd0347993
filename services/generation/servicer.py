"""GenerationService over gRPC: protobuf in, one domain call, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from renderflow.v1 import generation_pb2 as pb
from renderflow.v1 import generation_pb2_grpc as pb_grpc
from renderflow.v1 import metadata_pb2

from services.generation.domain import (
    TIMING_NAMES,
    Batch,
    Event,
    Params,
    Reference,
    Render,
    RenderError,
    RenderFilter,
    RenderSpec,
    Submission,
    Webhook,
)
from services.generation.service import Renders
from services.generation.uploads.api import Uploads
from services.generation.uploads.store import Upload
from services.generation.webhooks.api import Webhooks
from services.generation.webhooks.messages import delivery_pb, endpoint_pb, secret_pb
from shared.errors import ValidationFailed
from shared.protobuf_time import timestamp

Context = Any  # grpc.aio.ServicerContext, unused by these handlers

_KINDS = {pb.RENDER_KIND_IMAGE: "image", pb.RENDER_KIND_VIDEO: "video"}
_KIND_PB = {name: value for value, name in _KINDS.items()}
_STATUS_PB = {
    "queued": pb.RENDER_STATUS_QUEUED,
    "running": pb.RENDER_STATUS_RUNNING,
    "succeeded": pb.RENDER_STATUS_SUCCEEDED,
    "failed": pb.RENDER_STATUS_FAILED,
    "cancelled": pb.RENDER_STATUS_CANCELLED,
    "expired": pb.RENDER_STATUS_EXPIRED,
}
_STATUS = {value: name for name, value in _STATUS_PB.items()}


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """Translates each RPC to a call of `Renders` (or, for webhooks and uploads, `Webhooks` and
    `Uploads`)."""

    def __init__(self, renders: Renders, webhooks: Webhooks, uploads: Uploads) -> None:
        self._renders = renders
        self._webhooks = webhooks
        self._uploads = uploads

    # Uploads

    async def CreateUpload(
        self, request_iterator: AsyncIterator[pb.UploadChunk], context: Context
    ) -> pb.Upload:
        first = await anext(request_iterator, None)
        if first is None or not first.user_id:
            raise ValidationFailed.field("user_id", "the first chunk names the user")

        async def data() -> AsyncIterator[bytes]:
            yield first.data
            async for chunk in request_iterator:
                yield chunk.data

        return upload_pb(await self._uploads.create(first.user_id, data()))

    async def GetUpload(self, request: pb.UploadRequest, context: Context) -> pb.Upload:
        return upload_pb(await self._uploads.get(request.user_id, request.upload_id))

    async def DeleteUpload(self, request: pb.UploadRequest, context: Context) -> pb.Upload:
        return upload_pb(await self._uploads.delete(request.user_id, request.upload_id))

    # Webhooks

    async def CreateWebhookEndpoint(
        self, request: pb.CreateWebhookEndpointRequest, context: Context
    ) -> pb.WebhookEndpoint:
        endpoint = await self._webhooks.create_endpoint(
            request.user_id, request.project, request.url, list(request.events), request.description
        )
        return endpoint_pb(endpoint)

    async def ListWebhookEndpoints(
        self, request: pb.ListWebhookEndpointsRequest, context: Context
    ) -> pb.ListWebhookEndpointsResponse:
        endpoints = await self._webhooks.endpoints(request.user_id, request.project)
        return pb.ListWebhookEndpointsResponse(endpoints=[endpoint_pb(e) for e in endpoints])

    async def GetWebhookEndpoint(
        self, request: pb.WebhookEndpointRequest, context: Context
    ) -> pb.WebhookEndpoint:
        return endpoint_pb(
            await self._webhooks.endpoint(request.user_id, request.project, request.endpoint_id)
        )

    async def UpdateWebhookEndpoint(
        self, request: pb.UpdateWebhookEndpointRequest, context: Context
    ) -> pb.WebhookEndpoint:
        endpoint = await self._webhooks.update_endpoint(
            request.user_id,
            request.project,
            request.endpoint_id,
            url=request.url if request.HasField("url") else None,
            events=list(request.events) if request.set_events else None,
            enabled=request.enabled if request.HasField("enabled") else None,
            description=request.description if request.HasField("description") else None,
        )
        return endpoint_pb(endpoint)

    async def DeleteWebhookEndpoint(
        self, request: pb.WebhookEndpointRequest, context: Context
    ) -> pb.WebhookEndpoint:
        deleted = await self._webhooks.delete_endpoint(request.user_id, request.project, request.endpoint_id)
        return endpoint_pb(deleted)

    async def RotateWebhookSecret(
        self, request: pb.RotateWebhookSecretRequest, context: Context
    ) -> pb.WebhookSecret:
        secret = await self._webhooks.rotate_secret(
            request.user_id, request.project, request.endpoint_id, request.overlap_s
        )
        return secret_pb(secret)

    async def GetWebhookSecret(
        self, request: pb.GetWebhookSecretRequest, context: Context
    ) -> pb.WebhookSecret:
        return secret_pb(await self._webhooks.user_secret(request.user_id))

    async def ListDeliveries(
        self, request: pb.ListDeliveriesRequest, context: Context
    ) -> pb.ListDeliveriesResponse:
        page = await self._webhooks.deliveries(
            request.user_id,
            render_id=request.render_id,
            project=request.project,
            endpoint_id=request.endpoint_id,
            size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListDeliveriesResponse(
            deliveries=[delivery_pb(d) for d in page.deliveries], next_page_token=page.next_page_token
        )

    async def Redeliver(self, request: pb.RedeliverRequest, context: Context) -> pb.Delivery:
        return delivery_pb(await self._webhooks.redeliver(request.user_id, request.delivery_id))

    # Renders

    async def Submit(self, request: pb.SubmitRequest, context: Context) -> pb.Render:
        render = await self._renders.submit(spec_from_pb(request.render), _submission(request))
        _say_if_replayed(context, render.replayed)
        return render_pb(render)

    async def SubmitBatch(self, request: pb.SubmitBatchRequest, context: Context) -> pb.Batch:
        specs = [spec_from_pb(spec) for spec in request.renders]
        batch = await self._renders.submit_batch(specs, _submission(request))
        _say_if_replayed(context, batch.replayed)
        return batch_pb(batch)

    async def GetChainLengths(
        self, request: pb.GetChainLengthsRequest, context: Context
    ) -> pb.GetChainLengthsResponse:
        lengths = await self._renders.chain_lengths(request.user_id, list(request.chain_ids))
        return pb.GetChainLengthsResponse(lengths=lengths)

    async def GetRender(self, request: pb.GetRenderRequest, context: Context) -> pb.Render:
        render = await self._renders.get(
            request.user_id, request.render_id, estimates=not request.brief, download=request.download_url
        )
        return render_pb(render)

    async def ListRenders(self, request: pb.ListRendersRequest, context: Context) -> pb.ListRendersResponse:
        where = RenderFilter(
            project_id=request.project_id,
            chain_id=request.chain_id,
            status=_STATUS.get(request.status, ""),
            kind=_KINDS.get(request.kind, ""),
            batch_id=request.batch_id,
            created_after=_moment(request, "created_after"),
            created_before=_moment(request, "created_before"),
            by_position=request.by_position,
        )
        page = await self._renders.list(
            request.user_id,
            where,
            request.page.page_size,
            request.page.page_token,
            download=request.download_url,
        )
        return pb.ListRendersResponse(
            renders=[render_pb(r) for r in page.renders], next_page_token=page.next_page_token
        )

    async def Cancel(self, request: pb.CancelRequest, context: Context) -> pb.Render:
        render = await self._renders.cancel(request.user_id, request.render_id)
        _say_if_replayed(context, render.replayed)
        return render_pb(render)

    async def CancelBatch(self, request: pb.CancelBatchRequest, context: Context) -> pb.Batch:
        batch = await self._renders.cancel_batch(request.user_id, request.batch_id)
        _say_if_replayed(context, batch.replayed)
        return batch_pb(batch)

    async def Retry(self, request: pb.RetryRequest, context: Context) -> pb.Render:
        render = await self._renders.retry(request.user_id, request.render_id, _submission(request))
        _say_if_replayed(context, render.replayed)
        return render_pb(render)

    async def DeleteOutput(self, request: pb.DeleteOutputRequest, context: Context) -> pb.Render:
        return render_pb(await self._renders.delete_output(request.user_id, request.render_id))

    async def UpdateRender(self, request: pb.UpdateRenderRequest, context: Context) -> pb.Render:
        priority = request.priority if request.HasField("priority") else None
        return render_pb(await self._renders.update(request.user_id, request.render_id, priority))

    async def Watch(self, request: pb.WatchRequest, context: Context) -> AsyncIterator[pb.RenderEvent]:
        async for event in self._renders.watch(request.user_id, request.render_id, request.after_seq):
            yield event_pb(event)

    async def GetBatch(self, request: pb.GetBatchRequest, context: Context) -> pb.Batch:
        return batch_pb(await self._renders.get_batch(request.user_id, request.batch_id))

    async def WatchBatch(
        self, request: pb.WatchBatchRequest, context: Context
    ) -> AsyncIterator[pb.RenderEvent]:
        watched = self._renders.watch_batch(request.user_id, request.batch_id, request.after_seqs)
        async for event in watched:
            yield event_pb(event)

    async def GetOutput(
        self, request: pb.GetOutputRequest, context: Context
    ) -> AsyncIterator[pb.OutputChunk]:
        output, chunks = await self._renders.output(
            request.user_id, request.render_id, request.offset, request.length
        )
        first: pb.OutputChunk | None = pb.OutputChunk(
            content_type=output.content_type, total_bytes=output.bytes, sha256=output.sha256
        )
        async for data in chunks:
            if first is not None:
                first.data = data
                yield first
                first = None
            else:
                yield pb.OutputChunk(data=data)
        if first is not None:  # an empty range still says what the output is
            yield first


REPLAYED_KEY = "renderflow-replayed"
"""Trailing metadata: `true` when the answer is what an earlier, identical call made or asked for
(Submit, SubmitBatch and Retry repeating a key: an HTTP API says so in Idempotent-Replayed; Cancel and
CancelBatch finding nothing left to cancel)."""


def _say_if_replayed(context: Context, replayed: bool) -> None:
    if replayed:
        context.set_trailing_metadata(((REPLAYED_KEY, "true"),))


def spec_from_pb(spec: pb.RenderSpec) -> RenderSpec:
    """A render spec from its protobuf."""
    params = spec.params
    reference = None
    if spec.HasField("reference"):
        ref = spec.reference
        reference = Reference(
            url=ref.url,
            render_id=ref.render_id,
            required=ref.required,
            chain_previous=ref.chain_previous,
            upload_id=ref.upload_id,
        )
    return RenderSpec(
        render_id=spec.render_id,
        project=spec.project,
        chain_id=spec.chain_id,
        kind=_KINDS.get(spec.kind, "unspecified"),
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        params=Params(
            params.width,
            params.height,
            params.steps,
            params.seed,
            params.duration_s,
            params.fps,
            params.workflow,
        ),
        reference=reference,
        priority=spec.priority,
        deadline=spec.deadline.ToDatetime(UTC) if spec.HasField("deadline") else None,
        timeout_s=spec.timeout_s,
        retention_s=spec.retention_s,
        webhook=Webhook(spec.webhook.url, tuple(spec.webhook.events) or ("completed",))
        if spec.HasField("webhook")
        else None,
    )


def _submission(request: pb.SubmitRequest | pb.SubmitBatchRequest | pb.RetryRequest) -> Submission:
    timings = {
        name: getattr(request.timings, name)
        for name in TIMING_NAMES
        if request.timings.HasField(name)  # type: ignore[arg-type]
    }
    return Submission(
        user_id=request.user_id,
        idempotency_key=request.idempotency_key,
        request_hash=request.request_hash,
        traceparent=request.traceparent,
        timings=timings,
        min_change_seq=request.min_change_seq,
    )


def render_pb(render: Render) -> pb.Render:
    """A render as protobuf."""
    message = pb.Render(
        id=render.id,
        user_id=render.user_id,
        project=render.project,
        project_id=render.project_id,
        chain_id=render.chain_id,
        position=render.position,
        kind=_KIND_PB.get(render.kind, pb.RENDER_KIND_UNSPECIFIED),
        status=_STATUS_PB[render.status],
        progress=render.progress,
        prompt=render.prompt,
        negative_prompt=render.negative_prompt,
        params=pb.RenderParams(**render.params.__dict__),
        rules=[metadata_pb2.RuleSnapshot(id=r.id, text=r.text) for r in render.rules],
        batch_id=render.batch_id,
        timings=pb.Timings(**render.timings),
        attempts=render.attempts,
        trace_id=render.trace_id,
        created_at=timestamp(render.created_at),
        stalled=render.stalled,
        waiting_on=render.waiting_on,
        timeout_s=render.timeout_s,
        retry_of=render.retry_of,
        retries=render.retries,
        priority=render.priority,
        backend=render.backend,
        provider_request_id=render.provider_request_id,
    )
    if render.reference is not None:
        ref = render.reference
        if ref.url:
            message.reference.url = ref.url
        elif ref.render_id:
            message.reference.render_id = ref.render_id
        elif ref.upload_id:
            message.reference.upload_id = ref.upload_id
        else:
            message.reference.chain_previous = ref.chain_previous
        message.reference.required = ref.required
        if ref.outcome is not None:
            message.reference.used = ref.outcome.used
            message.reference.reason = ref.outcome.reason
            message.reference.message = ref.outcome.message
            message.reference.source_render_id = ref.outcome.source_render_id
    if render.output is not None:
        message.output.CopyFrom(pb.RenderOutput(**render.output.__dict__))
        if render.download is not None:
            message.output.download_url = render.download.url
            message.output.download_expires_at.CopyFrom(timestamp(render.download.expires_at))
    if render.error is not None:
        message.error.CopyFrom(error_pb(render.error))
    if render.retention_s is not None:
        message.retention_s = render.retention_s
    if render.webhook is not None:
        message.webhook.url = render.webhook.url
        message.webhook.events.extend(render.webhook.events)
    for name in (
        "started_at",
        "finished_at",
        "last_progress_at",
        "deadline",
        "output_expires_at",
        "output_deleted_at",
    ):
        value: datetime | None = getattr(render, name)
        if value is not None:
            getattr(message, name).CopyFrom(timestamp(value))
    if render.queue_position is not None:
        message.queue_position = render.queue_position
    if render.eta_s is not None:
        message.eta_s = render.eta_s
    if render.remaining_s is not None:
        message.remaining_s = render.remaining_s
    return message


def event_pb(event: Event) -> pb.RenderEvent:
    """An event as protobuf."""
    message = pb.RenderEvent(
        seq=event.seq,
        type=event.type,
        render_id=event.render_id,
        at=timestamp(event.at),
        phase=event.phase,
        message=event.message,
    )
    if event.progress is not None:
        message.progress = event.progress
    if event.error is not None:
        message.error.CopyFrom(error_pb(event.error))
    return message


def error_pb(error: RenderError) -> pb.RenderError:
    """A render error as protobuf."""
    return pb.RenderError(
        code=error.code, reason=error.reason, message=error.message, retryable=error.retryable
    )


def batch_pb(batch: Batch) -> pb.Batch:
    """A batch as protobuf, with its counts."""
    counts = pb.BatchCounts(**batch.counts, total=len(batch.renders))
    return pb.Batch(
        id=batch.id,
        counts=counts,
        renders=[render_pb(r) for r in batch.renders],
        created_at=timestamp(batch.created_at),
    )


def _moment(message: Any, field: str) -> datetime | None:
    return getattr(message, field).ToDatetime(UTC) if message.HasField(field) else None


def upload_pb(upload: Upload) -> pb.Upload:
    return pb.Upload(
        id=upload.id,
        content_type=upload.content_type,
        bytes=upload.bytes,
        width=upload.width,
        height=upload.height,
        sha256=upload.sha256,
        created_at=timestamp(upload.created_at),
        expires_at=timestamp(upload.expires_at),
    )
