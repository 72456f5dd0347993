"""Retry-After from the HTTP peers the services call: parsing it, and honouring it when retrying."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime

from tenacity import RetryCallState, wait_exponential_jitter


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class RetryAfterOrExponential:
    """A tenacity wait: what the peer's Retry-After said (capped), else exponential backoff with
    jitter. The Retry-After is read from the failed attempt's exception, its `retry_after` (seconds
    or None)."""

    def __init__(self, *, initial_s: float, max_s: float, retry_after_cap_s: float) -> None:
        self._cap = retry_after_cap_s
        self._exponential = wait_exponential_jitter(multiplier=initial_s, max=max_s, jitter=initial_s)

    def __call__(self, state: RetryCallState) -> float:
        failure = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(failure, "retry_after", None)
        if isinstance(retry_after, int | float):
            return min(float(retry_after), self._cap)
        return float(self._exponential(state))
