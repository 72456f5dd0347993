"""The values the image-fetch service deals in: orders, images, typed failures, progress, outcomes;
and webhook deliveries, which leave through the same guard."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.url_guard import (
    BLOCKED_ADDRESS,
    CONNECTION_FAILED,
    DELIVERED,
    INVALID_URL,
    NOT_AN_IMAGE,
    REDIRECT_NOT_FOLLOWED,
    TIMEOUT,
    TOO_LARGE,
    TOO_MANY_REDIRECTS,
    FetchFailure,
)

__all__ = [
    "BLOCKED_ADDRESS",
    "CONNECTION_FAILED",
    "DELIVERED",
    "INVALID_URL",
    "NOT_AN_IMAGE",
    "REDIRECT_NOT_FOLLOWED",
    "TIMEOUT",
    "TOO_LARGE",
    "TOO_MANY_REDIRECTS",
    "FetchFailure",
]


@dataclass(frozen=True)
class FetchOrder:
    """One fetch as a caller asks for it."""

    url: str
    deadline_s: float | None = None
    """Total time allowed, retries included; None means the service default."""
    no_cache: bool = False
    """Skip reading the cache (the result is still stored)."""


@dataclass(frozen=True)
class Image:
    """Bytes that decoded as an image, with what was learnt about them."""

    data: bytes
    content_type: str
    """Detected from the bytes, not the origin's claim."""
    width: int
    height: int
    final_url: str
    """Where the bytes finally came from, after redirects."""

    @property
    def size_bytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class Progress:
    """Bytes received so far by one attempt; `total` is None when the origin did not say."""

    received: int
    total: int | None
    attempt: int


@dataclass(frozen=True)
class FetchOutcome:
    """How one fetch ended: an image or a failure, and what it took."""

    url: str
    image: Image | None
    failure: FetchFailure | None
    cache_hit: bool
    attempts: int
    duration_ms: int


@dataclass(frozen=True)
class DeliveryOrder:
    """One webhook delivery attempt as the caller asks for it: a POST of `body` to `url`."""

    url: str
    headers: Mapping[str, str]
    """Sent as given (signatures among them): never logged nor traced."""
    body: bytes
    timeout_s: float | None = None
    """The most the attempt may take, connecting included; None means the service default."""


@dataclass(frozen=True)
class Delivery:
    """What became of one delivery attempt.

    `outcome` is `delivered` (a 2xx answer), `http_<status>`, `redirect_not_followed` or a failure
    reason (timeout, connection_failed, blocked_address, invalid_url); `status` is 0 when the
    receiver did not answer. `message` and `response_excerpt` go back to the caller; `detail`, like
    a FetchFailure's, is for operators only.
    """

    outcome: str
    message: str
    status: int = 0
    latency_ms: float = 0.0
    retry_after_s: float = 0.0
    response_excerpt: str = ""
    detail: str = ""

    @property
    def delivered(self) -> bool:
        return self.outcome == DELIVERED
