"""The `replicate` backend: renders on Replicate (https://replicate.com) through its HTTP API.

Written from Replicate's documentation:
- HTTP API reference, https://replicate.com/docs/reference/http: `POST /v1/models/{owner}/{name}/
  predictions` `{input}` runs an official model by name (`models.predictions.create`); `POST
  /v1/predictions` `{version, input}` runs a model version (`predictions.create`); `GET
  /v1/predictions/{id}` (`predictions.get`); `POST /v1/predictions/{id}/cancel`
  (`predictions.cancel`). A prediction is `{id, model, version, input, logs, output, error, status:
  starting|processing|succeeded|failed|canceled, created_at, started_at, completed_at, urls: {get,
  cancel, stream?}, metrics}`; output files are HTTPS URLs on `replicate.delivery`, kept an hour.
- Sync mode, https://replicate.com/docs/topics/predictions/create-a-prediction: `Prefer: wait=N`
  (1 to 60 s) holds the create open until the prediction ends or N seconds pass; an ended one
  answers 201 with its output, one still running 202, to be polled.
- Deadlines, https://replicate.com/changelog/2025-10-16-prediction-deadlines: `Cancel-After: 1m` on
  create has Replicate cancel a prediction still running then (`canceled`), or drop one not yet
  started (`aborted`, not billed).
- Rate limits, https://replicate.com/docs/topics/predictions/rate-limits: 600 creates a minute, 3000
  other requests; over it, 429 `{"detail": "Request was throttled. Your rate limit resets in
  ~30s."}`. Errors are problem details `{title, detail, status}` (401 `Unauthenticated`, 422 `Input
  validation failed` or `Invalid version or not permitted`, as replicate/replicate-python#47 shows).

Following the prediction is the `http` backend's `PredictionBackend` (the generic protocol was
modelled on Replicate's): it polls the prediction's `urls.get`, reads progress from the progress bar
lines in its `logs` (`24%|██▍  | 12/50 [...]`), takes the first output of a list (or a data URL),
downloads it without the token (the token goes to the API's origin only) and checks the bytes, and
cancels through `urls.cancel` when the render is cancelled, times out or fails. Transport (retries of
429 honouring Retry-After, of 5xx and lost connections; 401, 403, 422 permanent with Replicate's
title and detail in the message) is `provider`'s. The prediction's id is the render's
`provider_request_id`, on success and on failure.

Creating twice: Replicate documents no idempotency key, and its own Python client never retries a
POST. A create is nonetheless retried here like any request: a 429 created nothing (safe), but a 5xx
or a connection lost after Replicate accepted the create may hide a prediction whose id never came
back, and the retry then starts a second (billed) one. Not retrying would mostly move that second
create to the runner's next attempt of the render (the failure is transient either way) while
giving up the quick recovery from a passing 502. What bounds the cost is `Cancel-After`: each
prediction is created with a deadline a little past the render's own bound (its `max_wait_s`, or
the render's deadline if sooner; sent as a duration, `15m10s`), so one nobody follows any more (a
lost create, a worker killed mid-render, a cancel that did not get through) is stopped by Replicate
itself. An operator who wants at most one prediction per attempt of a render sets
RENDERFLOW_BACKEND_REPLICATE_ATTEMPTS to 1 (polls and downloads then get one try too).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from services.generation.backends import GenerationInput
from services.generation.backends.http import PredictionBackend
from services.generation.backends.inputs import InputTemplate
from services.generation.backends.provider import MIB, check_url
from shared.settings import ConfigError, Env

API_URL = "https://api.replicate.com/v1"
MAX_WAIT_HEADER_S = 60
"""The longest `Prefer: wait=N` Replicate accepts."""
WAIT_READ_MARGIN_S = 5.0
"""How much longer than the sync wait the create's read timeout must be: Replicate answers when the
wait is over, and a read timed out just before would look like a lost create (and be retried)."""
CANCEL_AFTER_GRACE_S = 10
"""How long after the render's own bound Replicate's deadline falls: our timeout fires first and
cancels the prediction itself (reporting why); Replicate's deadline is the backstop."""
DEFAULT_INPUT = InputTemplate(
    {
        "prompt": "{prompt_with_rules}",
        "negative_prompt": "{negative_prompt}",
        "width": "{width}",
        "height": "{height}",
        "num_inference_steps": "{steps}",
        "seed": "{seed}",
        "image": "{image}",
    }
)
"""The inputs of the common text-to-image models (Stable Diffusion and SDXL alike): a model that
names its inputs otherwise (`aspect_ratio`, `num_frames`, ...) needs its own template."""
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
_MODEL = re.compile(rf"({_NAME})/({_NAME})")
_VERSION = re.compile(rf"(?:{_NAME}/{_NAME}:)?[0-9a-f]{{64}}")


@dataclass(frozen=True)
class ReplicateSettings:
    """Which model runs on Replicate, with which inputs, and how patiently it is driven."""

    token: str = field(default="", repr=False)
    """RENDERFLOW_BACKEND_REPLICATE_TOKEN: the API token (`r8_...`), sent as `Authorization: Bearer`
    to the API's origin only; required; a secret, never logged."""
    model: str = ""
    """RENDERFLOW_BACKEND_REPLICATE_MODEL: an official model as `owner/name` (e.g.
    `black-forest-labs/flux-schnell`), run at its latest version; set this or
    RENDERFLOW_BACKEND_REPLICATE_VERSION, not both."""
    version: str = ""
    """RENDERFLOW_BACKEND_REPLICATE_VERSION: a model version, its 64-character id or
    `owner/name:id` (a community model, or an official one pinned); set this or
    RENDERFLOW_BACKEND_REPLICATE_MODEL, not both."""
    url: str = API_URL
    """RENDERFLOW_BACKEND_REPLICATE_URL: the API's base URL (a proxy in front of it, say)."""
    input_template: InputTemplate = DEFAULT_INPUT
    """RENDERFLOW_BACKEND_REPLICATE_INPUT: the model's inputs as a JSON template of placeholders (see
    `backends/inputs.py`), checked at start; unset: `prompt` (with the rules), `negative_prompt`,
    `width`, `height`, `num_inference_steps`, `seed` and `image` (the reference, a data URL), as
    the common text-to-image models name them."""
    wait_s: int = 0
    """RENDERFLOW_BACKEND_REPLICATE_WAIT_S: sync mode, `Prefer: wait=N` (1 to 60): Replicate holds
    the create open up to N seconds and a prediction ended by then needs no poll. 0 (the default)
    is off, because while the create is held the render shows no progress, and a render cancelled
    then cannot cancel its prediction (its id is not known yet: Replicate stops it at its
    deadline). Worth a few seconds for models that take about that long, where a poll interval is
    much of the wait. Must be shorter than the timeout of a request, by 5 s."""
    poll_s: float = 1.0
    """RENDERFLOW_BACKEND_REPLICATE_POLL_S: the pause between two status polls."""
    request_timeout_s: float = 30.0
    """RENDERFLOW_BACKEND_REPLICATE_TIMEOUT_S: longest wait to connect, or for any read, in one
    request (a sync create's included)."""
    max_wait_s: float = 900.0
    """RENDERFLOW_BACKEND_REPLICATE_MAX_WAIT_S: the longest one render may take, from create to
    output; Replicate is told to cancel the prediction a little after it (`Cancel-After`)."""
    attempts: int = 5
    """RENDERFLOW_BACKEND_REPLICATE_ATTEMPTS: tries of each request (create, poll, fetch), first
    included; 1 never creates twice (see the module docstring), nor retries a poll."""
    backoff_s: float = 0.5
    """RENDERFLOW_BACKEND_REPLICATE_BACKOFF_S: first pause between tries; it doubles, with jitter."""
    backoff_max_s: float = 30.0
    """RENDERFLOW_BACKEND_REPLICATE_BACKOFF_MAX_S: the cap of that pause, and of a Retry-After
    honoured (Replicate's rate limits reset within about 30 s)."""
    max_output_bytes: int = 512 * MIB
    """RENDERFLOW_BACKEND_REPLICATE_MAX_OUTPUT_BYTES: the largest output accepted."""

    @classmethod
    def from_env(cls, env: Env) -> ReplicateSettings:
        """Settings from `RENDERFLOW_BACKEND_REPLICATE_*`; ConfigError names a bad one."""
        url = env.str("RENDERFLOW_BACKEND_REPLICATE_URL", API_URL)
        check_url(url, "RENDERFLOW_BACKEND_REPLICATE_URL", "RENDERFLOW_BACKEND_REPLICATE_TOKEN")
        token = env.str("RENDERFLOW_BACKEND_REPLICATE_TOKEN", "")
        if not token:
            raise ConfigError("RENDERFLOW_BACKEND_REPLICATE_TOKEN is required by the replicate backend")
        model = env.str("RENDERFLOW_BACKEND_REPLICATE_MODEL", "").strip()
        version = env.str("RENDERFLOW_BACKEND_REPLICATE_VERSION", "").strip()
        _check_model(model, version)
        template = env.optional("RENDERFLOW_BACKEND_REPLICATE_INPUT")
        settings = cls(
            token=token,
            model=model,
            version=version,
            url=url,
            input_template=InputTemplate.parse(template, "RENDERFLOW_BACKEND_REPLICATE_INPUT")
            if template
            else DEFAULT_INPUT,
            wait_s=env.int("RENDERFLOW_BACKEND_REPLICATE_WAIT_S", cls.wait_s, minimum=0),
            poll_s=env.float("RENDERFLOW_BACKEND_REPLICATE_POLL_S", cls.poll_s, minimum=0.01),
            request_timeout_s=env.float(
                "RENDERFLOW_BACKEND_REPLICATE_TIMEOUT_S", cls.request_timeout_s, minimum=0.01
            ),
            max_wait_s=env.float("RENDERFLOW_BACKEND_REPLICATE_MAX_WAIT_S", cls.max_wait_s, minimum=0.1),
            attempts=env.int("RENDERFLOW_BACKEND_REPLICATE_ATTEMPTS", cls.attempts, minimum=1),
            backoff_s=env.float("RENDERFLOW_BACKEND_REPLICATE_BACKOFF_S", cls.backoff_s, minimum=0),
            backoff_max_s=env.float(
                "RENDERFLOW_BACKEND_REPLICATE_BACKOFF_MAX_S", cls.backoff_max_s, minimum=0
            ),
            max_output_bytes=env.int(
                "RENDERFLOW_BACKEND_REPLICATE_MAX_OUTPUT_BYTES", cls.max_output_bytes, minimum=1
            ),
        )
        if settings.wait_s > MAX_WAIT_HEADER_S:
            raise ConfigError(
                f"RENDERFLOW_BACKEND_REPLICATE_WAIT_S must be at most {MAX_WAIT_HEADER_S} (Replicate's "
                f"limit), got {settings.wait_s}"
            )
        if settings.wait_s and settings.request_timeout_s < settings.wait_s + WAIT_READ_MARGIN_S:
            raise ConfigError(
                "RENDERFLOW_BACKEND_REPLICATE_TIMEOUT_S must exceed RENDERFLOW_BACKEND_REPLICATE_WAIT_S "
                f"by {WAIT_READ_MARGIN_S:g} s at least (the create is held that long), got "
                f"{settings.request_timeout_s:g} and {settings.wait_s}"
            )
        return settings


def _check_model(model: str, version: str) -> None:
    if bool(model) == bool(version):
        raise ConfigError(
            "the replicate backend runs one model: set RENDERFLOW_BACKEND_REPLICATE_MODEL (owner/name) "
            "or RENDERFLOW_BACKEND_REPLICATE_VERSION (a version id), "
            + ("not both" if model else "got neither")
        )
    if model and not _MODEL.fullmatch(model):
        hint = "; a version goes in RENDERFLOW_BACKEND_REPLICATE_VERSION" if ":" in model else ""
        raise ConfigError(f"RENDERFLOW_BACKEND_REPLICATE_MODEL must be owner/name, got {model!r}{hint}")
    if version and not _VERSION.fullmatch(version):
        raise ConfigError(
            "RENDERFLOW_BACKEND_REPLICATE_VERSION must be a 64-character version id (or owner/name:id), "
            f"got {version!r}"
        )


class ReplicateBackend(PredictionBackend[ReplicateSettings]):
    """Renders images, and videos when the model makes MP4s, on Replicate (module docstring);
    `open(settings)` gives one with its own session."""

    name = "replicate"

    async def _create(self, job: GenerationInput) -> Any:
        """Creates the prediction: by model or version, with its deadline, in sync mode if set."""
        settings = self._settings
        body: dict[str, Any] = {"input": settings.input_template.fill(job)}
        if settings.version:
            url = self._client.base / "predictions"
            body["version"] = settings.version
        else:
            owner, name = settings.model.split("/")
            url = self._client.base / "models" / owner / name / "predictions"
        headers = {"Cancel-After": self.cancel_after(job)}
        if settings.wait_s:
            headers["Prefer"] = f"wait={settings.wait_s}"
        return await self._client.call("create", "POST", url, body=body, headers=headers)

    def cancel_after(self, job: GenerationInput) -> str:
        """The prediction's deadline at Replicate, as `Cancel-After` says it (a duration such as
        `1m` or `15m10s`): a little past the render's own bound, its `max_wait_s` or its deadline
        if that is sooner."""
        bound = self._settings.max_wait_s
        if job.deadline is not None:
            deadline = job.deadline if job.deadline.tzinfo else job.deadline.replace(tzinfo=UTC)
            bound = min(bound, (deadline - datetime.now(UTC)).total_seconds())
        minutes, seconds = divmod(math.ceil(max(bound, 0.0)) + CANCEL_AFTER_GRACE_S, 60)
        return (f"{minutes}m" if minutes else "") + (f"{seconds}s" if seconds or not minutes else "")
