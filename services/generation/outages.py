"""Waiting out an outage of our own plumbing (the image fetcher, the object store restarting or
redeployed) inside a render's attempt: such an outage should not spend the attempts of a user's
render."""

from __future__ import annotations

import logging
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from shared.errors import Unavailable

log = logging.getLogger(__name__)


def waiting_out(outage_s: float, what: str, **extra: Any) -> AsyncRetrying:
    """Retries of a call while it fails Unavailable, with backoff up to 5 s, for up to `outage_s`
    (then the last Unavailable is raised); `<what> unavailable; waiting for it` is logged once, a
    warning with `extra`."""

    def log_once(state: RetryCallState) -> None:
        if state.attempt_number == 1 and state.outcome is not None:
            error = str(state.outcome.exception())
            log.warning(f"{what} unavailable; waiting for it", extra={**extra, "error": error})

    return AsyncRetrying(
        retry=retry_if_exception_type(Unavailable),
        wait=wait_exponential_jitter(multiplier=0.25, max=5.0),
        stop=stop_after_delay(outage_s),
        before_sleep=log_once,
        reraise=True,
    )
