"""Webhook deliveries: one POST of the caller's body to a user-given URL, and what became of it.

Outbound traffic to user-given URLs leaves from this service alone, through one guard: the URL is
normalized and checked by guard.py before anything is sent, and the connection goes through the
fetcher's pinning (`pin`, `pinned`, `pinned_session`), so that it reaches only the addresses that
were checked. A redirect is an answer, not followed: following it would send the body and its
signature to a place the user did not name. One attempt per call: the caller keeps the schedule
of retries (it knows the webhook's history), so nothing here tries again.

The receiver's answer is read only as far as the delivery log needs (its first KiB) and as far as
lets the connection be used again (64 KiB, then it is closed): a receiver streaming without end
costs no more than that.

Deliveries have a session and connections of their own, apart from the fetches': a burst of
deliveries to slow receivers cannot take the connections the renders' reference images need, nor
the other way round, and they differ in what they send (the webhooks' User-Agent, no image
Accept) and keep (the answer left undecoded). Their CLIENT spans are made here rather than by the
aiohttp instrumentation, whose spans end with the response headers, would carry the URL's path (a
webhook URL often holds its secret there) and would put our trace context in a stranger's request.
Logs and spans name the receiver's host only, and never a header's value nor the body.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import aiohttp
from multidict import CIMultiDictProxy
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from yarl import URL

from services.imagefetch.config import Settings
from services.imagefetch.domain import (
    CONNECTION_FAILED,
    DELIVERED,
    REDIRECT_NOT_FOLLOWED,
    TIMEOUT,
    Delivery,
    DeliveryOrder,
    FetchFailure,
)
from services.imagefetch.fetcher import pin, pinned, pinned_session
from services.imagefetch.instruments import Instruments
from shared.errors import Unavailable, ValidationFailed
from shared.http_headers import parse_retry_after
from shared.url_guard import normalize_url

log = logging.getLogger(__name__)

USER_AGENT = "renderflow-webhooks/0.1"
"""Sent unless the caller gives a User-Agent of its own."""
EXCERPT_BYTES = 1024
"""The most of a receiver's answer kept, for the delivery log."""
DRAIN_BYTES = 64 * 1024
"""The most of a receiver's answer read at all: a shorter one is read to its end, so that the
connection is used again; a longer one closes the connection."""
MAX_HEADERS = 64
MAX_HEADER_VALUE = 8192
_CHUNK_BYTES = 16 * 1024
_RETRY_AFTER_STATUSES = frozenset({429, 503})
# Headers that frame the message or steer the connection: aiohttp writes these itself, and a
# caller's own would make a request that says two things at once.
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "te",
        "trailer",
        "expect",
    }
)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_UNSAFE_VALUE = re.compile(r"[\x00\r\n]")


def request_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The caller's headers, to be sent as given; ValidationFailed names a header that cannot be
    (a malformed name, a reserved one, one given twice in two cases, a value with a line break),
    never quoting its value: values hold signatures."""
    if len(headers) > MAX_HEADERS:
        raise ValidationFailed.field("headers", f"at most {MAX_HEADERS} headers")
    seen: set[str] = set()
    for name, value in headers.items():
        where = f"headers[{name[:64]!r}]"
        lowered = name.lower()
        if not _TOKEN.match(name):
            raise ValidationFailed.field(where, "not a valid header name")
        if lowered in _RESERVED_HEADERS:
            raise ValidationFailed.field(where, "set by the service itself")
        if lowered in seen:
            raise ValidationFailed.field(where, "given twice (header names are case-insensitive)")
        if _UNSAFE_VALUE.search(value) or len(value) > MAX_HEADER_VALUE:
            raise ValidationFailed.field(
                where, f"the value holds a line break or NUL, or is over {MAX_HEADER_VALUE} characters"
            )
        seen.add(lowered)
    return dict(headers)


@dataclass
class _Answer:
    """What the receiver has said so far: its status (0: nothing yet), headers and the start of its
    body."""

    status: int = 0
    headers: CIMultiDictProxy[str] | None = None
    head: bytearray = field(default_factory=bytearray)
    truncated: bool = False


class Deliverer:
    """Delivers webhooks over a pinned session of its own; see `deliver`."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings, instruments: Instruments) -> None:
        self._session = session
        self._settings = settings
        self._instruments = instruments
        self._slots = asyncio.Semaphore(settings.deliver_concurrency)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, settings: Settings, instruments: Instruments | None = None
    ) -> AsyncIterator[Deliverer]:
        """A deliverer with its session, as many connections as deliveries may be under way; the
        session is closed on exit."""
        # No timeout of the session's own: each attempt has its deadline. The answer is kept as
        # sent: only its first KiB is read, and a decompressed one could be any size.
        async with pinned_session(
            timeout=aiohttp.ClientTimeout(),
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            limit=settings.deliver_concurrency,
            auto_decompress=False,
        ) as session:
            yield cls(session, settings, instruments or Instruments.create())

    def timeout_for(self, order: DeliveryOrder, budget_s: float | None = None) -> float:
        """Seconds the attempt may take: the order's own timeout, capped by the longest deadline a
        caller may ask for, or the default; never more than `budget_s` (what the caller has left,
        e.g. of its gRPC deadline)."""
        settings = self._settings
        asked = order.timeout_s
        timeout = settings.deliver_timeout_s if not asked else min(asked, settings.max_deadline_s)
        return max(0.0, timeout if budget_s is None else min(timeout, budget_s))

    async def deliver(self, order: DeliveryOrder, budget_s: float | None = None) -> Delivery:
        """POSTs `order.body` to `order.url` once and says what became of it: whatever the URL or
        the receiver did is an outcome, not an exception. ValidationFailed for headers that cannot
        be sent; Unavailable when no delivery slot frees up within `budget_s` (the service is
        overloaded, the receiver is not to blame). The slot's wait is not the attempt's: its
        timeout starts once the slot is had."""
        headers = request_headers(order.headers)
        loop = asyncio.get_running_loop()
        ends_at = None if budget_s is None else loop.time() + budget_s
        try:
            async with asyncio.timeout_at(ends_at):
                await self._slots.acquire()
        except TimeoutError:
            raise Unavailable("too many webhook deliveries under way; try again shortly") from None
        try:
            left = None if ends_at is None else ends_at - loop.time()
            return await self._attempt(order, headers, self.timeout_for(order, left))
        finally:
            self._slots.release()

    async def _attempt(self, order: DeliveryOrder, headers: dict[str, str], timeout_s: float) -> Delivery:
        started = time.monotonic()
        with self._instruments.tracer.start_as_current_span(
            "POST", kind=SpanKind.CLIENT, attributes={"http.request.method": "POST"}, record_exception=False
        ) as span:
            host = None
            try:
                url = normalize_url(order.url)
            except FetchFailure as failure:
                delivery = _refused(failure)
            else:
                host = url.raw_host
                span.set_attributes(
                    {"server.address": host or "", "server.port": url.port or 0, "url.scheme": url.scheme}
                )
                delivery = await self._exchange(url, order.body, headers, timeout_s)
            delivery = replace(delivery, latency_ms=(time.monotonic() - started) * 1000)
            self._record(delivery, span, host)
            return delivery

    async def _exchange(self, url: URL, body: bytes, headers: dict[str, str], timeout_s: float) -> Delivery:
        """The POST, under the attempt's deadline. Once the receiver has answered, its status is the
        outcome: the deadline or a broken connection while its body is read only cut the excerpt
        short."""
        answer = _Answer()
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                pins = await pin(url, self._settings.allow)
                with pinned(pins):
                    async with self._session.post(
                        url, data=body, headers=headers, allow_redirects=False
                    ) as response:
                        answer.status, answer.headers = response.status, response.headers
                        await _read_head(response, answer)
        except FetchFailure as failure:
            return _refused(failure)
        except TimeoutError as exc:
            if not (deadline.expired() or isinstance(exc, aiohttp.ServerTimeoutError)):
                raise
            if not answer.status:
                return Delivery(TIMEOUT, f"the receiver did not answer within {timeout_s:g} s")
        except aiohttp.ClientError as exc:
            if not answer.status:
                return Delivery(CONNECTION_FAILED, f"the connection failed ({type(exc).__name__})")
        return _answered(answer, url)

    def _record(self, delivery: Delivery, span: Span, host: str | None) -> None:
        """The span's outcome, the metrics, and one log line: the host, never the path (webhook URLs
        hold secrets there), the headers or the body."""
        span.set_attribute("webhook.outcome", delivery.outcome)
        if delivery.status:
            span.set_attribute("http.response.status_code", delivery.status)
        if not delivery.delivered:
            span.set_attribute("error.type", delivery.outcome)
            if delivery.detail:  # for operators: may name internal addresses
                span.set_attribute("imagefetch.failure_detail", delivery.detail)
            span.set_status(Status(StatusCode.ERROR, delivery.message))
        attributes = {"outcome": delivery.outcome}
        self._instruments.deliveries.add(1, attributes)
        self._instruments.delivery_duration.record(delivery.latency_ms / 1000, attributes)
        extra = {
            "host": host,
            "outcome": delivery.outcome,
            "status": delivery.status,
            "latency_ms": round(delivery.latency_ms, 1),
        }
        if delivery.delivered:
            log.info("webhook delivered", extra=extra)
        else:
            # A warning: the caller will try again, or give the webhook up.
            log.warning("webhook not delivered", extra={**extra, "detail": delivery.detail})


async def _read_head(response: aiohttp.ClientResponse, answer: _Answer) -> None:
    """Keeps the first EXCERPT_BYTES of the body in `answer`, reads on (discarding) to the end or to
    DRAIN_BYTES, and closes the connection if the end is not reached by then. An answer announced
    longer than DRAIN_BYTES is not read past its excerpt."""
    declared = response.content_length
    limit = EXCERPT_BYTES if declared is not None and declared > DRAIN_BYTES else DRAIN_BYTES
    read = 0
    async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
        room = EXCERPT_BYTES - len(answer.head)
        answer.head += chunk[: max(room, 0)]
        answer.truncated = answer.truncated or len(chunk) > room
        read += len(chunk)
        if read >= limit:
            response.close()
            return


def _answered(answer: _Answer, url: URL) -> Delivery:
    """The outcome of an answer: its status, and the Retry-After of a 429 or 503."""
    status = answer.status
    headers = answer.headers
    detail = ""
    if 200 <= status < 300:
        outcome, message = DELIVERED, f"the receiver answered HTTP {status}"
    elif 300 <= status < 400:
        outcome = REDIRECT_NOT_FOLLOWED
        message = f"the receiver answered HTTP {status}, a redirect, which is not followed"
        location = headers.get("Location") if headers is not None else None
        detail = f"it pointed to {_origin_of(location, url)}" if location else ""
    else:
        outcome, message = f"http_{status}", f"the receiver answered HTTP {status}"
    retry_after = None
    if status in _RETRY_AFTER_STATUSES and headers is not None:
        retry_after = parse_retry_after(headers.get("Retry-After"))
    # A multi-byte character cut at the excerpt's end is dropped, not shown as a replacement.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    excerpt = decoder.decode(bytes(answer.head), final=not answer.truncated)
    return Delivery(
        outcome,
        message,
        status=status,
        retry_after_s=retry_after or 0.0,
        response_excerpt=excerpt,
        detail=detail,
    )


def _origin_of(location: str, base: URL) -> str:
    """Where a redirect pointed, by scheme and host only (its path may hold secrets): for
    operators."""
    try:
        target = base.join(URL(location))
    except ValueError:
        return "an unreadable URL"
    return f"{target.scheme}://{target.raw_host}" if target.raw_host else "an unreadable URL"


def _refused(failure: FetchFailure) -> Delivery:
    """A delivery refused by the guard before anything was sent: its reason (invalid_url or
    blocked_address) and message are the guard's own, its detail for operators."""
    return Delivery(failure.reason, failure.message, detail=failure.detail)
