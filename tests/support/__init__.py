"""Helpers that tests share: real servers standing in for misbehaving peers, and bounded waits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Returns once `predicate()` holds; TimeoutError after `timeout_s`. For state that announces no
    event of its own (counters of a server under test); checks every few milliseconds."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - nothing to wait on but the state itself
            await asyncio.sleep(0.005)
