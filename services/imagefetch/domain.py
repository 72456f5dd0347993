"""The values the image-fetch service deals in: orders, images, typed failures, progress, outcomes."""

from __future__ import annotations

from dataclasses import dataclass

# Failure reasons (besides `http_<status>`), exactly as a render's error carries them.
TIMEOUT = "timeout"
TOO_LARGE = "too_large"
NOT_AN_IMAGE = "not_an_image"
BLOCKED_ADDRESS = "blocked_address"
CONNECTION_FAILED = "connection_failed"
TOO_MANY_REDIRECTS = "too_many_redirects"
INVALID_URL = "invalid_url"


class FetchFailure(Exception):
    """A fetch failed for a reason of the origin or the URL (not of the service itself).

    `reason` is one of the constants above or `http_<status>`; `message` is for people and never
    holds credentials or query strings from the URL, nor internal addresses or whether a name
    resolved; `retry_after` is the origin's own hint. `detail` is for operators only (the service's
    log and trace): it may name resolved addresses and resolver errors, so it never leaves the
    service.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        detail: str = "",
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.detail = detail

    @classmethod
    def http(cls, status: int, retry_after: float | None = None) -> FetchFailure:
        """The origin answered `status`; 408, 429 and 5xx are worth trying again."""
        retryable = status in (408, 429) or status >= 500
        return cls(
            f"http_{status}",
            f"the origin answered HTTP {status}",
            retryable=retryable,
            retry_after=retry_after,
        )

    @classmethod
    def timed_out(cls, message: str = "the image did not arrive before the deadline") -> FetchFailure:
        """The deadline passed first; another try, with more time, may succeed."""
        return cls(TIMEOUT, message, retryable=True)

    def __repr__(self) -> str:
        return f"FetchFailure({self.reason!r}, {self.message!r})"


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
