"""The generation gRPC server's resources, opened and closed in one place."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

from renderflow.v1 import generation_pb2, generation_pb2_grpc

from services.generation.artifacts import UPLOADS
from services.generation.background import background
from services.generation.catalog import Catalog
from services.generation.config import Settings, artifact_store
from services.generation.deadlines import sweep_deadlines
from services.generation.events import EventHub
from services.generation.instruments import Instruments, count_finished, watch_queue
from services.generation.listener import Listener
from services.generation.prefetch import Prefetcher
from services.generation.retention import Retention, sweep_retention
from services.generation.service import Renders
from services.generation.servicer import GenerationServicer, render_pb
from services.generation.stalls import stalled_gauge, watch_stalls
from services.generation.store import Store, database_url
from services.generation.uploads.api import Uploads
from services.generation.uploads.store import UploadStore
from services.generation.webhooks.api import Webhooks
from services.generation.webhooks.dispatcher import Dispatcher
from services.generation.webhooks.egress import ImageFetchEgress
from services.generation.webhooks.receivers import Receivers
from services.generation.webhooks.store import WebhookStore
from shared.grpc_client import create_channel
from shared.grpc_server import create_server, drain, start
from shared.health import watching_database_health

log = logging.getLogger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[int]:
    """Migrates, opens the pool and the event fan-out, serves GenerationService on
    `settings.listen`, yields the bound port; on exit ends watches, drains and closes."""
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(
            Store.opened(
                settings.database_url,
                name="generation",
                max_size=settings.pool_max,
                max_active=settings.max_active_renders,
                on_ended=count_finished,
            )
        )
        hub = EventHub(store, settings.poll_interval_s)
        await stack.enter_async_context(background(hub.run(), "generation-event-pump"))
        gauges = watch_queue(store.queue_depth, Instruments.create(), settings.queue_metrics_s)
        await stack.enter_async_context(background(gauges, "generation-queue-metrics"))
        stalls = watch_stalls(
            partial(store.count_stalled, settings.stall_after_s), stalled_gauge(), settings.queue_metrics_s
        )
        await stack.enter_async_context(background(stalls, "generation-stall-metrics"))
        sweep = sweep_deadlines(store.expire_due, settings.deadline_poll_s)
        await stack.enter_async_context(background(sweep, "generation-deadlines"))
        if not settings.db_poll_only:
            url = database_url(settings.database_url)
            listener = Listener(url, ["generation_events"], hub.on_notify, hub.resync)
            await stack.enter_async_context(background(listener.run(), "generation-listen"))
        artifacts = artifact_store(settings.artifact_dir, settings.artifact_s3)
        stack.push_async_callback(artifacts.close)
        metadata = await stack.enter_async_context(
            create_channel(settings.metadata_addr, token=settings.service_token)
        )
        catalog = Catalog(metadata, settings.metadata_timeout_s, settings.catalog_ttl_s)
        stack.push_async_callback(catalog.close)
        await stack.enter_async_context(background(catalog.follow_changes(), "generation-catalog-feed"))
        prefetch = None
        if settings.prefetch_addr:
            channel = await stack.enter_async_context(
                create_channel(settings.prefetch_addr, token=settings.service_token)
            )
            prefetcher = Prefetcher(
                channel, timeout_s=settings.prefetch_timeout_s, concurrency=settings.prefetch_concurrency
            )
            stack.push_async_callback(prefetcher.close)
            prefetch = prefetcher.start
        retention = Retention(settings.output_retention_s, settings.max_retention_s)
        receivers = Receivers(settings.webhooks.allow)
        uploads = Uploads(UploadStore(store.pool), artifacts.scoped(UPLOADS), settings.uploads)
        renders = Renders(
            store, catalog, hub, artifacts, settings.stall_after_s, prefetch, retention, receivers, uploads
        )

        async def read_render(user_id: str, render_id: str) -> generation_pb2.Render:
            return render_pb(await renders.get(user_id, render_id, estimates=False))

        webhook_store = WebhookStore(store.pool)
        webhooks = Webhooks(webhook_store, catalog, settings.webhooks, read_render)
        if settings.webhooks.dispatch and settings.imagefetch_addr:
            egress = await stack.enter_async_context(
                create_channel(settings.imagefetch_addr, token=settings.service_token)
            )
            dispatcher = Dispatcher(webhook_store, read_render, ImageFetchEgress(egress), settings.webhooks)
            await stack.enter_async_context(background(dispatcher.run(), "generation-webhooks"))

        async def apply_retention() -> tuple[int, int, int]:
            outputs, records = await store.sweep_retention(artifacts.delete, settings.record_retention_s)
            return outputs, records, await uploads.sweep()

        await stack.enter_async_context(
            background(sweep_retention(apply_retention, settings.retention_sweep_s), "generation-retention")
        )
        handle = create_server([SERVICE_NAME], token=settings.service_token)
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(renders, webhooks, uploads), handle.server
        )
        port = await start(handle, settings.listen)

        async def stop() -> None:
            hub.close()  # watchers resume elsewhere from their last seq
            await drain(handle, settings.drain_grace_s)

        stack.push_async_callback(stop)
        # NOT_SERVING while the database is unreachable: readiness probes look elsewhere.
        await stack.enter_async_context(watching_database_health(store.pool, handle.set_serving))
        log.info("generation serving", extra={"port": port})
        yield port
