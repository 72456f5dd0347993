"""The generation gRPC server's resources, opened and closed in one place."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from renderflow.v1 import generation_pb2, generation_pb2_grpc

from services.generation.artifacts import LocalArtifactStore
from services.generation.catalog import Catalog
from services.generation.config import Settings
from services.generation.events import EventHub
from services.generation.instruments import Instruments, watch_queue
from services.generation.listener import Listener
from services.generation.prefetch import Prefetcher
from services.generation.service import Renders
from services.generation.servicer import GenerationServicer
from services.generation.stalls import stalled_gauge, watch_stalls
from services.generation.storage import RenderStore
from shared.db import migrate, open_pool
from shared.grpc_client import create_channel
from shared.grpc_server import create_server, drain, start
from shared.health import watching_database_health

log = logging.getLogger(__name__)

SCHEMA = "generation"
MIGRATIONS = Path(__file__).parent / "migrations"
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


def database_url(url: str) -> str:
    """`url` (a URL or key=value conninfo) with the search path set to the service's schema."""
    options = conninfo_to_dict(url).get("options") or ""
    return make_conninfo(url, options=f"{options} -c search_path={SCHEMA}".strip())


@asynccontextmanager
async def background(coro: Coroutine[Any, Any, None], name: str) -> AsyncIterator[asyncio.Task[None]]:
    """Runs a coroutine as a task for the duration of the block, cancelling it on exit."""
    task = asyncio.create_task(coro, name=name)
    try:
        yield task
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[int]:
    """Migrates, opens the pool and the event fan-out, serves GenerationService on
    `settings.listen`, yields the bound port; on exit ends watches, drains and closes."""
    async with AsyncExitStack() as stack:
        await migrate(settings.database_url, SCHEMA, MIGRATIONS)
        url = database_url(settings.database_url)
        pool = await open_pool(url, name="generation", min_size=2, max_size=settings.pool_max)
        stack.push_async_callback(pool.close)
        store = RenderStore(pool, settings.max_active_renders)
        hub = EventHub(store, settings.poll_interval_s)
        await stack.enter_async_context(background(hub.run(), "generation-event-pump"))
        gauges = watch_queue(store.queue_depth, Instruments.create(), settings.queue_metrics_s)
        await stack.enter_async_context(background(gauges, "generation-queue-metrics"))
        stalls = watch_stalls(
            partial(store.count_stalled, settings.stall_after_s), stalled_gauge(), settings.queue_metrics_s
        )
        await stack.enter_async_context(background(stalls, "generation-stall-metrics"))
        if not settings.db_poll_only:
            listener = Listener(url, ["generation_events"], hub.on_notify, hub.resync)
            await stack.enter_async_context(background(listener.run(), "generation-listen"))
        artifacts = LocalArtifactStore(settings.artifact_dir)
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
        renders = Renders(store, catalog, hub, artifacts, settings.stall_after_s, prefetch)
        handle = create_server([SERVICE_NAME], token=settings.service_token)
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(renders), handle.server
        )
        port = await start(handle, settings.listen)

        async def stop() -> None:
            hub.close()  # watchers resume elsewhere from their last seq
            await drain(handle, settings.drain_grace_s)

        stack.push_async_callback(stop)
        # NOT_SERVING while the database is unreachable: readiness probes look elsewhere.
        await stack.enter_async_context(watching_database_health(pool, handle.set_serving))
        log.info("generation serving", extra={"port": port})
        yield port
