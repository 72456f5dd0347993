"""One dedicated LISTEN connection per process: autocommit, outside the pool, health-checked, and
reconnected with backoff when lost.

NOTIFY is only a hint. Notifications sent while the connection was down are lost, so after every
(re)connect the owner's `on_connect` runs and should re-read whatever it might have missed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence

import psycopg
from opentelemetry.instrumentation.utils import suppress_instrumentation
from psycopg import sql

from services.generation.queries import QUERIES

log = logging.getLogger(__name__)


class Listener:
    """Delivers `(channel, payload)` of the given channels to `on_notify`, for as long as `run` runs."""

    def __init__(
        self,
        url: str,
        channels: Sequence[str],
        on_notify: Callable[[str, str], None],
        on_connect: Callable[[], None] = lambda: None,
        *,
        health_check_s: float = 5.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._url = url
        self._channels = list(channels)
        self._on_notify = on_notify
        self._on_connect = on_connect
        self._health_check_s = health_check_s
        self._max_backoff_s = max_backoff_s
        self.connected = asyncio.Event()
        """Set while LISTENing (tests wait on it before relying on notifications)."""

    async def run(self) -> None:
        """Listens until cancelled, reconnecting after any failure."""
        backoff = 0.1
        while True:
            try:
                with suppress_instrumentation():  # health checks are not worth a trace each
                    await self._listen()
            except (psycopg.Error, OSError) as exc:
                log.warning("LISTEN connection lost; reconnecting", extra={"error": str(exc)})
            if self.connected.is_set():
                backoff = 0.1  # it had worked: start the backoff over
            self.connected.clear()
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self._max_backoff_s)

    async def _listen(self) -> None:
        conn = await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, application_name="renderflow-generation-listen"
        )
        async with conn:
            for channel in self._channels:
                await conn.execute(sql.SQL(QUERIES["listen"]).format(channel=sql.Identifier(channel)))
            self.connected.set()
            self._on_connect()
            while True:
                async for notify in conn.notifies(timeout=self._health_check_s):
                    self._on_notify(notify.channel, notify.payload)
                # A quiet connection may be a dead one: prove it is alive.
                await conn.execute(QUERIES["ping"])
