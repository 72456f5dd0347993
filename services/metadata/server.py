"""Runs the metadata service: migrations, pool, change feed and gRPC server, opened and closed in order."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta

from renderflow.v1 import metadata_pb2_grpc

from services.metadata.changefeed import ChangeFeed
from services.metadata.config import Settings
from services.metadata.service import Metadata
from services.metadata.servicer import SERVICE_NAME, MetadataServicer
from services.metadata.store import Store, prepare_schema
from shared.db import open_pool
from shared.grpc_server import create_server, drain, start
from shared.health import watching_database_health

log = logging.getLogger(__name__)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[int]:
    """Serves MetadataService on `settings.listen` until the block exits; yields the bound port."""
    async with AsyncExitStack() as stack:
        await prepare_schema(settings.database_url)
        pool = await open_pool(
            settings.database_url,
            name="metadata",
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
        )
        stack.push_async_callback(pool.close)
        store = Store.over_pool(pool)

        feed = ChangeFeed(
            store,
            settings.database_url,
            poll_interval_s=settings.change_poll_s,
            retention=timedelta(seconds=settings.change_retention_s),
            prune_interval_s=settings.prune_interval_s,
        )
        await feed.start()
        stack.push_async_callback(feed.stop)

        handle = create_server([SERVICE_NAME], token=settings.service_token)
        metadata_pb2_grpc.add_MetadataServiceServicer_to_server(
            MetadataServicer(Metadata(store), feed), handle.server
        )
        port = await start(handle, settings.listen)
        stack.push_async_callback(drain, handle, settings.drain_grace_s)
        # Runs before the drain: watch streams never end by themselves, so they are ended first
        # (their clients resume from their last seq elsewhere) instead of holding the drain.
        stack.callback(feed.end_watches)
        # NOT_SERVING while the database is unreachable: readiness probes look elsewhere.
        await stack.enter_async_context(watching_database_health(pool, handle.set_serving))
        log.info("metadata service listening", extra={"port": port})
        yield port
