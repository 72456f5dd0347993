"""The HTTP transport every provider backend shares: one aiohttp session, the provider's base URL
and token, and requests retried while they fail transiently.

Connection errors, timeouts of one request, 408, 409, 425, 429 and 5xx are retried with exponential
backoff and jitter (a Retry-After is honoured up to a cap). Other 4xx answers are permanent. The
token is sent only to the provider's own origin (an output on a CDN or a storage bucket never sees
it) and never logged; a provider's message that echoes it is redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)
from yarl import URL

from services.generation.backends import PermanentBackendError, TransientBackendError
from services.generation.backends.predictions import MAX_MESSAGE, decode_data_url
from shared.http_headers import RetryAfterOrExponential, parse_retry_after
from shared.settings import ConfigError
from shared.telemetry import http_client_tracing

log = logging.getLogger(__name__)
OUTPUT_CHUNK = 256 * 1024
"""How much of a downloaded output is read (and, into a file, written) at a time."""

MIB = 1024 * 1024
USER_AGENT = "renderflow-generation/0.1"
_RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
"""A provider's error code as a reason: a short identifier, nothing a provider could smuggle more in."""

T = TypeVar("T")


def check_url(value: str, variable: str, token_variable: str) -> None:
    """ConfigError unless `value` is an http(s) URL without credentials (named by `variable`)."""
    try:
        url = URL(value)
    except ValueError:
        raise ConfigError(f"{variable} is not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"{variable} must be an http(s) URL, got scheme {url.scheme!r}")
    if url.user or url.password:
        # Never echo the value: it holds a credential.
        raise ConfigError(f"{variable} must not hold credentials; set {token_variable}")


class ProviderSettings(Protocol):
    """What every provider backend's settings say about reaching the provider."""

    @property
    def url(self) -> str: ...
    @property
    def token(self) -> str: ...
    @property
    def request_timeout_s(self) -> float: ...
    @property
    def attempts(self) -> int: ...
    @property
    def backoff_s(self) -> float: ...
    @property
    def backoff_max_s(self) -> float: ...
    @property
    def max_output_bytes(self) -> int: ...


@asynccontextmanager
async def open_client(
    settings: ProviderSettings,
    error_code: Callable[[Any], str | None] | None = None,
    auth_scheme: str = "Bearer",
) -> AsyncIterator[ProviderClient]:
    """A client of the provider `settings` name, over a session of its own closed on exit."""
    async with provider_session(settings.request_timeout_s) as session:
        yield ProviderClient(
            session,
            settings.url,
            settings.token,
            attempts=settings.attempts,
            backoff_s=settings.backoff_s,
            backoff_max_s=settings.backoff_max_s,
            max_output_bytes=settings.max_output_bytes,
            error_code=error_code,
            auth_scheme=auth_scheme,
        )


@asynccontextmanager
async def provider_session(request_timeout_s: float) -> AsyncIterator[aiohttp.ClientSession]:
    """A session for one provider: no cookies, a CLIENT span per request, `request_timeout_s` to
    connect and for any read (no bound on the whole request: the caller bounds the render)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=request_timeout_s, sock_read=request_timeout_s)
    async with aiohttp.ClientSession(
        timeout=timeout,
        headers={"User-Agent": USER_AGENT},
        cookie_jar=aiohttp.DummyCookieJar(),
        trace_configs=http_client_tracing(),
    ) as session:
        yield session


class Retryable(Exception):
    """One request failed in a way another try may not."""

    def __init__(self, message: str, reason: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class ProviderClient:
    """Requests to one provider: JSON calls and output downloads, each retried (module docstring)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        token: str,
        *,
        attempts: int,
        backoff_s: float,
        backoff_max_s: float,
        max_output_bytes: int,
        error_code: Callable[[Any], str | None] | None = None,
        auth_scheme: str = "Bearer",
    ) -> None:
        self.session = session
        self._auth_scheme = auth_scheme
        """How the token is sent: `Authorization: {auth_scheme} {token}` (fal: `Key`)."""
        self._error_code = error_code
        """Reads the provider's own error code out of a refusal's JSON body (the reason then)."""
        self.base = URL(base_url)
        self._token = token
        self._attempts = attempts
        self._max_output_bytes = max_output_bytes
        self._backoff = RetryAfterOrExponential(
            initial_s=backoff_s, max_s=backoff_max_s, retry_after_cap_s=backoff_max_s
        )

    def headers(self, url: URL) -> dict[str, str]:
        """The token, for the provider's own origin only."""
        if self._token and url.origin() == self.base.origin():
            return {"Authorization": f"{self._auth_scheme} {self._token}"}
        return {}

    def redacted(self, text: str) -> str:
        """`text` from the provider (shown to users, logged) without the token, should it echo it."""
        return text.replace(self._token, "[token]") if self._token else text

    def output_url(self, value: str) -> URL:
        """An output's URL as the provider gave it (a relative one against the base);
        PermanentBackendError unless it is an http(s) URL."""
        try:
            url = self.base.join(URL(value))
        except ValueError:
            raise PermanentBackendError("the output URL is invalid", "bad_output") from None
        if url.scheme not in ("http", "https"):
            raise PermanentBackendError("the output URL is not http(s)", "bad_output")
        return url

    async def call(
        self,
        what: str,
        method: str,
        url: URL,
        *,
        key: str = "",
        body: dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """One API call, retried; its JSON answer. `headers`: more request headers (e.g. `Prefer`)."""
        answer, _ = await self.call_with_id(what, method, url, key=key, body=body, headers=headers)
        return answer

    async def call_with_id(
        self,
        what: str,
        method: str,
        url: URL,
        *,
        key: str = "",
        body: dict[str, Any] | None = None,
        id_header: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> tuple[Any, str]:
        """One API call, retried; its JSON answer, and the provider's id of the request that
        answered (the `id_header` response header, e.g. `x-request-id`; "" without one)."""
        sent = {**(headers or {}), **self.headers(url), "Accept": "application/json"}
        if key:
            sent["Idempotency-Key"] = key

        async def read(response: aiohttp.ClientResponse) -> tuple[Any, str]:
            request_id = response.headers.get(id_header, "") if id_header else ""
            try:
                return await response.json(content_type=None), request_id[:200]
            except ValueError:
                raise PermanentBackendError(
                    f"the provider's answer to {what} is not JSON", "bad_response"
                ) from None

        return await self._retried(what, method, url, sent, body, read)

    async def read_output(self, value: str, into: Path | None = None) -> tuple[bytes | Path, str]:
        """An output the provider gave as a `data:` URL or as a URL to download: its bytes (or,
        downloaded `into` a file, that file) and the type it declares."""
        if value.startswith("data:"):
            return decode_data_url(value)
        return await self.fetch(self.output_url(value), into)

    async def fetch(self, url: URL, into: Path | None = None) -> tuple[bytes | Path, str]:
        """An output's bytes and declared content type, retried, its size capped while reading;
        with `into`, written to that file as it arrives (a video is never held whole), which is
        returned instead of the bytes."""
        limit = self._max_output_bytes
        too_large = PermanentBackendError(f"the output is larger than {limit} bytes", "too_large")

        async def read(response: aiohttp.ClientResponse) -> tuple[bytes | Path, str]:
            if (response.content_length or 0) > limit:
                raise too_large
            declared = response.headers.get("Content-Type", "")
            size = 0
            body = bytearray()
            with open(into, "wb") if into else contextlib.nullcontext() as file:  # noqa: ASYNC230
                async for chunk in response.content.iter_chunked(OUTPUT_CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    if file is None:
                        body += chunk
                    else:
                        await asyncio.to_thread(file.write, chunk)
            return (into or bytes(body)), declared

        return await self._retried("fetch", "GET", url, self.headers(url), None, read)

    async def _retried(
        self,
        what: str,
        method: str,
        url: URL,
        headers: dict[str, str],
        body: dict[str, Any] | None,
        read: Callable[[aiohttp.ClientResponse], Awaitable[T]],
    ) -> T:
        """A request tried up to `attempts` times while it fails transiently; `read` turns its
        successful response into the result. TransientBackendError once the tries are used up."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=self._backoff,
            retry=retry_if_exception_type(Retryable),
            before_sleep=lambda state: log.warning(
                "provider request failed; retrying",
                extra={"request": what, "attempt": state.attempt_number, "reason": _reason(state)},
            ),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    async with self._request(method, url, headers, body) as response:
                        return await read(response)
        except Retryable as exc:
            raise TransientBackendError(f"{what}: {exc} (after {self._attempts} tries)", exc.reason) from None
        raise AssertionError("tenacity ended without an outcome")  # pragma: no cover

    @asynccontextmanager
    async def _request(
        self, method: str, url: URL, headers: dict[str, str], body: dict[str, Any] | None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request whose response is a success (errors in reading it are classified too)."""
        try:
            async with self.session.request(method, url, headers=headers, json=body) as response:
                if response.status >= 400:
                    await self._refuse(response)
                yield response
        except TimeoutError:  # aiohttp's ServerTimeoutError among them
            raise Retryable("the provider did not answer in time", "provider_timeout") from None
        except aiohttp.ClientError as exc:
            raise Retryable(f"the connection failed ({type(exc).__name__})", "connection_failed") from None

    async def _refuse(self, response: aiohttp.ClientResponse) -> None:
        """Raises for an error response: retryable ones as Retryable, the rest as permanent."""
        status = response.status
        if status >= 500 or status in _RETRYABLE_STATUS:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            raise Retryable(f"the provider answered {status}", f"http_{status}", retry_after)
        text = await response.text(errors="replace")
        detail = self.redacted(text[:MAX_MESSAGE].strip())
        message = f"the provider refused the request ({status}): {detail}"
        raise PermanentBackendError(message, self._reason_of(text) or f"http_{status}")

    def _reason_of(self, text: str) -> str | None:
        if self._error_code is None:
            return None
        try:
            code = self._error_code(json.loads(text))
        except ValueError:
            return None
        return code if code and _CODE.fullmatch(code) else None


def _reason(state: RetryCallState) -> str:
    failure = state.outcome.exception() if state.outcome is not None else None
    return failure.reason if isinstance(failure, Retryable) else ""
