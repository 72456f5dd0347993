"""The `http` backend: drives an external asynchronous prediction API.

The protocol, as the common hosted-model APIs shape it:

- `POST {base}/predictions` `{"input": {...}}` with an `Idempotency-Key` → `{id, status}`
- `GET {base}/predictions/{id}` → `{id, status: starting|processing|succeeded|failed|canceled,
  progress? (0..1), logs?, output? (a URL, a list of URLs, or a data URL), error?}`
- `POST {base}/predictions/{id}/cancel`
- `GET {output URL}` → the bytes

Connection errors, timeouts of one request, 408, 409, 429 and 5xx are retried with exponential
backoff and jitter (a Retry-After is honoured up to a cap); creating is retried too because the
idempotency key makes a repeated create return the first prediction. Other 4xx answers and a
`failed` prediction are permanent. The whole render is bounded by `max_wait_s`; running out of it
is transient (see `HttpBackend.generate`). The token is sent only to the API's own origin and is
never logged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)
from yarl import URL

from services.generation.backends import (
    Artifact,
    GenerationInput,
    PermanentBackendError,
    ProgressCallback,
    TransientBackendError,
)
from services.generation.backends.predictions import (
    MAX_MESSAGE,
    TERMINAL,
    Prediction,
    decode_data_url,
    output_artifact,
    request_body,
)
from shared.http_headers import RetryAfterOrExponential, parse_retry_after
from shared.settings import ConfigError, Env
from shared.telemetry import http_client_tracing

log = logging.getLogger(__name__)

MIB = 1024 * 1024
USER_AGENT = "renderflow-generation/0.1"
_RETRYABLE_STATUS = frozenset({408, 409, 425, 429})

T = TypeVar("T")


@dataclass(frozen=True)
class HttpBackendSettings:
    """Where the prediction API is and how patiently it is driven."""

    url: str
    """RENDERFLOW_BACKEND_HTTP_URL: the API's base URL (predictions are at `{url}/predictions`)."""
    token: str = field(default="", repr=False)
    """RENDERFLOW_BACKEND_HTTP_TOKEN: sent as `Authorization: Bearer` to the API's origin only;
    a secret, never logged."""
    poll_s: float = 1.0
    """RENDERFLOW_BACKEND_HTTP_POLL_S: the pause between two status polls."""
    request_timeout_s: float = 30.0
    """RENDERFLOW_BACKEND_HTTP_TIMEOUT_S: longest wait to connect, or for any read, in one request."""
    max_wait_s: float = 900.0
    """RENDERFLOW_BACKEND_HTTP_MAX_WAIT_S: the longest one render may take, from create to output."""
    attempts: int = 5
    """RENDERFLOW_BACKEND_HTTP_ATTEMPTS: tries of each request (create, poll, fetch), first included."""
    backoff_s: float = 0.5
    """RENDERFLOW_BACKEND_HTTP_BACKOFF_S: first pause between tries; it doubles, with jitter."""
    backoff_max_s: float = 30.0
    """RENDERFLOW_BACKEND_HTTP_BACKOFF_MAX_S: the cap of that pause, and of a Retry-After honoured."""
    max_output_bytes: int = 512 * MIB
    """RENDERFLOW_BACKEND_HTTP_MAX_OUTPUT_BYTES: the largest output accepted."""

    @classmethod
    def from_env(cls, env: Env) -> HttpBackendSettings:
        """Settings from `RENDERFLOW_BACKEND_HTTP_*`; ConfigError names a bad one."""
        url = env.optional("RENDERFLOW_BACKEND_HTTP_URL")
        if url is None:
            raise ConfigError("RENDERFLOW_BACKEND_HTTP_URL is required by the http backend")
        _check_url(url)
        return cls(
            url=url,
            token=env.str("RENDERFLOW_BACKEND_HTTP_TOKEN", ""),
            poll_s=env.float("RENDERFLOW_BACKEND_HTTP_POLL_S", cls.poll_s, minimum=0.01),
            request_timeout_s=env.float(
                "RENDERFLOW_BACKEND_HTTP_TIMEOUT_S", cls.request_timeout_s, minimum=0.01
            ),
            max_wait_s=env.float("RENDERFLOW_BACKEND_HTTP_MAX_WAIT_S", cls.max_wait_s, minimum=0.1),
            attempts=env.int("RENDERFLOW_BACKEND_HTTP_ATTEMPTS", cls.attempts, minimum=1),
            backoff_s=env.float("RENDERFLOW_BACKEND_HTTP_BACKOFF_S", cls.backoff_s, minimum=0),
            backoff_max_s=env.float("RENDERFLOW_BACKEND_HTTP_BACKOFF_MAX_S", cls.backoff_max_s, minimum=0),
            max_output_bytes=env.int(
                "RENDERFLOW_BACKEND_HTTP_MAX_OUTPUT_BYTES", cls.max_output_bytes, minimum=1
            ),
        )


def _check_url(value: str) -> None:
    try:
        url = URL(value)
    except ValueError:
        raise ConfigError("RENDERFLOW_BACKEND_HTTP_URL is not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"RENDERFLOW_BACKEND_HTTP_URL must be an http(s) URL, got scheme {url.scheme!r}")
    if url.user or url.password:
        # Never echo the value: it holds a credential.
        raise ConfigError(
            "RENDERFLOW_BACKEND_HTTP_URL must not hold credentials; set RENDERFLOW_BACKEND_HTTP_TOKEN"
        )


class _Retryable(Exception):
    """One request failed in a way another try may not."""

    def __init__(self, message: str, reason: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


@dataclass
class _Run:
    """One call of `generate`: the prediction as last seen, for cancelling it when things go wrong."""

    render_id: str
    prediction: Prediction | None = None

    @property
    def extra(self) -> dict[str, str]:
        """Log fields (never the token, never a URL)."""
        fields = {"render_id": self.render_id}
        if self.prediction is not None:
            fields["prediction_id"] = self.prediction.id
        return fields


class HttpBackend:
    """Renders through a prediction API over one aiohttp session (see the module docstring)."""

    name = "http"

    def __init__(self, session: aiohttp.ClientSession, settings: HttpBackendSettings) -> None:
        self._session = session
        self._settings = settings
        self._base = URL(settings.url)
        self._backoff = RetryAfterOrExponential(
            initial_s=settings.backoff_s,
            max_s=settings.backoff_max_s,
            retry_after_cap_s=settings.backoff_max_s,
        )

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: HttpBackendSettings) -> AsyncIterator[HttpBackend]:
        """A backend with its own session, closed on exit."""
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.request_timeout_s, sock_read=settings.request_timeout_s
        )
        async with aiohttp.ClientSession(
            timeout=timeout,
            headers={"User-Agent": USER_AGENT},
            cookie_jar=aiohttp.DummyCookieJar(),
            trace_configs=http_client_tracing(),  # a CLIENT span per create, poll, cancel, download
        ) as session:
            yield cls(session, settings)

    async def generate(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
        """Creates a prediction, polls it to its end, fetches and checks its output.

        Running past `max_wait_s` cancels the prediction and raises a *transient* error: a
        provider that is slow now (a backlog, cold starts) is the usual cause and may well be
        quick on the next attempt, and the runner bounds the attempts. Cancelling the task, or
        any other failure while the prediction runs, cancels the prediction too (best effort,
        bounded by the request timeout)."""
        run = _Run(job.render_id)
        try:
            async with asyncio.timeout(self._settings.max_wait_s):
                # One key per call: a repeated create within it returns the same prediction,
                # while a later attempt of the render (after a failure) gets a fresh one.
                key = f"{job.render_id}-{uuid.uuid4().hex}"
                created = await self._call(
                    "create", "POST", self._base / "predictions", key=key, body=request_body(job)
                )
                run.prediction = Prediction.from_json(created)
                log.info("prediction created", extra=run.extra)
                await self._wait(run, job.steps, on_progress)
                artifact = await self._output(job, run.prediction)
        except TimeoutError:
            await self._cancel(run)
            raise TransientBackendError(
                f"the provider did not finish within {self._settings.max_wait_s:g} s", "timeout"
            ) from None
        except BaseException:
            await self._cancel(run)
            raise
        await on_progress(job.steps, job.steps)
        log.info("prediction succeeded", extra=run.extra)
        return artifact

    async def _wait(self, run: _Run, steps: int, on_progress: ProgressCallback) -> None:
        """Polls until the prediction ends; reports the provider's progress as steps (short of the
        last, which is reported once the output is in hand)."""
        assert run.prediction is not None
        reported = 0
        url = self._base / "predictions" / run.prediction.id
        while (prediction := run.prediction).status not in TERMINAL:
            if prediction.progress is not None:
                step = min(steps - 1, math.floor(prediction.progress * steps))
                if step > reported:
                    reported = step
                    await on_progress(step, steps)
            await asyncio.sleep(self._settings.poll_s)
            run.prediction = replace(
                Prediction.from_json(await self._call("poll", "GET", url)), id=prediction.id
            )
        if prediction.status == "failed":
            reason = self._redacted(prediction.error) or "no reason given"
            raise PermanentBackendError(f"the provider failed the prediction: {reason}", "provider_failed")
        if prediction.status == "canceled":
            raise PermanentBackendError("the prediction was cancelled at the provider", "provider_cancelled")

    async def _output(self, job: GenerationInput, prediction: Prediction) -> Artifact:
        if not prediction.output:
            raise PermanentBackendError("the prediction succeeded without an output", "bad_output")
        if prediction.output.startswith("data:"):
            data, declared = decode_data_url(prediction.output)
        else:
            try:
                url = self._base.join(URL(prediction.output))
            except ValueError:
                raise PermanentBackendError("the output URL is invalid", "bad_output") from None
            if url.scheme not in ("http", "https"):
                raise PermanentBackendError("the output URL is not http(s)", "bad_output")
            data, declared = await self._fetch(url)
        return await output_artifact(job, data, declared)

    def _headers(self, url: URL) -> dict[str, str]:
        # The token belongs to the API: an output on a CDN or a storage bucket never sees it.
        if self._settings.token and url.origin() == self._base.origin():
            return {"Authorization": f"Bearer {self._settings.token}"}
        return {}

    async def _call(
        self, what: str, method: str, url: URL, *, key: str = "", body: dict[str, Any] | None = None
    ) -> Any:
        """One API call, retried; its JSON answer."""
        headers = {**self._headers(url), "Accept": "application/json"}
        if key:
            headers["Idempotency-Key"] = key

        async def read(response: aiohttp.ClientResponse) -> Any:
            try:
                return await response.json(content_type=None)
            except ValueError:
                raise PermanentBackendError(
                    f"the provider's answer to {what} is not JSON", "bad_response"
                ) from None

        return await self._retried(what, method, url, headers, body, read)

    async def _fetch(self, url: URL) -> tuple[bytes, str]:
        """The output's bytes and declared content type, retried, its size capped while reading."""
        limit = self._settings.max_output_bytes
        too_large = PermanentBackendError(f"the output is larger than {limit} bytes", "too_large")

        async def read(response: aiohttp.ClientResponse) -> tuple[bytes, str]:
            if (response.content_length or 0) > limit:
                raise too_large
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > limit:
                    raise too_large
            return bytes(body), response.headers.get("Content-Type", "")

        return await self._retried("fetch", "GET", url, self._headers(url), None, read)

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
            stop=stop_after_attempt(self._settings.attempts),
            wait=self._backoff,
            retry=retry_if_exception_type(_Retryable),
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
        except _Retryable as exc:
            raise TransientBackendError(
                f"{what}: {exc} (after {self._settings.attempts} tries)", exc.reason
            ) from None
        raise AssertionError("tenacity ended without an outcome")  # pragma: no cover

    @asynccontextmanager
    async def _request(
        self, method: str, url: URL, headers: dict[str, str], body: dict[str, Any] | None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request whose response is a success (errors in reading it are classified too)."""
        try:
            async with self._session.request(method, url, headers=headers, json=body) as response:
                if response.status >= 400:
                    await self._refuse(response)
                yield response
        except TimeoutError:  # aiohttp's ServerTimeoutError among them
            raise _Retryable("the provider did not answer in time", "provider_timeout") from None
        except aiohttp.ClientError as exc:
            raise _Retryable(f"the connection failed ({type(exc).__name__})", "connection_failed") from None

    async def _refuse(self, response: aiohttp.ClientResponse) -> None:
        """Raises for an error response: retryable ones as _Retryable, the rest as permanent."""
        status = response.status
        if status >= 500 or status in _RETRYABLE_STATUS:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            raise _Retryable(f"the provider answered {status}", f"http_{status}", retry_after)
        detail = self._redacted((await response.text(errors="replace"))[:MAX_MESSAGE].strip())
        message = f"the provider refused the request ({status}): {detail}"
        raise PermanentBackendError(message, f"http_{status}")

    def _redacted(self, text: str) -> str:
        """`text` from the provider (shown to users, logged) without the token, should it echo it."""
        return text.replace(self._settings.token, "[token]") if self._settings.token else text

    async def _cancel(self, run: _Run) -> None:
        """Asks the provider to stop a prediction still running (once, bounded); failures are logged."""
        prediction = run.prediction
        if prediction is None or prediction.status in TERMINAL:
            return
        url = self._base / "predictions" / prediction.id / "cancel"
        try:
            async with (
                asyncio.timeout(self._settings.request_timeout_s),
                self._session.post(url, headers=self._headers(url)) as response,
            ):
                log.info("prediction cancelled", extra={**run.extra, "status": response.status})
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("cannot cancel the prediction", extra={**run.extra, "error": type(exc).__name__})


def _reason(state: RetryCallState) -> str:
    failure = state.outcome.exception() if state.outcome is not None else None
    return failure.reason if isinstance(failure, _Retryable) else ""
