"""Live render events for every watcher of a server process, from one LISTEN connection.

The hub keeps, per render, the set of subscriptions watching it and the highest seq it has pushed.
A notification (`<render_id>:<seq>`) mostly carries the new events (see `records.notified_events`):
when they follow on from what was pushed, they go to every subscription in memory at once. Any
other notification marks the render dirty, and one pump task reads the new events of all dirty
renders in one query. `follow` turns a subscription into a gapless, duplicate-free stream:
subscribe first, replay the log, then go live, and re-read the log whenever the push stream skips
(overflow, reconnect, out-of-order delivery).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol

from opentelemetry.instrumentation.utils import suppress_instrumentation

from services.generation.domain import Event
from services.generation.records import notified_events

log = logging.getLogger(__name__)

# Markers a subscription's queue may hold besides events.
_RESYNC = "resync"
_CLOSED = "closed"
_FETCH_LIMIT = 5_000


class EventSource(Protocol):
    """The durable event log."""

    async def events_after_many(self, cursors: Mapping[str, int], limit: int = ...) -> list[Event]:
        """The events of several renders, each above its own seq, ordered by render then seq."""
        ...


class Subscription:
    """Events of some renders as the hub pushes them; bounded, so a slow reader falls back on the log."""

    def __init__(self, render_ids: Iterable[str], max_pending: int = 1024) -> None:
        self.render_ids = frozenset(render_ids)
        self._queue: asyncio.Queue[Event | str] = asyncio.Queue(max_pending)

    def push(self, item: Event | str) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            # Drop what is pending and ask the reader to re-read the log instead (or to stop).
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(_CLOSED if item == _CLOSED else _RESYNC)

    async def get(self) -> Event | str:
        return await self._queue.get()


class EventHub:
    """Fans out the events of all renders watched in this process."""

    def __init__(self, source: EventSource, poll_interval_s: float) -> None:
        self._source = source
        self._poll_interval_s = poll_interval_s
        self._subscriptions: dict[str, set[Subscription]] = {}
        self._cursors: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()

    def on_notify(self, channel: str, payload: str) -> None:
        """A NOTIFY on `generation_events`: `<render_id>:<seq>`, the render's log has grown (at
        least) to that seq, often followed by a newline and the new events themselves. Events that
        follow on from what the hub has pushed are pushed at once; otherwise the log is read."""
        head, _, carried = payload.partition("\n")
        render_id, _, seq = head.rpartition(":")
        if render_id not in self._subscriptions:
            return
        if seq.isdigit() and int(seq) <= self._cursors[render_id]:
            return
        if carried:
            try:
                events = notified_events(render_id, carried)
            except ValueError:
                log.warning("unreadable events in a notification", extra={"render_id": render_id})
                events = []
            if events and events[0].seq == self._cursors[render_id] + 1:
                self._push(events)
                return
        self._dirty.add(render_id)
        self._wake.set()

    def replayed(self, subscription: Subscription, last: Mapping[str, int]) -> None:
        """`subscription` has read the log up to `last` (render id -> seq): for a render it alone
        watches, the hub's pushes go on from there (the next notification needs no read)."""
        for render_id, seq in last.items():
            if self._subscriptions.get(render_id) == {subscription} and seq > self._cursors[render_id]:
                self._cursors[render_id] = seq

    def resync(self) -> None:
        """Re-read every watched render (after a reconnect, notifications may have been missed)."""
        self._dirty.update(self._subscriptions)
        self._wake.set()

    @contextmanager
    def subscribe(self, cursors: Mapping[str, int]) -> Iterator[Subscription]:
        """Watches the renders of `cursors` (render id -> seq already seen) while in the block."""
        subscription = Subscription(cursors)
        for render_id, seq in cursors.items():
            if render_id not in self._subscriptions:
                self._subscriptions[render_id] = set()
                self._cursors[render_id] = seq
            self._subscriptions[render_id].add(subscription)
        try:
            yield subscription
        finally:
            for render_id in cursors:
                watchers = self._subscriptions.get(render_id)
                if watchers is not None:
                    watchers.discard(subscription)
                    if not watchers:
                        del self._subscriptions[render_id]
                        del self._cursors[render_id]

    def watchers(self, render_id: str) -> frozenset[Subscription]:
        """The subscriptions watching a render right now."""
        return frozenset(self._subscriptions.get(render_id, ()))

    def close(self) -> None:
        """Ends every watch (on shutdown; clients resume elsewhere from their last seq)."""
        for watchers in list(self._subscriptions.values()):
            for subscription in watchers:
                subscription.push(_CLOSED)

    async def run(self) -> None:
        """The pump: reads new events of dirty renders and pushes them, until cancelled. Without a
        notification for `poll_interval_s`, every watched render is re-read (the safety net)."""
        while True:
            try:
                async with asyncio.timeout(self._poll_interval_s):  # not wait_for, which may swallow a cancel
                    await self._wake.wait()
            except TimeoutError:
                self._dirty.update(self._subscriptions)
            self._wake.clear()
            dirty = {r: self._cursors[r] for r in self._dirty if r in self._subscriptions}
            self._dirty.clear()
            if not dirty:
                continue
            try:
                with suppress_instrumentation():  # one trace per pump read would be noise
                    events = await self._source.events_after_many(dirty, _FETCH_LIMIT)
            except Exception:
                log.exception("cannot read render events; retrying")
                self._dirty.update(dirty)
                await asyncio.sleep(min(1.0, self._poll_interval_s))
                self._wake.set()
                continue
            if len(events) >= _FETCH_LIMIT:
                self._dirty.update(dirty)
                self._wake.set()
            self._push(events)

    def _push(self, events: Iterable[Event]) -> None:
        """Pushes events past each render's cursor to its watchers, moving the cursor."""
        for event in events:
            watchers = self._subscriptions.get(event.render_id)
            if watchers is None or event.seq <= self._cursors[event.render_id]:
                continue
            self._cursors[event.render_id] = event.seq
            for subscription in watchers:
                subscription.push(event)


async def follow(hub: EventHub, source: EventSource, cursors: Mapping[str, int]) -> AsyncIterator[Event]:
    """The events of the renders of `cursors` after each one's seq: the log first, then live, each
    exactly once and in seq order per render, until every render has ended (or the hub closes)."""
    last = dict(cursors)
    open_ids = set(cursors)
    with hub.subscribe(cursors) as subscription:
        pending = await source.events_after_many(last)
        hub.replayed(subscription, _last_seqs(pending))
        from_log = True
        while open_ids:
            resync = False
            for event in pending:
                if event.render_id not in open_ids or event.seq <= last[event.render_id]:
                    continue  # a repeat
                if event.seq > last[event.render_id] + 1 and not from_log:
                    resync = True  # pushed past a gap: the log has what was skipped
                    break
                last[event.render_id] = event.seq
                yield event
                if event.terminal:
                    open_ids.discard(event.render_id)
            if not open_ids:
                return
            item = _RESYNC if resync else await subscription.get()
            if item == _CLOSED:
                return
            if isinstance(item, Event):
                pending, from_log = [item], False
            else:
                pending, from_log = await source.events_after_many({r: last[r] for r in open_ids}), True


def _last_seqs(events: Iterable[Event]) -> dict[str, int]:
    return {event.render_id: event.seq for event in events}  # each render's are in seq order
