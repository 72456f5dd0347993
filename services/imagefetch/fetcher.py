"""HTTP fetching of one URL under a hard deadline: connections pinned to checked addresses, redirects
re-checked hop by hop, transient failures retried with backoff, the size capped while streaming.

No gRPC, no cache, no image decoding here: the result is bytes or a typed FetchFailure.

The pinning (`pin`, `pinned`, `pinned_session`) is all outbound traffic's, webhook deliveries'
(delivery.py) included: one guard, whatever leaves the service for a user-given URL.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from opentelemetry.trace import Span, Status, StatusCode
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception
from yarl import URL

from services.imagefetch.config import Settings
from services.imagefetch.domain import (
    CONNECTION_FAILED,
    INVALID_URL,
    TIMEOUT,
    TOO_LARGE,
    TOO_MANY_REDIRECTS,
    FetchFailure,
    Progress,
)
from services.imagefetch.instruments import Instruments
from shared.http_headers import RetryAfterOrExponential, parse_retry_after
from shared.telemetry import http_client_tracing
from shared.url_guard import (
    Network,
    check_address,
    normalize_url,
    parse_ip,
    refusal,
    refused_name,
)

USER_AGENT = "renderflow-imagefetch/0.1"
CHUNK_BYTES = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_ACCEPT = "image/avif,image/webp,image/png,image/jpeg,image/gif,image/*;q=0.8"

Pins = dict[str, list[ResolveResult]]
"""The checked addresses of a host, by host name; empty for an IP literal (checked as it is)."""

# The checked addresses of the host the current request goes to, read by PinnedResolver. A context
# variable, because one session serves many requests at once, each with its own answer.
_PINS: ContextVar[Pins | None] = ContextVar("imagefetch_pins", default=None)

ProgressSink = Callable[[Progress], None]


class _ResolverBusy(FetchFailure):
    """The resolver could not answer for now (EAI_AGAIN): asked again within this fetch, but if that
    lasts, the caller gets what any refused name gets, not retryable either: a failure of its own
    would tell names that exist only inside the cluster from the others."""


def _retry(exc: BaseException) -> bool:
    return isinstance(exc, FetchFailure) and (exc.retryable or isinstance(exc, _ResolverBusy))


class PinnedResolver(AbstractResolver):
    """Answers only with the addresses the guard checked for this request; never asks DNS itself,
    so the connection goes to exactly the address that was checked."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        pinned = (_PINS.get() or {}).get(host, [])
        results = [
            ResolveResult(**{**result, "port": port})
            for result in pinned
            if family in (socket.AF_UNSPEC, result["family"])
        ]
        if not results:
            raise OSError(f"{host} was not resolved and checked before connecting")
        return results

    async def close(self) -> None:
        return None


@asynccontextmanager
async def pinned_session(
    *,
    timeout: aiohttp.ClientTimeout,
    headers: Mapping[str, str],
    limit: int = 100,
    auto_decompress: bool = True,
    trace_configs: list[aiohttp.TraceConfig] | None = None,
) -> AsyncIterator[aiohttp.ClientSession]:
    """A session that connects only to addresses `pin` checked (see `pinned`), at most `limit`
    connections at once; closed on exit. No proxy from the environment (it would connect wherever
    it likes), no cookies kept from one URL to the next."""
    connector = aiohttp.TCPConnector(resolver=PinnedResolver(), use_dns_cache=False, limit=limit)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        headers=dict(headers),
        auto_decompress=auto_decompress,
        trace_configs=trace_configs,
    ) as session:
        yield session


@contextmanager
def pinned(pins: Pins) -> Iterator[None]:
    """Requests made inside connect to these addresses only (through a `pinned_session`)."""
    token = _PINS.set(pins)
    try:
        yield
    finally:
        _PINS.reset(token)


async def pin(url: URL, allow: Iterable[Network], *, redirected: bool = False) -> Pins:
    """Resolves the host of `url` (normalized) once and checks every address; FetchFailure(
    blocked_address) if any is refused. An IP literal is checked as it is (aiohttp connects to it
    without resolving), and its refusal names its class. A name that does not resolve fails exactly
    like one that resolves to a refused address; what happened goes in the failure's detail only."""
    host, port = url.raw_host or "", url.port or 0
    literal = parse_ip(host)
    if literal is not None:
        check_address(literal, allow, redirected=redirected)
        return {}
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        refused = refused_name(host, redirected=redirected, detail=f"{host} did not resolve: {exc}")
        # A name that does not exist will not exist a moment later either; a busy resolver may
        # answer a moment later.
        if exc.errno not in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)):
            raise _ResolverBusy(refused.reason, refused.message, detail=refused.detail) from None
        raise refused from None
    addresses = [str(sockaddr[0]) for *_, sockaddr in infos]
    resolved = f"{host} resolved to {', '.join(addresses) or 'no address'}"
    results: list[ResolveResult] = []
    for (family, _type, proto, _name, _sockaddr), address in zip(infos, addresses, strict=True):
        checked = parse_ip(address)
        kind = "not an address" if checked is None else refusal(checked, allow)
        if kind is not None:
            raise refused_name(host, redirected=redirected, detail=f"{resolved}; {address} is {kind}")
        results.append(
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=family,
                proto=proto,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
        )
    if not results:
        raise refused_name(host, redirected=redirected, detail=resolved)
    return {host: results}


@dataclass(frozen=True)
class Download:
    """The body of a successful response, where it finally came from, and its caching header."""

    data: bytes
    final_url: URL
    cache_control: str


class HttpFetcher:
    """Fetches URLs over one aiohttp session; see `fetch`."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings, instruments: Instruments) -> None:
        self._session = session
        self._settings = settings
        self._instruments = instruments

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings, instruments: Instruments) -> AsyncIterator[HttpFetcher]:
        """A fetcher with its session; the session is closed on exit."""
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s
        )
        async with pinned_session(
            timeout=timeout,
            headers={"User-Agent": USER_AGENT, "Accept": _ACCEPT, "Accept-Encoding": "identity"},
            trace_configs=http_client_tracing(),
        ) as session:
            yield cls(session, settings, instruments)

    async def fetch(
        self,
        url: URL,
        deadline_at: float,
        *,
        on_attempt: Callable[[int], None] | None = None,
        on_progress: ProgressSink | None = None,
    ) -> Download:
        """The body at `url` (already normalized), fetched before the loop time `deadline_at`.

        Connection errors, timeouts of one attempt, 408, 429 and 5xx are retried with exponential
        backoff and jitter (or the origin's Retry-After, capped), for a bounded number of attempts,
        and never with a wait that would end past the deadline: then the last failure is final.
        Raises FetchFailure.
        """
        settings = self._settings
        loop = asyncio.get_running_loop()

        def stop(state: RetryCallState) -> bool:
            return (
                state.attempt_number >= settings.max_attempts
                or loop.time() + state.upcoming_sleep >= deadline_at
            )

        retrying = AsyncRetrying(
            stop=stop,
            wait=RetryAfterOrExponential(
                initial_s=settings.backoff_initial_s,
                max_s=settings.backoff_max_s,
                retry_after_cap_s=settings.retry_after_cap_s,
            ),
            retry=retry_if_exception(_retry),
            before_sleep=self._count_retry,
            reraise=True,
        )
        deadline = asyncio.timeout_at(deadline_at)
        try:
            async with deadline:
                async for attempt in retrying:
                    with attempt:
                        number = attempt.retry_state.attempt_number
                        if on_attempt is not None:
                            on_attempt(number)
                        return await self._attempt(url, number, on_progress)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise FetchFailure.timed_out() from None
        raise AssertionError("tenacity ended without an outcome")  # pragma: no cover

    def _count_retry(self, state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome is not None else None
        reason = failure.reason if isinstance(failure, FetchFailure) else "unknown"
        self._instruments.retries.add(1, {"reason": reason})

    async def _attempt(self, url: URL, number: int, on_progress: ProgressSink | None) -> Download:
        started = time.monotonic()
        outcome = TIMEOUT  # what it is when the deadline cancels the attempt
        tracer = self._instruments.tracer
        with tracer.start_as_current_span(
            "imagefetch.attempt", attributes={"attempt": number}, record_exception=False
        ) as span:
            try:
                download = await self._follow(url, number, on_progress, span)
                outcome = "ok"
                return download
            except FetchFailure as failure:
                outcome = failure.reason
                span.set_attribute("imagefetch.failure_reason", failure.reason)
                if failure.detail:  # for operators: may name internal addresses
                    span.set_attribute("imagefetch.failure_detail", failure.detail)
                span.set_status(Status(StatusCode.ERROR, failure.message))
                raise
            finally:
                self._instruments.attempts.add(1)
                self._instruments.origin_duration.record(time.monotonic() - started, {"outcome": outcome})

    async def _follow(self, url: URL, number: int, on_progress: ProgressSink | None, span: Span) -> Download:
        current = url
        for hop in range(self._settings.max_redirects + 1):
            pins = await pin(current, self._settings.allow, redirected=hop > 0)
            try:
                with pinned(pins):
                    async with self._session.get(current, allow_redirects=False) as response:
                        span.set_attribute("http.response.status_code", response.status)
                        target = _redirect_target(response, current)
                        if target is None:
                            return await self._read(response, current, number, on_progress)
            except aiohttp.ServerTimeoutError:
                raise FetchFailure.timed_out("the origin stopped answering") from None
            except aiohttp.InvalidURL:
                raise FetchFailure(INVALID_URL, "the origin redirected to an invalid URL") from None
            except aiohttp.ClientError as exc:
                raise FetchFailure(
                    CONNECTION_FAILED, f"the connection failed ({type(exc).__name__})", retryable=True
                ) from None
            current = target
            span.add_event("redirect", {"server.address": current.raw_host or ""})
        raise FetchFailure(
            TOO_MANY_REDIRECTS, f"the origin redirected more than {self._settings.max_redirects} times"
        )

    async def _read(
        self, response: aiohttp.ClientResponse, url: URL, number: int, on_progress: ProgressSink | None
    ) -> Download:
        if not 200 <= response.status < 300:
            raise FetchFailure.http(response.status, parse_retry_after(response.headers.get("Retry-After")))
        limit = self._settings.max_bytes
        declared = response.content_length
        if declared is not None and declared > limit:
            raise FetchFailure(TOO_LARGE, f"the image is {declared} bytes, more than {limit}")
        # Behind a content encoding the declared length is not the length of what we count.
        encoded = response.headers.get("Content-Encoding", "identity").lower() != "identity"
        total = None if encoded else declared
        body = bytearray()
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            body += chunk
            if len(body) > limit:
                response.close()
                raise FetchFailure(TOO_LARGE, f"the image is more than {limit} bytes")
            if on_progress is not None:
                on_progress(Progress(len(body), total, number))
        return Download(bytes(body), url, response.headers.get("Cache-Control", ""))


def _redirect_target(response: aiohttp.ClientResponse, current: URL) -> URL | None:
    """The normalized next URL of a redirect (FetchFailure(invalid_url) if it is not one we may
    follow), or None when the response is not a redirect."""
    location = response.headers.get("Location")
    if response.status not in _REDIRECTS or not location:
        return None
    try:
        joined = current.join(URL(location))
    except ValueError:
        raise FetchFailure(INVALID_URL, "the origin redirected to an invalid URL") from None
    try:
        return normalize_url(str(joined))
    except FetchFailure as failure:
        # The guard speaks of "the URL": say it is the origin's, not the one the caller gave.
        raise FetchFailure(
            INVALID_URL, f"the origin redirected to an invalid URL ({failure.message})"
        ) from None
