"""The `http` backend: drives an external asynchronous prediction API.

The protocol, as the common hosted-model APIs shape it:

- `POST {base}/predictions` `{"input": {...}}` with an `Idempotency-Key` → `{id, status, urls?}`
- `GET {base}/predictions/{id}` (or the prediction's `urls.get`) → `{id, status:
  starting|processing|succeeded|failed|canceled, progress? (0..1), logs?, output? (a URL, a list of
  URLs, or a data URL), error?}`
- `POST {base}/predictions/{id}/cancel` (or the prediction's `urls.cancel`)
- `GET {output URL}` → the bytes

Requests are retried as `provider` says (creating too: the idempotency key makes a repeated create
return the first prediction). A `failed` prediction is permanent. The whole render is bounded by
`max_wait_s`; running out of it is transient (see `PredictionBackend.generate`). The token is sent only to
the API's own origin and is never logged.

Following a prediction once created (polling, progress, output, cancelling) is `PredictionBackend`'s,
which the `replicate` backend shares: only creating differs between the two.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, Self, TypeVar

import aiohttp
from yarl import URL

from services.generation.backends import (
    Artifact,
    BackendError,
    GenerationInput,
    PermanentBackendError,
    ProgressCallback,
    StepProgress,
    TransientBackendError,
)
from services.generation.backends.inputs import InputTemplate
from services.generation.backends.predictions import (
    TERMINAL,
    Prediction,
    output_artifact,
    request_body,
)
from services.generation.backends.provider import (
    MIB,
    ProviderClient,
    ProviderSettings,
    check_url,
    open_client,
)
from shared.settings import ConfigError, Env

log = logging.getLogger(__name__)


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
    input_template: InputTemplate | None = None
    """RENDERFLOW_BACKEND_HTTP_INPUT: the model's inputs as a JSON template of placeholders
    (`{"prompt": "{prompt_with_rules}", "num_inference_steps": "{steps}", ...}`, see
    `backends/inputs.py`), checked at start; unset: Renderflow's own field names."""

    @classmethod
    def from_env(cls, env: Env) -> HttpBackendSettings:
        """Settings from `RENDERFLOW_BACKEND_HTTP_*`; ConfigError names a bad one."""
        url = env.optional("RENDERFLOW_BACKEND_HTTP_URL")
        if url is None:
            raise ConfigError("RENDERFLOW_BACKEND_HTTP_URL is required by the http backend")
        check_url(url, "RENDERFLOW_BACKEND_HTTP_URL", "RENDERFLOW_BACKEND_HTTP_TOKEN")
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
            input_template=InputTemplate.parse(template, "RENDERFLOW_BACKEND_HTTP_INPUT")
            if (template := env.optional("RENDERFLOW_BACKEND_HTTP_INPUT"))
            else None,
        )


class PredictionSettings(ProviderSettings, Protocol):
    """What following a prediction needs besides the transport's settings."""

    @property
    def poll_s(self) -> float: ...
    @property
    def max_wait_s(self) -> float: ...


S = TypeVar("S", bound=PredictionSettings)


@dataclass
class _Run:
    """One call of `generate`: the prediction as last seen, and where to poll and cancel it."""

    render_id: str
    prediction: Prediction | None = None
    get_url: URL | None = None
    cancel_url: URL | None = None

    @property
    def extra(self) -> dict[str, str]:
        """Log fields (never the token, never a URL)."""
        fields = {"render_id": self.render_id}
        if self.prediction is not None:
            fields["prediction_id"] = self.prediction.id
        return fields


class PredictionBackend(ABC, Generic[S]):
    """A backend on a prediction API: follows a prediction from its creation to its checked output,
    and cancels it when the render does not need it any more. A subclass says how to create one
    (`_create`, answering the API's JSON)."""

    name: str

    def __init__(self, client: ProviderClient, settings: S) -> None:
        self._client = client
        self._settings = settings

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: S) -> AsyncIterator[Self]:
        """A backend with its own session, closed on exit."""
        async with open_client(settings) as client:
            yield cls(client, settings)

    @abstractmethod
    async def _create(self, job: GenerationInput) -> Any:
        """Creates the prediction of `job`; the API's answer."""

    async def generate(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
        """Creates a prediction, polls it to its end unless it came back ended, fetches and checks
        its output.

        Running past `max_wait_s` cancels the prediction and raises a *transient* error: a
        provider that is slow now (a backlog, cold starts) is the usual cause and may well be
        quick on the next attempt, and the runner bounds the attempts. Cancelling the task, or
        any other failure while the prediction runs, cancels the prediction too (best effort,
        bounded by the request timeout)."""
        run = _Run(job.render_id)
        try:
            async with asyncio.timeout(self._settings.max_wait_s):
                created = Prediction.from_json(await self._create(job))
                run.prediction = created
                base = self._client.base / "predictions" / created.id
                run.get_url = self._api_url(created.get_url, base)
                run.cancel_url = self._api_url(created.cancel_url, base / "cancel")
                log.info("prediction created", extra={**run.extra, "status": created.status})
                await self._wait(run, job.steps, on_progress)
                artifact = await self._output(job, run.prediction)
        except TimeoutError:
            await self._cancel(run)
            raise TransientBackendError(
                f"the provider did not finish within {self._settings.max_wait_s:g} s",
                "timeout",
                run.prediction.id if run.prediction else "",
            ) from None
        except BackendError as exc:
            await self._cancel(run)
            if run.prediction is not None:
                exc.provider_request_id = run.prediction.id
            raise
        except BaseException:
            await self._cancel(run)
            raise
        await on_progress(job.steps, job.steps)
        log.info("prediction succeeded", extra=run.extra)
        return replace(artifact, provider_request_id=run.prediction.id)

    def _api_url(self, given: str, default: URL) -> URL:
        """Where the API says to reach a prediction (its `urls`), when that is the API's own
        origin (where the token goes); else the protocol's own path under the base URL, as behind
        a proxy that does not rewrite the provider's URLs."""
        try:
            url = self._client.base.join(URL(given)) if given else default
        except ValueError:
            return default
        return url if url.origin() == self._client.base.origin() else default

    async def _wait(self, run: _Run, steps: int, on_progress: ProgressCallback) -> None:
        """Polls until the prediction ends; reports the provider's progress as steps (short of the
        last, which is reported once the output is in hand)."""
        assert run.prediction is not None and run.get_url is not None
        progress = StepProgress(steps, on_progress)
        while (prediction := run.prediction).status not in TERMINAL:
            await progress.report(prediction.progress)
            await asyncio.sleep(self._settings.poll_s)
            polled = await self._client.call("poll", "GET", run.get_url)
            run.prediction = replace(Prediction.from_json(polled), id=prediction.id)
        if prediction.status == "failed":
            reason = self._client.redacted(prediction.error) or "no reason given"
            raise PermanentBackendError(f"the provider failed the prediction: {reason}", "provider_failed")
        if prediction.status == "canceled":
            raise PermanentBackendError("the prediction was cancelled at the provider", "provider_cancelled")
        if prediction.status == "aborted":
            raise TransientBackendError(
                "the provider did not start the prediction before its deadline", "timeout"
            )

    async def _output(self, job: GenerationInput, prediction: Prediction) -> Artifact:
        if not prediction.output:
            raise PermanentBackendError("the prediction succeeded without an output", "bad_output")
        data, declared = await self._client.read_output(prediction.output, job.output_file())
        return await output_artifact(job, data, declared)

    async def _cancel(self, run: _Run) -> None:
        """Asks the provider to stop a prediction still running (once, bounded); failures are logged."""
        prediction, url = run.prediction, run.cancel_url
        if prediction is None or url is None or prediction.status in TERMINAL:
            return
        try:
            async with (
                asyncio.timeout(self._settings.request_timeout_s),
                self._client.session.post(url, headers=self._client.headers(url)) as response,
            ):
                log.info("prediction cancelled", extra={**run.extra, "status": response.status})
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("cannot cancel the prediction", extra={**run.extra, "error": type(exc).__name__})


class HttpBackend(PredictionBackend[HttpBackendSettings]):
    """Renders through a prediction API (see the module docstring)."""

    name = "http"

    async def _create(self, job: GenerationInput) -> Any:
        # One key per call: a repeated create within it returns the same prediction, while a later
        # attempt of the render (after a failure) gets a fresh one.
        key = f"{job.render_id}-{uuid.uuid4().hex}"
        body = (
            request_body(job)
            if (mapped := self._settings.input_template) is None
            else {"input": mapped.fill(job)}
        )
        return await self._client.call(
            "create", "POST", self._client.base / "predictions", key=key, body=body
        )
