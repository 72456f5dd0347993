"""Tasks that live as long as a block: the loops of the server and of the workers."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

from opentelemetry.instrumentation.utils import suppress_instrumentation

log = logging.getLogger(__name__)

T = TypeVar("T")


@asynccontextmanager
async def background(coro: Coroutine[Any, Any, None], name: str) -> AsyncIterator[asyncio.Task[None]]:
    """Runs a coroutine as a task for the duration of the block, cancelling it on exit."""
    task = asyncio.create_task(coro, name=name)
    try:
        yield task
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def periodically(
    work: Callable[[], Awaitable[T]], interval_s: float, name: str, report: Callable[[T], None]
) -> None:
    """Runs `work` about every `interval_s` (jittered, so that replicas spread out), for ever, and
    hands what it did to `report`; a failure is logged and the loop goes on. Untraced: an idle
    sweep is no trace."""
    while True:
        await asyncio.sleep(interval_s * random.uniform(0.8, 1.2))
        try:
            with suppress_instrumentation():
                done = await work()
        except Exception:
            log.exception("%s failed", name)
            continue
        report(done)
