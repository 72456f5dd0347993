"""The change feed: one LISTEN connection per process, fanned out in memory to every watcher.

The `changes` table is the source of truth; a notification only says "read the table". The feed
keeps a high-water mark (the last seq it published) and, on every notification, on every
reconnection of the LISTEN connection, and on a slow poll as a safety net, reads the changes
above it and hands them to each subscriber. Because change-writing transactions commit in seq
order (store.py: `_record`), reading "everything above the mark" never skips a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import timedelta

from opentelemetry.instrumentation.utils import suppress_instrumentation

from services.metadata.domain import Change
from services.metadata.listener import ChangeListener
from services.metadata.store import Store
from shared.errors import Unavailable, ValidationFailed

log = logging.getLogger(__name__)

READ_BATCH = 500
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0
FROM_NOW = -1
"""The `after_seq` of a watch that replays nothing: only the changes made from now on."""


class Subscription:
    """The live changes one watcher has not taken yet; bounded, so a stalled watcher cannot
    exhaust memory: it is cut off instead, and resumes from its last seq."""

    def __init__(self, limit: int) -> None:
        self._items: deque[Change] = deque()
        self._limit = limit
        self._wakeup = asyncio.Event()
        self._ended: str | None = None

    def push(self, change: Change) -> None:
        if self._ended:
            return
        if len(self._items) >= self._limit:
            self.end("fell behind the change feed; resume from the last seq received")
            return
        self._items.append(change)
        self._wakeup.set()

    def end(self, reason: str) -> None:
        """Ends the subscription; the watcher gets Unavailable (and reconnects with its last seq)."""
        self._ended = reason
        self._items.clear()
        self._wakeup.set()

    async def next(self) -> Change:
        while not self._items:
            if self._ended:
                raise Unavailable(self._ended, retry_after=0.1)
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._items.popleft()


class ChangeFeed:
    """Publishes committed changes to in-process subscribers and prunes old ones."""

    def __init__(
        self,
        store: Store,
        database_url: str,
        *,
        poll_interval_s: float,
        retention: timedelta,
        prune_interval_s: float,
        subscriber_limit: int = 10_000,
    ) -> None:
        self._store = store
        self._database_url = database_url
        self._poll_interval_s = poll_interval_s
        self._retention = retention
        self._prune_interval_s = prune_interval_s
        self._subscriber_limit = subscriber_limit
        self._subscribers: set[Subscription] = set()
        self._last_seq = 0
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Starts from the current end of the feed: history is the watchers' own replay."""
        self._last_seq = await self._store.last_change_seq()
        self._tasks = [
            asyncio.create_task(self._listen(), name="metadata-change-listener"),
            asyncio.create_task(self._prune(), name="metadata-change-pruner"),
        ]

    def end_watches(self) -> None:
        """Ends every watch (and refuses new ones), so that a server drain does not wait on them."""
        self._closed = True
        for subscription in self._subscribers:
            subscription.end("the metadata service is shutting down")

    async def stop(self) -> None:
        """Ends every watch and stops the background tasks."""
        self.end_watches()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def watch(
        self, after_seq: int, on_start: Callable[[], Awaitable[None]] | None = None
    ) -> AsyncGenerator[Change]:
        """Changes with a seq above `after_seq`: the retained ones, then live ones, each once.
        With `after_seq` = FROM_NOW, only the changes committed from now on. `on_start` is awaited
        once the watch is subscribed, before the first change.

        Subscribing before replaying closes the gap between the two: a change committed before the
        subscription is in the table when the replay reads it, one committed after reaches the
        subscription; one that lands in both is dropped by seq.
        """
        if after_seq < FROM_NOW:
            raise ValidationFailed.field("after_seq", f"must be {FROM_NOW} (from now on) or at least 0")
        if self._closed:
            raise Unavailable("the metadata service is shutting down", retry_after=0.1)
        subscription = Subscription(self._subscriber_limit)
        self._subscribers.add(subscription)
        try:
            replay = after_seq != FROM_NOW
            # From now on: read after subscribing, so that what is in the table now is the past,
            # and whatever commits later reaches the subscription with a higher seq.
            last = after_seq if replay else await self._store.last_change_seq()
            if on_start is not None:
                await on_start()
            while replay:
                batch = await self._store.changes_after(last, READ_BATCH)
                for change in batch:
                    yield change
                    last = change.seq
                replay = len(batch) == READ_BATCH
            while True:
                change = await subscription.next()
                if change.seq > last:
                    yield change
                    last = change.seq
        finally:
            self._subscribers.discard(subscription)

    async def _catch_up(self) -> None:
        while True:
            batch = await self._store.changes_after(self._last_seq, READ_BATCH)
            for change in batch:
                for subscription in self._subscribers:
                    subscription.push(change)
                self._last_seq = change.seq
            if len(batch) < READ_BATCH:
                return

    async def _listen(self) -> None:
        with suppress_instrumentation():  # a ping and a read now and then are not worth a trace each
            await self._listen_for_ever()

    async def _listen_for_ever(self) -> None:
        delay = RECONNECT_MIN_S
        while True:
            try:
                async with ChangeListener.opened(self._database_url) as listener:
                    # Whatever committed while no connection listened is read now.
                    await self._catch_up()
                    delay = RECONNECT_MIN_S
                    while True:
                        await listener.wait(self._poll_interval_s)
                        await self._catch_up()
            except Unavailable as exc:
                log.warning(
                    "change listener lost: %s; reconnecting",
                    exc,
                    extra={"cause": type(exc.__cause__).__name__, "retry_in_s": delay},
                )
            except Exception:
                log.exception("change listener failed; reconnecting", extra={"retry_in_s": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _prune(self) -> None:
        while True:
            try:
                pruned = await self._store.prune_changes(self._retention)
                if pruned:
                    log.info("pruned old changes", extra={"pruned": pruned})
            except Exception:
                log.exception("pruning changes failed")
            await asyncio.sleep(self._prune_interval_s)
