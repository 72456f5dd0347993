"""Server-Sent Events framing, and heartbeats interleaved with a slow source that closes cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator

from gateway.sse import NEXT_ITEM_TASK, comment_frame, event_frame, retry_frame, with_heartbeats


def test_an_event_is_id_event_and_one_data_line() -> None:
    frame = event_frame(7, "progress", {"seq": 7, "message": "line one\nline two"})
    text = frame.decode()
    assert text.endswith("\n\n")
    lines = text.rstrip("\n").split("\n")
    assert lines[0] == "id: 7" and lines[1] == "event: progress"
    assert len(lines) == 3 and lines[2].startswith("data: ")
    assert json.loads(lines[2].removeprefix("data: ")) == {"seq": 7, "message": "line one\nline two"}


def test_comments_and_retry_frames() -> None:
    assert comment_frame() == b":\n\n"
    assert comment_frame("hi") == b": hi\n\n"
    assert retry_frame(1500) == b"retry: 1500\n\n"


async def test_heartbeats_fill_the_silences_and_items_keep_their_order() -> None:
    release = asyncio.Event()

    async def source() -> AsyncIterator[int]:
        yield 1
        await release.wait()
        yield 2

    seen: list[int | None] = []
    async with contextlib.aclosing(with_heartbeats(source(), 0.01)) as items:
        async for item in items:
            seen.append(item)
            if seen.count(None) == 3:
                release.set()
    assert seen[0] == 1 and seen[-1] == 2
    assert seen[1:-1] == [None] * (len(seen) - 2) and len(seen) >= 5


async def test_closing_early_cancels_the_wait_and_closes_the_source() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncGenerator[int, None]:
        try:
            yield 1
            await asyncio.Event().wait()
            yield 2
        finally:
            closed.set()

    source = endless()
    async with contextlib.aclosing(source), contextlib.aclosing(with_heartbeats(source, 0.01)) as items:
        async for item in items:
            if item is None:
                break
    await asyncio.wait_for(closed.wait(), 1)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == NEXT_ITEM_TASK and not t.done()]


async def test_a_cancelled_consumer_leaves_no_waiting_task() -> None:
    started = asyncio.Event()

    async def silent() -> AsyncIterator[int]:
        started.set()
        await asyncio.Event().wait()
        yield 0

    async def consume() -> None:
        async with contextlib.aclosing(with_heartbeats(silent(), 10)) as items:
            async for _ in items:
                pass

    consumer = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 1)
    consumer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await consumer
    assert not [t for t in asyncio.all_tasks() if t.get_name() == NEXT_ITEM_TASK and not t.done()]
