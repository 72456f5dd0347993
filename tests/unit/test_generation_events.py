"""Watching renders: the log first, then live events pushed by the hub, each exactly once, in order,
until the terminal event — whatever the push stream does (repeats, skips, overflow, close)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime

import pytest

from services.generation.domain import Event
from services.generation.events import EventHub, Subscription, follow


class MemoryLog:
    """An in-memory twin of the event table."""

    def __init__(self) -> None:
        self.events: dict[str, list[Event]] = {}
        self.reads = 0
        self._read = asyncio.Condition()

    def add(self, render_id: str, kind: str = "progress") -> Event:
        log = self.events.setdefault(render_id, [])
        event = Event(render_id, len(log) + 1, kind, datetime.now(UTC))
        log.append(event)
        return event

    async def events_after_many(self, cursors: Mapping[str, int], limit: int = 10_000) -> list[Event]:
        async with self._read:
            self.reads += 1
            self._read.notify_all()
        return [e for r, after in cursors.items() for e in self.events.get(r, []) if e.seq > after][:limit]

    async def wait_reads(self, count: int) -> None:
        """Until the log has been read `count` times (a watch reads it right after subscribing)."""
        async with self._read:
            await asyncio.wait_for(self._read.wait_for(lambda: self.reads >= count), 5)


@pytest.fixture
async def hub_and_log() -> AsyncIterator[tuple[EventHub, MemoryLog]]:
    log = MemoryLog()
    hub = EventHub(log, poll_interval_s=30)
    pump = asyncio.create_task(hub.run())
    yield hub, log
    pump.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pump


async def _collect(stream: AsyncIterator[Event]) -> list[tuple[str, int, str]]:
    return [(e.render_id, e.seq, e.type) async for e in stream]


async def test_replay_then_live_then_end(hub_and_log: tuple[EventHub, MemoryLog]) -> None:
    hub, log = hub_and_log
    for kind in ("queued", "started"):
        log.add("r1", kind)
    watch = asyncio.create_task(_collect(follow(hub, log, {"r1": 0})))
    await log.wait_reads(1)
    for kind in ("progress", "succeeded"):
        event = log.add("r1", kind)
        hub.on_notify("generation_events", f"r1:{event.seq}")
    seen = await asyncio.wait_for(watch, 5)
    assert seen == [("r1", 1, "queued"), ("r1", 2, "started"), ("r1", 3, "progress"), ("r1", 4, "succeeded")]


async def test_resume_after_a_seq(hub_and_log: tuple[EventHub, MemoryLog]) -> None:
    hub, log = hub_and_log
    for kind in ("queued", "started", "progress", "failed"):
        log.add("r1", kind)
    seen = await asyncio.wait_for(_collect(follow(hub, log, {"r1": 2})), 5)
    assert [s for _, s, _ in seen] == [3, 4]


async def test_repeats_are_dropped_and_skips_are_filled_from_the_log(
    hub_and_log: tuple[EventHub, MemoryLog],
) -> None:
    hub, log = hub_and_log
    log.add("r1", "queued")
    stream = follow(hub, log, {"r1": 0})
    assert (await anext(stream)).seq == 1
    (subscription,) = hub.watchers("r1")
    skipped = [log.add("r1") for _ in range(3)]
    terminal = log.add("r1", "succeeded")
    subscription.push(skipped[0])
    subscription.push(skipped[0])  # a repeat
    subscription.push(terminal)  # past a gap
    seen = await asyncio.wait_for(_collect(stream), 5)
    assert [s for _, s, _ in seen] == [2, 3, 4, 5]


async def test_several_renders_until_all_end(hub_and_log: tuple[EventHub, MemoryLog]) -> None:
    hub, log = hub_and_log
    log.add("a", "queued")
    log.add("b", "queued")
    log.add("a", "cancelled")
    watch = asyncio.create_task(_collect(follow(hub, log, {"a": 0, "b": 0})))
    await log.wait_reads(1)
    event = log.add("b", "succeeded")
    hub.on_notify("generation_events", f"b:{event.seq}")
    seen = await asyncio.wait_for(watch, 5)
    assert sorted(seen) == [
        ("a", 1, "queued"),
        ("a", 2, "cancelled"),
        ("b", 1, "queued"),
        ("b", 2, "succeeded"),
    ]
    assert not hub.watchers("a") and not hub.watchers("b")  # nothing left behind


async def test_close_ends_watches(hub_and_log: tuple[EventHub, MemoryLog]) -> None:
    hub, log = hub_and_log
    log.add("r1", "queued")
    watch = asyncio.create_task(_collect(follow(hub, log, {"r1": 0})))
    await log.wait_reads(1)
    hub.close()
    assert await asyncio.wait_for(watch, 5) == [("r1", 1, "queued")]


async def test_one_read_serves_every_watcher_of_a_render(hub_and_log: tuple[EventHub, MemoryLog]) -> None:
    hub, log = hub_and_log
    log.add("r1", "queued")
    watches = [asyncio.create_task(_collect(follow(hub, log, {"r1": 1}))) for _ in range(50)]
    await log.wait_reads(50)
    reads = log.reads
    event = log.add("r1", "succeeded")
    hub.on_notify("generation_events", f"r1:{event.seq}")
    results = await asyncio.wait_for(asyncio.gather(*watches), 5)
    assert all(r == [("r1", 2, "succeeded")] for r in results)
    assert log.reads == reads + 1


def _carrying(*events: Event) -> str:
    """A notification as the store sends it: `<id>:<seq>`, a newline, the events as JSON in base64."""
    carried = [[e.seq, e.type, e.at.isoformat(), {"message": f"m{e.seq}"}] for e in events]
    encoded = base64.b64encode(json.dumps(carried).encode()).decode()
    return f"{events[-1].render_id}:{events[-1].seq}\n{encoded}"


async def _watching_after_queued(hub: EventHub, log: MemoryLog) -> asyncio.Task[list[tuple[str, int, str]]]:
    """A watch of render r1, whose log holds its `queued` event, once it has replayed the log."""
    log.add("r1", "queued")
    watch = asyncio.create_task(_collect(follow(hub, log, {"r1": 0})))
    await log.wait_reads(1)
    return watch


async def test_events_a_notification_carries_are_pushed_without_reading_the_log(
    hub_and_log: tuple[EventHub, MemoryLog],
) -> None:
    hub, log = hub_and_log
    watch = await _watching_after_queued(hub, log)
    started, phase = log.add("r1", "started"), log.add("r1", "phase")
    hub.on_notify("generation_events", _carrying(started, phase))
    hub.on_notify("generation_events", _carrying(log.add("r1", "succeeded")))
    seen = await asyncio.wait_for(watch, 5)
    assert [(s, t) for _, s, t in seen] == [(1, "queued"), (2, "started"), (3, "phase"), (4, "succeeded")]
    assert log.reads == 1  # the replay only


async def test_carried_events_past_a_gap_are_read_from_the_log(
    hub_and_log: tuple[EventHub, MemoryLog],
) -> None:
    hub, log = hub_and_log
    watch = await _watching_after_queued(hub, log)
    log.add("r1", "started")  # its notification was lost
    hub.on_notify("generation_events", _carrying(log.add("r1", "succeeded")))
    seen = await asyncio.wait_for(watch, 5)
    assert [s for _, s, _ in seen] == [1, 2, 3]
    assert log.reads == 2


async def test_unreadable_carried_events_are_read_from_the_log(
    hub_and_log: tuple[EventHub, MemoryLog],
) -> None:
    hub, log = hub_and_log
    watch = await _watching_after_queued(hub, log)
    event = log.add("r1", "succeeded")
    hub.on_notify("generation_events", f"r1:{event.seq}\nnot base64: [")
    assert [s for _, s, _ in await asyncio.wait_for(watch, 5)] == [1, 2]


async def test_an_overflowing_subscription_asks_for_a_reread() -> None:
    subscription = Subscription(["r1"], max_pending=2)
    for seq in (1, 2, 3):
        subscription.push(Event("r1", seq, "progress", datetime.now(UTC)))
    assert await asyncio.wait_for(subscription.get(), 1) == "resync"
    for seq in (4, 5):
        subscription.push(Event("r1", seq, "progress", datetime.now(UTC)))
    subscription.push("closed")  # a full queue still gets the close
    assert await asyncio.wait_for(subscription.get(), 1) == "closed"
