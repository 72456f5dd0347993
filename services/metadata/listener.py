"""The LISTEN connection that wakes the change feed when a change commits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg

from services.metadata.store import Q, translated_errors

LISTENER_NAME = "renderflow-metadata-listen"
# A ping of the LISTEN connection that takes longer than this means the connection is dead.
PING_TIMEOUT_S = 5.0


class ChangeListener:
    """The one dedicated LISTEN connection: autocommit, outside the pool, a wake-up hint only."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn

    @classmethod
    @asynccontextmanager
    async def opened(cls, database_url: str) -> AsyncIterator[ChangeListener]:
        """Connects and LISTENs; closes the connection on exit."""
        with translated_errors():
            async with await psycopg.AsyncConnection.connect(
                database_url, autocommit=True, application_name=LISTENER_NAME
            ) as conn:
                await conn.execute(Q["listen"])
                yield cls(conn)

    async def wait(self, timeout: float) -> bool:
        """True on a notification; after a quiet `timeout`, pings so that a dead connection raises
        Unavailable instead of staying silent forever."""
        notified = False
        with translated_errors():
            # Consumed to the end (stop_after), never broken out of: the generator holds a lock.
            async for _ in self._conn.notifies(timeout=timeout, stop_after=1):
                notified = True
            if not notified:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that
                # arrives as the ping completes, and the listener would then never stop.
                async with asyncio.timeout(PING_TIMEOUT_S):
                    await self._conn.execute(Q["ping"])
        return notified
