"""Following metadata's change feed for the life of a process: the loop the caches that the feed
keeps current (the gateway's API keys, generation's catalog) share."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from shared.errors import RenderflowError

log = logging.getLogger(__name__)


async def follow_for_ever(
    follow: Callable[[Callable[[], None]], Awaitable[None]],
    after_seq: Callable[[], int],
    *,
    min_backoff_s: float,
    max_backoff_s: float,
    again_at_once: tuple[type[Exception], ...] = (),
) -> None:
    """Runs `follow(progressed)` again whenever it ends or fails, after a capped, jittered backoff
    that doubles with each attempt and starts over once `follow` calls `progressed()` (a change
    arrived). `follow` resumes after the last change it applied, `after_seq()`, which the log lines
    say; an exception of `again_at_once` retries without waiting.

    A failure, even a bug, never ends the loop: a cache that stopped following would silently serve
    what the feed should have dropped, for the life of the process."""
    backoff = min_backoff_s

    def progressed() -> None:
        nonlocal backoff
        backoff = min_backoff_s

    while True:
        try:
            await follow(progressed)
            log.info("change feed ended; reconnecting", extra={"after_seq": after_seq()})
        except again_at_once:
            continue
        except RenderflowError as exc:
            log.warning(
                "change feed interrupted",
                extra={"after_seq": after_seq(), "code": exc.code, "error": exc.message},
            )
        except Exception:
            log.exception("change feed follower failed", extra={"after_seq": after_seq()})
        await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
        backoff = min(backoff * 2, max_backoff_s)
