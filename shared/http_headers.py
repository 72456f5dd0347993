"""Headers read in more than one place: Retry-After from the HTTP peers the services call (parsing it,
and honouring it when retrying), and a client's `Prefer` (RFC 7240)."""

from __future__ import annotations

import email.utils
from collections.abc import Iterable
from datetime import UTC, datetime

from tenacity import RetryCallState, wait_exponential_jitter


def preferences(headers: Iterable[str]) -> dict[str, str]:
    """The preferences of `Prefer` headers, by lowercased name, with their values unquoted (`""`
    for none; parameters after `;` dropped); the first of a repeated name counts. Like any
    preference, one that cannot be read is left out rather than refused."""
    found: dict[str, str] = {}
    for header in headers:
        for preference in header.split(","):
            name, _, value = preference.split(";", 1)[0].partition("=")
            if name.strip():
                found.setdefault(name.strip().lower(), value.strip().strip('"'))
    return found


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
