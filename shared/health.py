"""Database health behind gRPC health: a watcher that pings the database through a service's pool
and reports each change between reachable and unreachable (e.g. to `ServerHandle.set_serving`),
so that readiness probes and the gateway's /readyz see a service without its database as down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
from opentelemetry.instrumentation.utils import suppress_instrumentation
from psycopg_pool import AsyncConnectionPool, PoolTimeout

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 2.0
CHECK_TIMEOUT_S = 2.0


async def database_reachable(pool: AsyncConnectionPool, timeout_s: float = CHECK_TIMEOUT_S) -> bool:
    """Whether a `SELECT 1` through the pool answers within `timeout_s`."""
    try:
        # A ping every few seconds is not worth a trace each.
        with suppress_instrumentation():
            async with asyncio.timeout(timeout_s), pool.connection(timeout=timeout_s) as conn:
                await conn.execute("SELECT 1")
    except (psycopg.Error, PoolTimeout, TimeoutError, OSError):
        return False
    return True


async def watch_database_health(
    pool: AsyncConnectionPool,
    on_change: Callable[[bool], Awaitable[None]],
    interval_s: float = CHECK_INTERVAL_S,
    timeout_s: float = CHECK_TIMEOUT_S,
) -> None:
    """Pings the database every `interval_s` for ever and awaits `on_change(reachable)` whenever
    the answer differs from the previous one. The first answer is taken as the state the caller
    already reported (the pool opened, so the database was reachable): only changes are reported."""
    reachable = True
    while True:
        await asyncio.sleep(interval_s)
        now = await database_reachable(pool, timeout_s)
        if now == reachable:
            continue
        if now:
            log.info("database reachable again; serving")
        else:
            log.warning("database unreachable; not serving", extra={"timeout_s": timeout_s})
        try:
            await on_change(now)
        except Exception:
            log.exception("reporting database health failed")
            continue  # reported on the next round
        reachable = now


@contextlib.asynccontextmanager
async def watching_database_health(
    pool: AsyncConnectionPool,
    on_change: Callable[[bool], Awaitable[None]],
    interval_s: float = CHECK_INTERVAL_S,
    timeout_s: float = CHECK_TIMEOUT_S,
) -> AsyncIterator[None]:
    """Runs `watch_database_health` for the duration of the block. Enter it after the server's
    drain is registered, so that it stops first and cannot report SERVING during the drain."""
    task = asyncio.create_task(
        watch_database_health(pool, on_change, interval_s, timeout_s), name="database-health"
    )
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
