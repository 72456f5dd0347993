"""The `fal` backend: renders through a model on fal (https://fal.ai), driven over fal's queue API.

The protocol (https://docs.fal.ai/model-endpoints/queue,
https://fal.ai/docs/api-reference/inference-api, and the official Python client: fal-ai/fal,
`projects/fal_client/src/fal_client/client.py`):

- `POST {url}/{model}` with the model's inputs as the JSON body → `{request_id, status: IN_QUEUE,
  queue_position, status_url, response_url, cancel_url}`. The model id may have a subpath
  (`fal-ai/flux/dev`); the three URLs hold only its owner and app, so they are used as given, never
  built (and must be on the API's own origin: the key goes nowhere else).
- `GET {status_url}?logs=1` → `IN_QUEUE` (with `queue_position`), `IN_PROGRESS` (with `logs`: the
  runner's log lines, `[{message, level, source, timestamp}]`), or `COMPLETED` (with `metrics`, and
  `error` and `error_type` when the request failed).
- `GET {response_url}` → the model's output: `{images: [{url, width, height, content_type}]}` for
  image models, `{video: {url, content_type}}` for video models. A URL is a file on fal's CDN
  (downloaded without the key), or a `data:` URI when the input asked for `sync_mode`. A request
  that failed answers here with the runner's own status and `{detail, error_type?}`.
- `PUT {cancel_url}`: a queued request is dropped, a running one is told to stop (202,
  `CANCELLATION_REQUESTED`; 400 `ALREADY_COMPLETED` once done).

Authentication is `Authorization: Key <key>`. The render's deadline (or, sooner, the most this
backend waits) is sent as fal's start timeout: the `X-Fal-Request-Timeout` header, which the
official client sets for `start_timeout` (`fal_client/_headers.py`, `add_timeout_header`; see
https://docs.fal.ai/documentation/model-apis/common-parameters). fal then never starts a render
after it is due: a request still queued then completes with error_type `request_timeout`.

Progress is read from the logs: the last progress-bar line (`12/28`, `43%`) of a running request.
Failures (https://fal.ai/docs/documentation/model-apis/request-errors): fal's infrastructure
error types (no runner, a runner lost, the start timeout) are transient, having already survived
fal's own retries; any other failure of the request (the model refused its input, or raised) is
permanent, `provider_failed` with fal's message, and a request cancelled at fal is
`provider_cancelled`. Requests are retried as `provider` says (429 and 5xx, honouring
Retry-After); a 401 or 403 is permanent. The key is never logged and is redacted from fal's
messages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

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
    MAX_MESSAGE,
    fraction,
    output_artifact,
)
from services.generation.backends.provider import MIB, ProviderClient, check_url, open_client
from shared.settings import ConfigError, Env

log = logging.getLogger(__name__)

DEFAULT_URL = "https://queue.fal.run"
START_TIMEOUT_HEADER = "X-Fal-Request-Timeout"
"""fal's start timeout: seconds from submission within which a runner must start the request."""
MIN_START_TIMEOUT_S = 0.2
"""The shortest start timeout sent: fal takes one above 0.1 s (the official client asks for more
than 1 s, but a render due sooner must not be started later)."""
DEFAULT_INPUT = InputTemplate.parse(
    json.dumps(
        {
            "prompt": "{prompt_with_rules}",
            "negative_prompt": "{negative_prompt}",
            "image_size": {"width": "{width}", "height": "{height}"},
            "num_inference_steps": "{steps}",
            "seed": "{seed}",
            "image_url": "{image}",
        }
    ),
    "the fal backend's default input",
)
"""The inputs fal's text-to-image models (FLUX, SDXL, ...) share; a model that takes others needs
RENDERFLOW_BACKEND_FAL_INPUT."""
INFRASTRUCTURE_ERRORS = frozenset(
    {
        "request_timeout",
        "startup_timeout",
        "runner_scheduling_failure",
        "runner_connection_timeout",
        "runner_disconnected",
        "runner_connection_refused",
        "runner_connection_error",
        "runner_incomplete_response",
        "internal_error",
    }
)
"""fal's error types of a request that failed for want of a runner, not because of what it asked:
another attempt later may succeed."""
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)+")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,200}")
_KEY_REFUSED = frozenset({"http_401", "http_403"})


@dataclass(frozen=True)
class FalSettings:
    """Which fal model renders, with which inputs, and how patiently it is driven."""

    model: str
    """RENDERFLOW_BACKEND_FAL_MODEL: the model's endpoint id, e.g. `fal-ai/flux/dev` (owner, app and
    an optional path); required."""
    token: str = field(default="", repr=False)
    """RENDERFLOW_BACKEND_FAL_KEY: the fal API key, sent as `Authorization: Key <key>` to the queue's
    origin only; required, a secret, never logged."""
    url: str = DEFAULT_URL
    """RENDERFLOW_BACKEND_FAL_URL: the queue API's base URL (a request is submitted to
    `{url}/{model}`)."""
    input_template: InputTemplate = DEFAULT_INPUT
    """RENDERFLOW_BACKEND_FAL_INPUT: the model's inputs as a JSON template of placeholders (see
    `backends/inputs.py`), checked at start; unset: `prompt` (with the rules), `negative_prompt`,
    `image_size` as `{width, height}`, `num_inference_steps`, `seed` and `image_url` (the reference,
    as a data URI)."""
    poll_s: float = 0.5
    """RENDERFLOW_BACKEND_FAL_POLL_S: the pause between two status polls."""
    request_timeout_s: float = 30.0
    """RENDERFLOW_BACKEND_FAL_TIMEOUT_S: longest wait to connect, or for any read, in one request."""
    max_wait_s: float = 900.0
    """RENDERFLOW_BACKEND_FAL_MAX_WAIT_S: the longest one render may take, from submission to output;
    also the start timeout sent to fal when the render's deadline is later or absent."""
    attempts: int = 5
    """RENDERFLOW_BACKEND_FAL_ATTEMPTS: tries of each request (submit, poll, result, fetch), first
    included."""
    backoff_s: float = 0.5
    """RENDERFLOW_BACKEND_FAL_BACKOFF_S: first pause between tries; it doubles, with jitter."""
    backoff_max_s: float = 30.0
    """RENDERFLOW_BACKEND_FAL_BACKOFF_MAX_S: the cap of that pause, and of a Retry-After honoured."""
    max_output_bytes: int = 512 * MIB
    """RENDERFLOW_BACKEND_FAL_MAX_OUTPUT_BYTES: the largest output accepted."""

    @classmethod
    def from_env(cls, env: Env) -> FalSettings:
        """Settings from `RENDERFLOW_BACKEND_FAL_*`; ConfigError names a bad one."""
        model = env.optional("RENDERFLOW_BACKEND_FAL_MODEL")
        if model is None:
            raise ConfigError("RENDERFLOW_BACKEND_FAL_MODEL is required by the fal backend")
        if not _MODEL.fullmatch(model):
            raise ConfigError(
                "RENDERFLOW_BACKEND_FAL_MODEL must be a fal endpoint id such as fal-ai/flux/dev, "
                f"got {model!r}"
            )
        token = env.str("RENDERFLOW_BACKEND_FAL_KEY", "")
        if not token:
            raise ConfigError("RENDERFLOW_BACKEND_FAL_KEY is required by the fal backend")
        url = env.str("RENDERFLOW_BACKEND_FAL_URL", DEFAULT_URL)
        check_url(url, "RENDERFLOW_BACKEND_FAL_URL", "RENDERFLOW_BACKEND_FAL_KEY")
        template = env.optional("RENDERFLOW_BACKEND_FAL_INPUT")
        return cls(
            model=model,
            token=token,
            url=url,
            input_template=(
                InputTemplate.parse(template, "RENDERFLOW_BACKEND_FAL_INPUT") if template else DEFAULT_INPUT
            ),
            poll_s=env.float("RENDERFLOW_BACKEND_FAL_POLL_S", cls.poll_s, minimum=0.01),
            request_timeout_s=env.float(
                "RENDERFLOW_BACKEND_FAL_TIMEOUT_S", cls.request_timeout_s, minimum=0.01
            ),
            max_wait_s=env.float("RENDERFLOW_BACKEND_FAL_MAX_WAIT_S", cls.max_wait_s, minimum=0.1),
            attempts=env.int("RENDERFLOW_BACKEND_FAL_ATTEMPTS", cls.attempts, minimum=1),
            backoff_s=env.float("RENDERFLOW_BACKEND_FAL_BACKOFF_S", cls.backoff_s, minimum=0),
            backoff_max_s=env.float("RENDERFLOW_BACKEND_FAL_BACKOFF_MAX_S", cls.backoff_max_s, minimum=0),
            max_output_bytes=env.int(
                "RENDERFLOW_BACKEND_FAL_MAX_OUTPUT_BYTES", cls.max_output_bytes, minimum=1
            ),
        )


@dataclass
class _Run:
    """One call of `generate`: the request as submitted, for following and cancelling it."""

    render_id: str
    request_id: str = ""
    status_url: URL | None = None
    response_url: URL | None = None
    cancel_url: URL | None = None
    completed: bool = False
    """fal said COMPLETED: nothing left to cancel."""

    @property
    def extra(self) -> dict[str, str]:
        """Log fields (never the key, never a URL)."""
        fields = {"render_id": self.render_id}
        if self.request_id:
            fields["request_id"] = self.request_id
        return fields


class FalBackend:
    """Renders through a model on fal's queue (see the module docstring)."""

    name = "fal"

    def __init__(self, client: ProviderClient, settings: FalSettings) -> None:
        self._client = client
        self._settings = settings

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: FalSettings) -> AsyncIterator[FalBackend]:
        """A backend with its own session, closed on exit."""
        async with open_client(settings, auth_scheme="Key") as client:
            yield cls(client, settings)

    async def generate(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
        """Submits the request, polls it to its end, fetches and checks its output.

        Running past `max_wait_s` cancels the request and raises a *transient* error (a busy
        queue now may be quick on the next attempt, and the runner bounds the attempts).
        Cancelling the task, or any other failure while the request is open, cancels it at fal too
        (best effort, bounded by the request timeout): fal bills what runs."""
        run = _Run(job.render_id)
        try:
            async with asyncio.timeout(self._settings.max_wait_s):
                await self._submit(run, job)
                status = await self._wait(run, job.steps, on_progress)
                result = await self._result(run, status)
                artifact = await self._output(job, result)
        except TimeoutError:
            await self._cancel(run)
            raise TransientBackendError(
                f"fal did not finish within {self._settings.max_wait_s:g} s", "timeout", run.request_id
            ) from None
        except BackendError as exc:
            await self._cancel(run)
            exc.provider_request_id = run.request_id or exc.provider_request_id
            raise
        except BaseException:
            await self._cancel(run)
            raise
        await on_progress(job.steps, job.steps)
        log.info("fal request succeeded", extra=run.extra)
        return replace(artifact, provider_request_id=run.request_id)

    def _start_timeout(self, job: GenerationInput) -> str:
        """The start timeout sent with `job`: the seconds left before its deadline, at most
        `max_wait_s` (this backend gives up then anyway), rounded down to a tenth."""
        seconds = self._settings.max_wait_s
        if job.deadline is not None:
            seconds = min(seconds, (job.deadline - datetime.now(UTC)).total_seconds())
        return str(max(MIN_START_TIMEOUT_S, math.floor(seconds * 10) / 10))

    async def _submit(self, run: _Run, job: GenerationInput) -> None:
        answer = await self._client.call(
            "submit",
            "POST",
            self._client.base / self._settings.model,
            body=self._settings.input_template.fill(job),
            headers={START_TIMEOUT_HEADER: self._start_timeout(job)},
        )
        request_id = answer.get("request_id") if isinstance(answer, dict) else None
        if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
            raise PermanentBackendError(
                "fal answered the submission without a usable request_id", "bad_response"
            )
        run.request_id = request_id
        run.status_url = self._queue_url(answer, "status_url")
        run.response_url = self._queue_url(answer, "response_url")
        run.cancel_url = self._queue_url(answer, "cancel_url")
        log.info("fal request submitted", extra={**run.extra, "queue_position": answer.get("queue_position")})

    def _queue_url(self, answer: dict[str, Any], name: str) -> URL:
        """One of the submission's URLs, which must be on the queue's own origin (the key is sent
        to it, and nowhere else)."""
        value = answer.get(name)
        try:
            url = self._client.base.join(URL(value)) if isinstance(value, str) else None
        except ValueError:
            url = None
        if url is None or url.origin() != self._client.base.origin():
            raise PermanentBackendError(
                f"fal's {name} is missing or not on the queue's origin", "bad_response"
            )
        return url

    async def _wait(self, run: _Run, steps: int, on_progress: ProgressCallback) -> dict[str, Any]:
        """Polls until the request is COMPLETED, reporting the progress its logs show as steps
        (short of the last, reported once the output is in hand); its final status."""
        assert run.status_url is not None
        url = run.status_url.update_query(logs="1")
        progress = StepProgress(steps, on_progress)
        while True:
            await asyncio.sleep(self._settings.poll_s)
            status = await self._client.call("status", "GET", url)
            if not isinstance(status, dict):
                raise PermanentBackendError("fal's status is not a JSON object", "bad_response")
            state = status.get("status")
            if state == "COMPLETED":
                run.completed = True
                return status
            if state not in ("IN_QUEUE", "IN_PROGRESS"):
                shown = self._client.redacted(str(state))[:40]
                raise PermanentBackendError(f"fal answered an unknown status {shown!r}", "bad_response")
            await progress.report(log_progress(status.get("logs")))

    async def _result(self, run: _Run, status: dict[str, Any]) -> Any:
        """The output of a completed request; its failure, as the status or the result says it."""
        error = status.get("error")
        if error:
            raise self._failure(error, status.get("error_type"))
        assert run.response_url is not None
        try:
            return await self._client.call("result", "GET", run.response_url)
        except PermanentBackendError as exc:
            if exc.reason in _KEY_REFUSED:
                raise
            # The result replays the runner's refusal (422 and the model's `detail`, ...).
            raise PermanentBackendError(f"fal failed the request: {exc}", "provider_failed") from None

    def _failure(self, error: Any, error_type: Any) -> BackendError:
        message = self._client.redacted(error if isinstance(error, str) else json.dumps(error))[:MAX_MESSAGE]
        if error_type == "client_cancelled":
            return PermanentBackendError(f"the request was cancelled at fal: {message}", "provider_cancelled")
        if error_type in INFRASTRUCTURE_ERRORS:
            return TransientBackendError(f"fal could not run the request: {message}", error_type)
        return PermanentBackendError(f"fal failed the request: {message}", "provider_failed")

    async def _output(self, job: GenerationInput, result: Any) -> Artifact:
        """The output file the result names (the first image, or the video), checked."""
        file = _file(result, job.kind)
        if file is None:
            noun = "an image" if job.kind == "image" else "a video"
            raise PermanentBackendError(f"fal's result holds no {noun}", "bad_output")
        url, declared = file["url"], file.get("content_type")
        data, served = await self._client.read_output(url, job.output_file())
        return await output_artifact(job, data, served or (declared if isinstance(declared, str) else ""))

    async def _cancel(self, run: _Run) -> None:
        """Asks fal to drop or stop a request still open (bounded by the request timeout; a
        failure is logged, not raised)."""
        if run.cancel_url is None or run.completed:
            return
        try:
            async with asyncio.timeout(self._settings.request_timeout_s):
                answer = await self._client.call("cancel", "PUT", run.cancel_url)
            said = answer.get("status") if isinstance(answer, dict) else None
            log.info("fal request cancelled", extra={**run.extra, "answer": str(said)[:40]})
        except (BackendError, TimeoutError) as exc:
            reason = exc.reason if isinstance(exc, BackendError) else "timeout"
            log.warning("cannot cancel the fal request", extra={**run.extra, "reason": reason})


def log_progress(logs: Any) -> float | None:
    """How far along a running request is (0..1), as the last progress bar in its logs (fal's
    `[{message, ...}]`) says; None when none does."""
    if not isinstance(logs, list):
        return None
    for entry in reversed(logs):
        message = entry.get("message") if isinstance(entry, dict) else None
        if isinstance(message, str) and (done := fraction(None, message)) is not None:
            return done
    return None


def _file(result: Any, kind: str) -> dict[str, Any] | None:
    """The output's fal File object (`{url, content_type?, ...}`): `video` for a video, else the
    first of `images` (or a lone `image`)."""
    if not isinstance(result, dict):
        return None
    if kind == "video":
        candidates = [result.get("video")]
    else:
        images = result.get("images")
        candidates = [images[0] if isinstance(images, list) and images else None, result.get("image")]
    for candidate in candidates:
        if isinstance(candidate, dict) and isinstance(candidate.get("url"), str):
            return candidate
    return None
