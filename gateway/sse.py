"""Server-Sent Events: the wire framing, and a source of items interleaved with heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

import orjson

T = TypeVar("T")

CONTENT_TYPE = "text/event-stream"
NEXT_ITEM_TASK = "sse-next-item"
"""The name of the task that waits for a stream's next item (there is at most one per stream)."""


def event_frame(event_id: int | str | None, event_type: str, data: Any) -> bytes:
    """One event: `id:` (unless None), `event:` and a single `data:` line of JSON, then the blank line."""
    payload = orjson.dumps(data).decode()  # escapes newlines: always one line
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}event: {event_type}\ndata: {payload}\n\n".encode()


def comment_frame(text: str = "") -> bytes:
    """A comment line, which clients ignore: a heartbeat that keeps proxies from closing the stream."""
    return f": {text}\n\n".encode() if text else b":\n\n"


def retry_frame(milliseconds: int) -> bytes:
    """How long an EventSource should wait before reconnecting (it then sends Last-Event-ID)."""
    return f"retry: {milliseconds}\n\n".encode()


async def _next(source: AsyncIterator[T]) -> T:
    return await anext(source)


async def with_heartbeats(source: AsyncIterator[T], interval_s: float) -> AsyncGenerator[T | None, None]:
    """The items of `source`, with a None each time `interval_s` passes without one.

    The wait for the next item survives heartbeats (it is not restarted), and closing this
    generator cancels it, which closes an upstream stream waiting in it.
    """
    pending: asyncio.Task[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.create_task(_next(source), name=NEXT_ITEM_TASK)
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield None
                continue
            finished, pending = pending, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
