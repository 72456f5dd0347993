"""The image-fetch domain: cache first, then one shared fetch per URL (single-flight), validated,
stored, and every caller answered within its own deadline.

A fetch of a URL that is already being fetched waits for that fetch instead of starting another.
The shared fetch runs under the longer of its first caller's deadline and the service default;
each caller stops waiting at its own deadline (the shared fetch goes on for the others and for
the cache). Failures of the URL or the origin are outcomes, not exceptions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from opentelemetry.trace import Status, StatusCode
from yarl import URL

from services.imagefetch.cache import ImageCache, cache_key, ttl_for
from services.imagefetch.config import Settings
from services.imagefetch.domain import FetchFailure, FetchOrder, FetchOutcome, Image, Progress
from services.imagefetch.fetcher import HttpFetcher, ProgressSink
from services.imagefetch.instruments import Instruments
from shared.errors import ValidationFailed
from shared.images import inspect_async
from shared.url_guard import normalize_url

log = logging.getLogger(__name__)

MAX_BATCH = 64
"""The most URLs one `fetch_many` takes."""


@dataclass
class _Flight:
    """One fetch in progress, shared by every caller asking for the same URL meanwhile."""

    result: asyncio.Future[Image | FetchFailure]
    attempts: int = 0
    waiting: int = 0
    listeners: list[ProgressSink] = field(default_factory=list)

    def broadcast(self, progress: Progress) -> None:
        for listener in list(self.listeners):
            listener(progress)


class ImageService:
    """Fetches images by URL with a cache, single-flight, a deadline per caller, and typed failures."""

    def __init__(
        self, settings: Settings, fetcher: HttpFetcher, cache: ImageCache, instruments: Instruments
    ) -> None:
        self._settings = settings
        self._fetcher = fetcher
        self._cache = cache
        self._instruments = instruments
        self._flights: dict[str, _Flight] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def deadline_for(self, order: FetchOrder, budget_s: float | None = None) -> float:
        """Seconds this order may take: its own deadline or the default, capped by the setting and
        by `budget_s` (what the caller has left, e.g. of its gRPC deadline)."""
        deadline = min(order.deadline_s or self._settings.deadline_s, self._settings.max_deadline_s)
        return max(0.0, deadline if budget_s is None else min(deadline, budget_s))

    def waiting(self, url: str) -> int:
        """How many callers wait right now for the in-flight fetch of `url` (0 if none)."""
        try:
            flight = self._flights.get(cache_key(normalize_url(url)))
        except FetchFailure:
            return 0
        return flight.waiting if flight is not None else 0

    async def fetch(
        self, order: FetchOrder, budget_s: float | None = None, progress: ProgressSink | None = None
    ) -> FetchOutcome:
        """The image at `order.url`, or why not, within `deadline_for(order, budget_s)` seconds.
        `progress` hears of the bytes received if the origin is asked."""
        started = time.monotonic()
        deadline_s = self.deadline_for(order, budget_s)
        with self._instruments.tracer.start_as_current_span("imagefetch.fetch") as span:
            entry: Image | FetchFailure | None = None
            flight: _Flight | None = None
            cache_hit = False
            try:
                url = normalize_url(order.url)
                span.set_attribute("server.address", url.raw_host or "")
                async with asyncio.timeout(deadline_s):
                    key = cache_key(url)
                    if not order.no_cache:
                        entry = await self._cache.get(key)
                        cache_hit = entry is not None
                        hit_or_miss = (
                            self._instruments.cache_hits if cache_hit else self._instruments.cache_misses
                        )
                        hit_or_miss.add(1)
                    if entry is None:
                        flight = self._flights.get(key)
                        # A finished fetch still storing its result answers latecomers, unless
                        # they asked for a fresh one.
                        if flight is None or (order.no_cache and flight.result.done()):
                            flight = self._take_off(key, url, deadline_s)
                        else:
                            self._instruments.coalesced.add(1)
                        entry = await self._wait(flight, progress)
            except FetchFailure as failure:
                entry = failure  # the URL itself is invalid
            except TimeoutError:
                entry = FetchFailure.timed_out(f"no image within {deadline_s:g} s")
            attempts = flight.attempts if flight is not None else 0
            outcome = FetchOutcome(
                url=order.url,
                image=entry if isinstance(entry, Image) else None,
                failure=entry if isinstance(entry, FetchFailure) else None,
                cache_hit=cache_hit,
                attempts=attempts,
                duration_ms=round((time.monotonic() - started) * 1000),
            )
            span.set_attributes({"imagefetch.cache_hit": cache_hit, "imagefetch.attempts": attempts})
            if outcome.failure is not None:
                reason = outcome.failure.reason
                span.set_attribute("imagefetch.failure_reason", reason)
                span.set_status(Status(StatusCode.ERROR, outcome.failure.message))
                self._instruments.failures.add(1, {"reason": reason})
            return outcome

    async def watch(
        self, order: FetchOrder, budget_s: float | None = None
    ) -> AsyncIterator[Progress | FetchOutcome]:
        """`fetch`, yielding Progress as bytes arrive and the outcome last."""
        updates: asyncio.Queue[Progress | None] = asyncio.Queue()
        task = asyncio.create_task(self.fetch(order, budget_s, progress=updates.put_nowait))
        task.add_done_callback(lambda _: updates.put_nowait(None))
        try:
            while (update := await updates.get()) is not None:
                yield update
            yield task.result()
        finally:
            task.cancel()

    async def fetch_many(
        self, orders: Sequence[FetchOrder], concurrency: int = 0, budget_s: float | None = None
    ) -> AsyncIterator[tuple[int, FetchOutcome]]:
        """Fetches up to MAX_BATCH orders, at most `concurrency` at once (0: the setting, and never
        more), yielding (index, outcome) as each completes. Each fetch's deadline starts when it
        does; `budget_s` bounds the whole batch."""
        if len(orders) > MAX_BATCH:
            raise ValidationFailed.field("requests", f"at most {MAX_BATCH} URLs at once")
        if concurrency < 0:
            raise ValidationFailed.field("concurrency", "must not be negative")
        loop = asyncio.get_running_loop()
        ends_at = None if budget_s is None else loop.time() + budget_s
        limit = asyncio.Semaphore(min(concurrency or self._settings.concurrency, self._settings.concurrency))

        async def one(index: int, order: FetchOrder) -> tuple[int, FetchOutcome]:
            async with limit:
                left = None if ends_at is None else ends_at - loop.time()
                return index, await self.fetch(order, left)

        tasks = [asyncio.create_task(one(index, order)) for index, order in enumerate(orders)]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            for task in tasks:
                task.cancel()

    def _take_off(self, key: str, url: URL, deadline_s: float) -> _Flight:
        loop = asyncio.get_running_loop()
        flight = _Flight(result=loop.create_future())
        self._flights[key] = flight
        deadline_at = loop.time() + max(deadline_s, self._settings.deadline_s)
        task = asyncio.create_task(self._fly(key, url, deadline_at, flight))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return flight

    async def _wait(self, flight: _Flight, progress: ProgressSink | None) -> Image | FetchFailure:
        flight.waiting += 1
        if progress is not None:
            flight.listeners.append(progress)
        try:
            # Shielded: a caller that gives up must not cancel the fetch the others wait for.
            return await asyncio.shield(flight.result)
        finally:
            flight.waiting -= 1
            if progress is not None:
                flight.listeners.remove(progress)

    async def _fly(self, key: str, url: URL, deadline_at: float, flight: _Flight) -> None:
        """Fetches, validates, answers the waiting callers, then stores the answer."""

        def on_attempt(number: int) -> None:
            flight.attempts = number

        try:
            try:
                download = await self._fetcher.fetch(
                    url, deadline_at, on_attempt=on_attempt, on_progress=flight.broadcast
                )
                async with asyncio.timeout_at(deadline_at):
                    decoded = await inspect_async(download.data, self._settings.max_pixels)
                    image = Image(
                        data=download.data,
                        content_type=decoded.content_type,
                        width=decoded.width,
                        height=decoded.height,
                        final_url=str(download.final_url),
                    )
            except (TimeoutError, FetchFailure) as exc:
                failure = exc if isinstance(exc, FetchFailure) else FetchFailure.timed_out()
                flight.result.set_result(failure)
                # A warning: the render that asked goes on without its reference, or fails.
                log.warning(
                    "fetch failed",
                    extra={"host": url.raw_host, "reason": failure.reason, "detail": failure.detail},
                )
                if failure.reason == "http_404":
                    await self._cache.put(key, failure, self._settings.cache_negative_ttl_s)
                return
            except Exception as exc:
                log.exception("unexpected error fetching from %s", url.raw_host)
                flight.result.set_exception(exc)
                flight.result.exception()  # retrieved here, so an unawaited one is not reported again
                return
            flight.result.set_result(image)
            await self._cache.put(key, image, ttl_for(download.cache_control, self._settings.cache_ttl_s))
        finally:
            if not flight.result.done():
                flight.result.cancel()
            if self._flights.get(key) is flight:
                del self._flights[key]

    async def close(self) -> None:
        """Stops every fetch still in flight."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@asynccontextmanager
async def open_service(
    settings: Settings, instruments: Instruments | None = None
) -> AsyncIterator[ImageService]:
    """An ImageService with its HTTP session and cache, all closed on exit."""
    instruments = instruments or Instruments.create()
    async with AsyncExitStack() as stack:
        fetcher = await stack.enter_async_context(HttpFetcher.open(settings, instruments))
        cache = ImageCache.from_settings(settings)
        stack.push_async_callback(cache.close)
        service = ImageService(settings, fetcher, cache, instruments)
        stack.push_async_callback(service.close)
        yield service
