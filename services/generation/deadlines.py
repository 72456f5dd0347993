"""Deadlines of queued renders, kept by the generation service (which runs whether or not any
worker does): a render not started by its deadline ends `expired` within about one poll of it. A
running one is the worker's to stop (see `runner`); the claim never starts one past its deadline."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from opentelemetry.instrumentation.utils import suppress_instrumentation

log = logging.getLogger(__name__)


async def sweep_deadlines(expire_due: Callable[[], Awaitable[int]], interval_s: float) -> None:
    """Calls `expire_due` about every `interval_s` (jittered, so replicas spread out), for ever."""
    while True:
        await asyncio.sleep(interval_s * random.uniform(0.8, 1.2))
        try:
            with suppress_instrumentation():  # an idle poll is no trace
                expired = await expire_due()
        except Exception:
            log.exception("deadline sweep failed")
            continue
        if expired:
            log.info("renders past their deadline ended", extra={"renders": expired})
