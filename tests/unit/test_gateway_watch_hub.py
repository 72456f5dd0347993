"""The watch hub against an in-memory event log: one upstream call per render whatever the number
of watchers, exact resumption from any cursor whenever a watcher joins, cancellation of the
upstream call after the last watcher leaves, and failures passed on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable

from renderflow.v1 import generation_pb2

from gateway.watch_hub import WatchHub
from shared.errors import RenderflowError, Unavailable

TERMINAL = "succeeded"


class Log:
    """A render's event log that grows on demand; `watch` behaves as generation's Watch."""

    def __init__(self) -> None:
        self.events: list[generation_pb2.RenderEvent] = []
        self.calls = 0
        self.open = 0
        self.failure: RenderflowError | None = None
        self.closed = False
        self._grown = asyncio.Condition()

    async def emit(self, *types: str) -> None:
        async with self._grown:
            for kind in types:
                self.events.append(
                    generation_pb2.RenderEvent(seq=len(self.events) + 1, type=kind, render_id="r1")
                )
            self._grown.notify_all()

    async def stop(self, failure: RenderflowError | None = None) -> None:
        async with self._grown:
            self.failure, self.closed = failure, True
            self._grown.notify_all()

    async def watch(
        self, user_id: str, render_id: str, after_seq: int
    ) -> AsyncGenerator[generation_pb2.RenderEvent, None]:
        self.calls += 1
        self.open += 1
        try:
            seen = after_seq
            while True:
                async with self._grown:
                    while len(self.events) <= seen and not self.closed:
                        await self._grown.wait()
                    fresh = self.events[seen:]
                for event in fresh:
                    seen = event.seq
                    yield event
                    if event.type == TERMINAL:
                        return
                if not fresh and self.closed:
                    if self.failure is not None:
                        raise self.failure
                    return
        finally:
            self.open -= 1


async def collect(hub: WatchHub, after_seq: int = 0) -> list[int]:
    async with contextlib.aclosing(hub.watch("u1", "r1", after_seq)) as events:
        return [event.seq async for event in events]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_watchers_share_one_upstream_call_and_resume_exactly() -> None:
    log = Log()
    hub = WatchHub(log, linger_s=60)
    # Joining before any event, with cursors beyond what the log holds so far.
    watchers = [asyncio.create_task(collect(hub, after)) for after in (0, 0, 2, 4)]
    await settle()
    await log.emit("queued", "started", "progress")
    await settle()
    late = asyncio.create_task(collect(hub, 1))  # joins a warm channel
    await settle()
    await log.emit("progress", "progress", TERMINAL)
    results = await asyncio.wait_for(asyncio.gather(*watchers, late), 5)
    assert results == [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [3, 4, 5, 6], [5, 6], [2, 3, 4, 5, 6]]
    # A watcher of the finished render, while the hub still holds its log: no new upstream call.
    assert await collect(hub, 3) == [4, 5, 6]
    assert await collect(hub, 6) == []
    assert log.calls == 1
    await hub.close()


async def test_the_upstream_call_ends_after_the_last_watcher_and_its_linger() -> None:
    log = Log()
    hub = WatchHub(log, linger_s=0.05)
    await log.emit("queued")
    watcher = hub.watch("u1", "r1", 0)
    assert (await anext(watcher)).seq == 1
    assert log.open == 1
    await watcher.aclose()
    # Back within the linger: the same upstream call.
    again = hub.watch("u1", "r1", 1)
    pending = asyncio.create_task(anext(again))
    await settle()
    await log.emit("started")
    assert (await asyncio.wait_for(pending, 5)).seq == 2
    await again.aclose()
    assert log.calls == 1
    await asyncio.wait_for(_until(lambda: log.open == 0 and hub.channels == 0), 5)
    pumps = [t for t in asyncio.all_tasks() if t.get_name().startswith("watch-hub:")]
    assert all(t.done() for t in pumps)
    await hub.close()


async def test_an_upstream_failure_reaches_watchers_after_the_events_before_it() -> None:
    log = Log()
    hub = WatchHub(log, linger_s=60)
    await log.emit("queued", "started")
    watcher = asyncio.create_task(collect(hub))
    await settle()
    await log.stop(Unavailable("generation went away"))
    try:
        await asyncio.wait_for(watcher, 5)
        raise AssertionError("the failure was swallowed")
    except Unavailable:
        pass
    # The broken channel is not reused: the next watcher starts a new upstream call.
    log.closed, log.failure = False, None
    next_watcher = asyncio.create_task(collect(hub, 2))
    await settle()
    await log.emit(TERMINAL)
    assert await asyncio.wait_for(next_watcher, 5) == [3]
    assert log.calls == 2
    await hub.close()


async def test_shutdown_ends_watches_and_waits() -> None:
    log = Log()
    hub = WatchHub(log, linger_s=60)
    await log.emit("queued")
    watcher = asyncio.create_task(collect(hub))
    waiting = asyncio.create_task(hub.wait_for_end("u1", "r1", 30))
    await settle()
    hub.end_watches()
    assert await asyncio.wait_for(watcher, 5) == [1]
    assert await asyncio.wait_for(waiting, 5) is False
    assert await collect(hub) == []  # nothing new starts while shutting down
    await hub.close()
    assert log.open == 0


async def test_waiting_for_the_end_of_a_render() -> None:
    log = Log()
    hub = WatchHub(log, linger_s=0)
    await log.emit("queued")
    assert await hub.wait_for_end("u1", "r1", 0.05) is False
    waiting = asyncio.create_task(hub.wait_for_end("u1", "r1", 5))
    await settle()
    await log.emit("started", TERMINAL)
    assert await asyncio.wait_for(waiting, 5) is True
    await hub.close()


async def _until(check: Callable[[], bool]) -> None:
    while not check():  # noqa: ASYNC110 (the state is only observable by asking)
        await asyncio.sleep(0.01)
