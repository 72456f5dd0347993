"""Deadlines of queued renders, kept by the generation service (which runs whether or not any
worker does): a render not started by its deadline ends `expired` within about one poll of it. A
running one is the worker's to stop (see `runner`); the claim never starts one past its deadline."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from services.generation.background import periodically

log = logging.getLogger(__name__)


async def sweep_deadlines(expire_due: Callable[[], Awaitable[int]], interval_s: float) -> None:
    """Calls `expire_due` about every `interval_s`, for ever."""
    await periodically(expire_due, interval_s, "deadline sweep", _report)


def _report(expired: int) -> None:
    if expired:
        log.info("renders past their deadline ended", extra={"renders": expired})
