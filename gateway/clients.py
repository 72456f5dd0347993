"""Typed async clients of the metadata and generation services, as the gateway uses them.

Every call runs inside `rpc_errors()`, so callers only ever see domain errors, and carries a
deadline. Streams are async generators that cancel their gRPC call when closed early, so a
client that goes away leaves no call behind (close them with `contextlib.aclosing`).
"""

from __future__ import annotations

import contextlib
from collections import Counter, OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from renderflow.v1 import common_pb2, generation_pb2, generation_pb2_grpc, metadata_pb2, metadata_pb2_grpc

from gateway.config import Settings
from shared.grpc_client import create_channel
from shared.rpc_errors import rpc_errors

T = TypeVar("T")

HEALTH_TIMEOUT_S = 1.0
CHANGE_SEQ_KEY = "renderflow-change-seq"
"""Trailing metadata of metadata's writes: the seq of the change made."""
_ACKNOWLEDGED_USERS = 10_000
REPLAYED_KEY = "renderflow-replayed"
"""Trailing metadata of generation's submits: `true` for the answer to a repeat."""


class _Client:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self.open_streams = 0
        """Server streams in progress: each one a live call to the service."""
        self.streams_opened: Counter[str] = Counter()
        """Server streams ever started, by method name (`Watch`, `WatchBatch`, ...)."""

    async def serving(self) -> bool:
        """Whether the service's health check answers SERVING."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    async def _stream(
        self,
        method: str,
        call: grpc.aio.UnaryStreamCall[Any, T],
        on_start: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncGenerator[T, None]:
        self.streams_opened[method] += 1
        self.open_streams += 1
        try:
            with rpc_errors():
                if on_start is not None:
                    await call.initial_metadata()  # the service's headers: the stream has begun
                    await on_start()
                async for item in call:
                    yield item
        finally:
            call.cancel()  # a no-op once the stream has ended
            self.open_streams -= 1


def _page(page_size: int, page_token: str) -> common_pb2.PageRequest:
    return common_pb2.PageRequest(page_size=page_size, page_token=page_token)


class MetadataClient(_Client):
    """Users, API keys, projects, chains and rules (renderflow.v1.MetadataService)."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        super().__init__(channel)
        self._stub = metadata_pb2_grpc.MetadataServiceStub(channel)
        self._timeout = timeout_s
        self._acknowledged: OrderedDict[str, int] = OrderedDict()

    def acknowledged(self, user_id: str) -> int:
        """The seq of the user's last change of projects, chains or rules made through this
        client (0: none): generation reads them at least as fresh, so that a change acknowledged
        to a client applies to the renders it submits afterwards."""
        return self._acknowledged.get(user_id, 0)

    async def _write(self, user_id: str, call: grpc.aio.UnaryUnaryCall[Any, T]) -> T:
        """The answer of a write, noting the change it made (its trailing metadata)."""
        with rpc_errors():
            answer = await call
            trailers = await call.trailing_metadata()
        for key, value in trailers or ():
            if key == CHANGE_SEQ_KEY:
                self._acknowledged[user_id] = max(int(value), self._acknowledged.pop(user_id, 0))
                if len(self._acknowledged) > _ACKNOWLEDGED_USERS:
                    # The oldest writers' changes have reached every cache long since.
                    self._acknowledged.popitem(last=False)
        return answer

    async def authenticate(self, api_key: str) -> metadata_pb2.AuthenticateResponse:
        with rpc_errors():
            return await self._stub.Authenticate(
                metadata_pb2.AuthenticateRequest(api_key=api_key), timeout=self._timeout
            )

    async def create_project(self, user_id: str, slug: str, name: str) -> metadata_pb2.Project:
        request = metadata_pb2.CreateProjectRequest(user_id=user_id, slug=slug, name=name)
        return await self._write(user_id, self._stub.CreateProject(request, timeout=self._timeout))

    async def get_project(self, user_id: str, slug: str) -> metadata_pb2.Project:
        with rpc_errors():
            return await self._stub.GetProject(
                metadata_pb2.GetProjectRequest(user_id=user_id, slug=slug), timeout=self._timeout
            )

    async def list_projects(
        self, user_id: str, page_size: int, page_token: str
    ) -> metadata_pb2.ListProjectsResponse:
        with rpc_errors():
            return await self._stub.ListProjects(
                metadata_pb2.ListProjectsRequest(user_id=user_id, page=_page(page_size, page_token)),
                timeout=self._timeout,
            )

    async def create_chain(self, user_id: str, project: str, name: str) -> metadata_pb2.Chain:
        request = metadata_pb2.CreateChainRequest(user_id=user_id, project=project, name=name)
        return await self._write(user_id, self._stub.CreateChain(request, timeout=self._timeout))

    async def get_chain(self, user_id: str, project: str, chain_id: str) -> metadata_pb2.Chain:
        with rpc_errors():
            return await self._stub.GetChain(
                metadata_pb2.GetChainRequest(user_id=user_id, project=project, chain_id=chain_id),
                timeout=self._timeout,
            )

    async def list_chains(
        self, user_id: str, project: str, page_size: int, page_token: str
    ) -> metadata_pb2.ListChainsResponse:
        with rpc_errors():
            return await self._stub.ListChains(
                metadata_pb2.ListChainsRequest(
                    user_id=user_id, project=project, page=_page(page_size, page_token)
                ),
                timeout=self._timeout,
            )

    async def create_rule(
        self, user_id: str, project: str, text: str, chain_id: str | None, active: bool | None
    ) -> metadata_pb2.Rule:
        request = metadata_pb2.CreateRuleRequest(
            user_id=user_id, project=project, text=text, chain_id=chain_id or ""
        )
        if active is not None:
            request.active = active
        return await self._write(user_id, self._stub.CreateRule(request, timeout=self._timeout))

    async def list_rules(
        self, user_id: str, project: str, page_size: int, page_token: str
    ) -> metadata_pb2.ListRulesResponse:
        with rpc_errors():
            return await self._stub.ListRules(
                metadata_pb2.ListRulesRequest(
                    user_id=user_id, project=project, page=_page(page_size, page_token)
                ),
                timeout=self._timeout,
            )

    async def update_rule(
        self, user_id: str, project: str, rule_id: str, text: str | None, active: bool | None
    ) -> metadata_pb2.Rule:
        request = metadata_pb2.UpdateRuleRequest(user_id=user_id, project=project, rule_id=rule_id)
        if text is not None:
            request.text = text
        if active is not None:
            request.active = active
        return await self._write(user_id, self._stub.UpdateRule(request, timeout=self._timeout))

    async def delete_rule(self, user_id: str, project: str, rule_id: str) -> None:
        request = metadata_pb2.DeleteRuleRequest(user_id=user_id, project=project, rule_id=rule_id)
        await self._write(user_id, self._stub.DeleteRule(request, timeout=self._timeout))

    def watch_changes(
        self, after_seq: int, on_start: Callable[[], Awaitable[None]] | None = None
    ) -> AsyncGenerator[metadata_pb2.Change, None]:
        """The change feed after `after_seq`, live and without deadline, until closed; `on_start` is
        awaited once the service has subscribed the watch (from then on, no change is missed)."""
        return self._stream(
            "WatchChanges",
            self._stub.WatchChanges(metadata_pb2.WatchChangesRequest(after_seq=after_seq)),
            on_start,
        )


class GenerationClient(_Client):
    """Renders, their events and outputs, uploads, and webhooks (renderflow.v1.GenerationService)."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float, output_timeout_s: float) -> None:
        super().__init__(channel)
        self._stub = generation_pb2_grpc.GenerationServiceStub(channel)
        self._timeout = timeout_s
        self._output_timeout = output_timeout_s

    async def submit(self, request: generation_pb2.SubmitRequest) -> tuple[generation_pb2.Render, bool]:
        """The render queued, and whether it is what an earlier, identical submit made."""
        return await _with_replayed(self._stub.Submit(request, timeout=self._timeout))

    async def chain_lengths(self, user_id: str, chain_ids: Sequence[str]) -> dict[str, int]:
        """How many positions each chain has allocated (0 for those with none)."""
        request = generation_pb2.GetChainLengthsRequest(user_id=user_id, chain_ids=chain_ids)
        with rpc_errors():
            answer = await self._stub.GetChainLengths(request, timeout=self._timeout)
        return {chain_id: answer.lengths.get(chain_id, 0) for chain_id in chain_ids}

    async def submit_batch(
        self, request: generation_pb2.SubmitBatchRequest
    ) -> tuple[generation_pb2.Batch, bool]:
        """The batch queued (all or nothing), and whether it is what an earlier, identical submit made."""
        return await _with_replayed(self._stub.SubmitBatch(request, timeout=self._timeout))

    async def get_batch(self, user_id: str, batch_id: str) -> generation_pb2.Batch:
        with rpc_errors():
            return await self._stub.GetBatch(
                generation_pb2.GetBatchRequest(user_id=user_id, batch_id=batch_id), timeout=self._timeout
            )

    async def get_render(
        self, user_id: str, render_id: str, *, brief: bool = False, download_url: bool = False
    ) -> generation_pb2.Render:
        """The user's render (`brief`: without the queue estimates, for an ownership check;
        `download_url`: with a presigned link to its output, when the store gives one)."""
        request = generation_pb2.GetRenderRequest(
            user_id=user_id, render_id=render_id, brief=brief, download_url=download_url
        )
        with rpc_errors():
            return await self._stub.GetRender(request, timeout=self._timeout)

    async def list_renders(
        self,
        user_id: str,
        *,
        project_id: str = "",
        chain_id: str = "",
        status: generation_pb2.RenderStatus.ValueType = generation_pb2.RENDER_STATUS_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
        by_position: bool = False,
        kind: generation_pb2.RenderKind.ValueType = generation_pb2.RENDER_KIND_UNSPECIFIED,
        batch_id: str = "",
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        download_url: bool = False,
    ) -> generation_pb2.ListRendersResponse:
        request = generation_pb2.ListRendersRequest(
            user_id=user_id,
            project_id=project_id,
            chain_id=chain_id,
            status=status,
            page=_page(page_size, page_token),
            by_position=by_position,
            kind=kind,
            batch_id=batch_id,
            download_url=download_url,
        )
        if created_after is not None:
            request.created_after.FromDatetime(created_after)
        if created_before is not None:
            request.created_before.FromDatetime(created_before)
        with rpc_errors():
            return await self._stub.ListRenders(request, timeout=self._timeout)

    async def cancel(self, user_id: str, render_id: str) -> tuple[generation_pb2.Render, bool]:
        """The render, and whether it had been cancelled (or had expired) already."""
        request = generation_pb2.CancelRequest(user_id=user_id, render_id=render_id)
        return await _with_replayed(self._stub.Cancel(request, timeout=self._timeout))

    async def cancel_batch(self, user_id: str, batch_id: str) -> tuple[generation_pb2.Batch, bool]:
        """The batch, and whether nothing of it was left to cancel."""
        request = generation_pb2.CancelBatchRequest(user_id=user_id, batch_id=batch_id)
        return await _with_replayed(self._stub.CancelBatch(request, timeout=self._timeout))

    async def retry(self, request: generation_pb2.RetryRequest) -> tuple[generation_pb2.Render, bool]:
        """The new render, and whether it is what an earlier, identical retry made."""
        return await _with_replayed(self._stub.Retry(request, timeout=self._timeout))

    async def delete_output(self, user_id: str, render_id: str) -> generation_pb2.Render:
        with rpc_errors():
            return await self._stub.DeleteOutput(
                generation_pb2.DeleteOutputRequest(user_id=user_id, render_id=render_id),
                timeout=self._timeout,
            )

    async def update_render(self, request: generation_pb2.UpdateRenderRequest) -> generation_pb2.Render:
        with rpc_errors():
            return await self._stub.UpdateRender(request, timeout=self._timeout)

    def watch(
        self, user_id: str, render_id: str, after_seq: int
    ) -> AsyncGenerator[generation_pb2.RenderEvent, None]:
        """A render's events after `after_seq`, then live ones, until its terminal event."""
        request = generation_pb2.WatchRequest(user_id=user_id, render_id=render_id, after_seq=after_seq)
        return self._stream("Watch", self._stub.Watch(request))

    def watch_batch(
        self, user_id: str, batch_id: str, after_seqs: Sequence[int] = ()
    ) -> AsyncGenerator[generation_pb2.RenderEvent, None]:
        """The events of every render of a batch until all of them have ended, each render's after
        its cursor (`after_seqs`, in the batch's render order; missing: from the first)."""
        request = generation_pb2.WatchBatchRequest(user_id=user_id, batch_id=batch_id, after_seqs=after_seqs)
        return self._stream("WatchBatch", self._stub.WatchBatch(request))

    def get_output(
        self, user_id: str, render_id: str, offset: int = 0, length: int = 0
    ) -> AsyncGenerator[generation_pb2.OutputChunk, None]:
        """The bytes of a finished render's output (from `offset`, `length` bytes; 0 = to the end)."""
        request = generation_pb2.GetOutputRequest(
            user_id=user_id, render_id=render_id, offset=offset, length=length
        )
        return self._stream("GetOutput", self._stub.GetOutput(request, timeout=self._output_timeout))

    # Uploads

    async def create_upload(self, user_id: str, data: AsyncIterator[bytes]) -> generation_pb2.Upload:
        """An upload of the bytes `data` yields, streamed as they come (generation stops the call as
        soon as they pass its cap); given as long as an output's download. An error of `data`
        itself (a client's malformed body) is raised as it is, not as the call's."""
        failed: list[Exception] = []

        async def chunks() -> AsyncIterator[generation_pb2.UploadChunk]:
            yield generation_pb2.UploadChunk(user_id=user_id)
            try:
                async for piece in data:
                    yield generation_pb2.UploadChunk(data=piece)
            except Exception as exc:
                failed.append(exc)
                raise

        try:
            with rpc_errors():
                return await self._stub.CreateUpload(chunks(), timeout=self._output_timeout)
        except Exception:
            if failed:
                raise failed[0] from None
            raise

    async def get_upload(self, user_id: str, upload_id: str) -> generation_pb2.Upload:
        request = generation_pb2.UploadRequest(user_id=user_id, upload_id=upload_id)
        with rpc_errors():
            return await self._stub.GetUpload(request, timeout=self._timeout)

    async def delete_upload(self, user_id: str, upload_id: str) -> generation_pb2.Upload:
        request = generation_pb2.UploadRequest(user_id=user_id, upload_id=upload_id)
        with rpc_errors():
            return await self._stub.DeleteUpload(request, timeout=self._timeout)

    # Webhooks

    async def create_webhook_endpoint(
        self, user_id: str, project: str, url: str, events: Sequence[str], description: str
    ) -> generation_pb2.WebhookEndpoint:
        """The project's new endpoint, with its signing secret (shown this once)."""
        request = generation_pb2.CreateWebhookEndpointRequest(
            user_id=user_id, project=project, url=url, events=events, description=description
        )
        with rpc_errors():
            return await self._stub.CreateWebhookEndpoint(request, timeout=self._timeout)

    async def list_webhook_endpoints(
        self, user_id: str, project: str
    ) -> list[generation_pb2.WebhookEndpoint]:
        request = generation_pb2.ListWebhookEndpointsRequest(user_id=user_id, project=project)
        with rpc_errors():
            answer = await self._stub.ListWebhookEndpoints(request, timeout=self._timeout)
        return list(answer.endpoints)

    async def get_webhook_endpoint(
        self, user_id: str, project: str, endpoint_id: str
    ) -> generation_pb2.WebhookEndpoint:
        request = generation_pb2.WebhookEndpointRequest(
            user_id=user_id, project=project, endpoint_id=endpoint_id
        )
        with rpc_errors():
            return await self._stub.GetWebhookEndpoint(request, timeout=self._timeout)

    async def update_webhook_endpoint(
        self,
        user_id: str,
        project: str,
        endpoint_id: str,
        *,
        url: str | None = None,
        events: Sequence[str] | None = None,
        description: str | None = None,
        enabled: bool | None = None,
    ) -> generation_pb2.WebhookEndpoint:
        """The endpoint with what is given changed (None: unchanged)."""
        request = generation_pb2.UpdateWebhookEndpointRequest(
            user_id=user_id, project=project, endpoint_id=endpoint_id
        )
        if url is not None:
            request.url = url
        if events is not None:
            request.events.extend(events)
            request.set_events = True
        if description is not None:
            request.description = description
        if enabled is not None:
            request.enabled = enabled
        with rpc_errors():
            return await self._stub.UpdateWebhookEndpoint(request, timeout=self._timeout)

    async def delete_webhook_endpoint(
        self, user_id: str, project: str, endpoint_id: str
    ) -> generation_pb2.WebhookEndpoint:
        request = generation_pb2.WebhookEndpointRequest(
            user_id=user_id, project=project, endpoint_id=endpoint_id
        )
        with rpc_errors():
            return await self._stub.DeleteWebhookEndpoint(request, timeout=self._timeout)

    async def rotate_webhook_secret(
        self, user_id: str, overlap_s: float, *, project: str = "", endpoint_id: str = ""
    ) -> generation_pb2.WebhookSecret:
        """A new secret for the project's endpoint, or (none named) for the user's render webhooks;
        the old one keeps signing beside it for `overlap_s` (0: the service's default)."""
        request = generation_pb2.RotateWebhookSecretRequest(
            user_id=user_id, project=project, endpoint_id=endpoint_id, overlap_s=overlap_s
        )
        with rpc_errors():
            return await self._stub.RotateWebhookSecret(request, timeout=self._timeout)

    async def get_webhook_secret(self, user_id: str) -> generation_pb2.WebhookSecret:
        """The user's secret for render webhooks (made on first ask)."""
        with rpc_errors():
            return await self._stub.GetWebhookSecret(
                generation_pb2.GetWebhookSecretRequest(user_id=user_id), timeout=self._timeout
            )

    async def list_deliveries(
        self,
        user_id: str,
        *,
        render_id: str = "",
        project: str = "",
        endpoint_id: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> generation_pb2.ListDeliveriesResponse:
        """A render's deliveries, or (`project` and `endpoint_id`) an endpoint's, newest first."""
        request = generation_pb2.ListDeliveriesRequest(
            user_id=user_id,
            render_id=render_id,
            project=project,
            endpoint_id=endpoint_id,
            page_size=page_size,
            page_token=page_token,
        )
        with rpc_errors():
            return await self._stub.ListDeliveries(request, timeout=self._timeout)

    async def redeliver(self, user_id: str, delivery_id: str) -> generation_pb2.Delivery:
        request = generation_pb2.RedeliverRequest(user_id=user_id, delivery_id=delivery_id)
        with rpc_errors():
            return await self._stub.Redeliver(request, timeout=self._timeout)


async def _with_replayed(call: grpc.aio.UnaryUnaryCall[Any, T]) -> tuple[T, bool]:
    with rpc_errors():
        answer = await call
        trailers = await call.trailing_metadata()
    return answer, (REPLAYED_KEY, "true") in tuple(trailers or ())


class HealthClient(_Client):
    """A service the gateway does not call but reports on (imagefetch, which the workers call)."""


@dataclass(frozen=True)
class Clients:
    """The gateway's clients of the services it fronts."""

    metadata: MetadataClient
    generation: GenerationClient
    imagefetch: HealthClient


@contextlib.asynccontextmanager
async def open_clients(settings: Settings) -> AsyncIterator[Clients]:
    """Opens a channel to each service and closes them on exit."""
    async with (
        create_channel(settings.addresses.metadata, token=settings.service_token) as metadata,
        create_channel(settings.addresses.generation, token=settings.service_token) as generation,
        create_channel(settings.addresses.imagefetch, token=settings.service_token) as imagefetch,
    ):
        yield Clients(
            MetadataClient(metadata, settings.rpc_timeout_s),
            GenerationClient(generation, settings.rpc_timeout_s, settings.output_timeout_s),
            HealthClient(imagefetch),
        )
