"""One upstream `Watch` per render and gateway process, shared by every watcher of that render here
(SSE streams, WebSockets, `Prefer: wait` submits).

A render's channel starts one upstream Watch from seq 0 and keeps every event it has seen, in
order, for as long as the render has watchers (and a short linger after the last one leaves, so
that a client reconnecting at once finds it warm). A watcher, whenever it joins and from whatever
seq it resumes, reads the events after its cursor from that log: no gap, no repeat, and no second
upstream call. When the last watcher has gone and the linger has passed, the upstream call is
cancelled and the log forgotten.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol, TypeAlias

from aiohttp import web
from renderflow.v1 import generation_pb2

from gateway.state import CLIENTS, SETTINGS
from shared.contract import TERMINAL
from shared.errors import RenderflowError

log = logging.getLogger(__name__)

PUMP_TASK_PREFIX = "watch-hub:"
"""Each upstream Watch runs in a task named `watch-hub:<render id>`."""

_Key: TypeAlias = tuple[str, str]  # (user id, render id): a render is only ever watched as its owner's


class WatchSource(Protocol):
    """Where a render's events come from (the generation client's `watch`)."""

    def watch(
        self, user_id: str, render_id: str, after_seq: int
    ) -> AsyncGenerator[generation_pb2.RenderEvent, None]: ...


class _Channel:
    """One render's upstream Watch and the events it has delivered so far."""

    def __init__(self) -> None:
        self.events: list[generation_pb2.RenderEvent] = []
        self.seqs: list[int] = []
        self.ended = False
        self.error: RenderflowError | None = None
        self.watchers = 0
        self.pump: asyncio.Task[None] | None = None
        self.linger: asyncio.TimerHandle | None = None
        self.grown = asyncio.Event()
        """Set (and replaced) whenever the log grows or the channel ends."""

    @property
    def complete(self) -> bool:
        """Whether the log holds the render's whole history, up to its terminal event."""
        return bool(self.events) and self.events[-1].type in TERMINAL

    def append(self, event: generation_pb2.RenderEvent) -> None:
        self.events.append(event)
        self.seqs.append(event.seq)
        self._wake()

    def end(self, error: RenderflowError | None) -> None:
        self.ended = True
        self.error = error
        self._wake()

    def _wake(self) -> None:
        grown, self.grown = self.grown, asyncio.Event()
        grown.set()


class WatchHub:
    """Fans each render's events out from one upstream Watch to all of its watchers in this process."""

    def __init__(self, source: WatchSource, linger_s: float) -> None:
        self._source = source
        self._linger_s = linger_s
        self._channels: dict[_Key, _Channel] = {}
        self._pumps: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def channels(self) -> int:
        """Renders with an upstream Watch or a log held right now."""
        return len(self._channels)

    async def watch(
        self, user_id: str, render_id: str, after_seq: int
    ) -> AsyncGenerator[generation_pb2.RenderEvent, None]:
        """The render's events with seq above `after_seq`, then live ones, until its terminal event.

        The caller must have checked that the render is the user's (the upstream call checks it
        again). An upstream failure is raised once the events before it have been delivered; the
        stream also ends early when the gateway shuts down. Close it with `contextlib.aclosing`.
        """
        if self._closing:
            return
        key = (user_id, render_id)
        channel = self._join(key)
        try:
            index = bisect.bisect_right(channel.seqs, after_seq)
            while True:
                grown = channel.grown  # taken before reading, so no growth is missed
                while index < len(channel.events):
                    event = channel.events[index]
                    index += 1
                    if event.seq <= after_seq:
                        continue  # the log was shorter than the cursor when this watcher joined
                    yield event
                    if event.type in TERMINAL:
                        return
                if channel.ended:
                    if channel.error is not None:
                        raise channel.error
                    return
                await grown.wait()
        finally:
            self._leave(key, channel)

    async def wait_for_end(self, user_id: str, render_id: str, timeout_s: float) -> bool:
        """Whether the render ends within `timeout_s` (False also when the watch breaks off)."""
        try:
            async with (
                asyncio.timeout(timeout_s),
                contextlib.aclosing(self.watch(user_id, render_id, 0)) as events,
            ):
                async for event in events:
                    if event.type in TERMINAL:
                        return True
        except (TimeoutError, RenderflowError):
            pass
        return False

    def _join(self, key: _Key) -> _Channel:
        channel = self._channels.get(key)
        if channel is None:
            channel = _Channel()
            self._channels[key] = channel
            channel.pump = asyncio.create_task(self._pump(key, channel), name=PUMP_TASK_PREFIX + key[1])
            self._pumps.add(channel.pump)
            channel.pump.add_done_callback(self._pumps.discard)
        if channel.linger is not None:
            channel.linger.cancel()
            channel.linger = None
        channel.watchers += 1
        return channel

    def _leave(self, key: _Key, channel: _Channel) -> None:
        channel.watchers -= 1
        if channel.watchers > 0:
            return
        if self._channels.get(key) is not channel or self._linger_s <= 0:
            self._drop(key, channel)
        else:
            channel.linger = asyncio.get_running_loop().call_later(self._linger_s, self._drop, key, channel)

    def _drop(self, key: _Key, channel: _Channel) -> None:
        channel.linger = None
        if channel.watchers > 0:
            return
        if self._channels.get(key) is channel:
            del self._channels[key]
        if channel.pump is not None and not channel.pump.done():
            channel.pump.cancel()  # which cancels the upstream call

    async def _pump(self, key: _Key, channel: _Channel) -> None:
        user_id, render_id = key
        error: RenderflowError | None = None
        try:
            # Always from the start: the log then serves a watcher resuming from any seq.
            async with contextlib.aclosing(self._source.watch(user_id, render_id, 0)) as events:
                async for event in events:
                    channel.append(event)
        except RenderflowError as exc:
            error = exc
            log.warning("upstream watch failed", extra={"render_id": render_id, "code": exc.code})
        except Exception:
            error = RenderflowError()
            log.exception("upstream watch failed", extra={"render_id": render_id})
        finally:
            # A log without its terminal event must not serve later watchers: they start afresh.
            if not channel.complete and self._channels.get(key) is channel:
                del self._channels[key]
            channel.end(error)

    def end_watches(self) -> None:
        """Ends every watch now (on shutdown): watchers' streams end; clients resume elsewhere."""
        self._closing = True
        for channel in list(self._channels.values()):
            if channel.linger is not None:
                channel.linger.cancel()
                channel.linger = None
            if channel.pump is not None and not channel.pump.done():
                channel.pump.cancel()  # its watchers' streams end once they have read the log

    async def close(self) -> None:
        """Ends every watch and waits until every upstream call has been cancelled."""
        self.end_watches()
        self._channels.clear()
        await asyncio.gather(*self._pumps, return_exceptions=True)


WATCH_HUB = web.AppKey("watch_hub", WatchHub)


async def watch_hub_context(app: web.Application) -> AsyncIterator[None]:
    """`cleanup_ctx`: the application's hub, closed (every upstream call cancelled) on exit."""
    hub = WatchHub(app[CLIENTS].generation, app[SETTINGS].watch_linger_s)
    app[WATCH_HUB] = hub
    try:
        yield
    finally:
        await hub.close()


async def end_watches(app: web.Application) -> None:
    """`on_shutdown`: ends open event streams and `Prefer: wait` waits at once, instead of letting
    them hold shutdown for the grace period."""
    hub = app.get(WATCH_HUB)
    if hub is not None:
        hub.end_watches()
