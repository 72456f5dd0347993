"""The `openai` backend: images from an OpenAI-compatible images API (OpenAI itself, and the many
self-hosted servers that speak it).

One request does it: `POST {url}/images/generations` `{prompt, n: 1, size, model?, response_format?}`
answers, once the image exists, `{created, data: [{b64_json} | {url}], output_format?}`; a URL is
downloaded (without the token, unless it is the API's own origin). There is no progress to follow
and nothing to cancel at the provider: cancelling the render closes the request.

What a render says that the API has no field for goes into the prompt: the render's rules each on a
line of their own after it, and its negative prompt as a last line (`Avoid: ...`). The API has no
seed and no steps. Sizes: sent as the render's `WIDTHxHEIGHT`, or, when the operator lists the sizes
the model accepts (RENDERFLOW_BACKEND_OPENAI_SIZES), the listed size nearest in aspect ratio (the
output says what it really is). The generations route takes no input image: a render with a
reference fails at once (`reference_unsupported`), and so does a video.

Errors (https://platform.openai.com/docs/guides/error-codes): 429 and 5xx are retried as
`provider` says, honouring Retry-After; a 400 is permanent (a refused prompt's reason is the API's
error code, e.g. `content_policy_violation`), and so are 401 and 403 (the token).
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from services.generation.backends import (
    Artifact,
    BackendError,
    GenerationInput,
    PermanentBackendError,
    ProgressCallback,
)
from services.generation.backends.predictions import output_artifact
from services.generation.backends.provider import MIB, ProviderClient, check_url, open_client
from shared.settings import ConfigError, Env

log = logging.getLogger(__name__)

RESPONSE_FORMATS = ("b64_json", "url", "none")
REQUEST_ID_HEADER = "x-request-id"
"""The response header naming the API's id of a request (what its support asks for)."""


@dataclass(frozen=True)
class OpenAiImagesSettings:
    """Where the images API is, which model it runs, and how patiently it is called."""

    url: str
    """RENDERFLOW_BACKEND_OPENAI_URL: the API's base URL, images at `{url}/images/generations`
    (OpenAI: `https://api.openai.com/v1`)."""
    token: str = field(default="", repr=False)
    """RENDERFLOW_BACKEND_OPENAI_TOKEN: sent as `Authorization: Bearer` to the API's origin only; a
    secret, never logged."""
    model: str = ""
    """RENDERFLOW_BACKEND_OPENAI_MODEL: sent as `model` (e.g. `gpt-image-1`, `dall-e-3`); empty: not
    sent, the server's default."""
    response_format: str = "b64_json"
    """RENDERFLOW_BACKEND_OPENAI_RESPONSE_FORMAT: `b64_json`, `url`, or `none` to send no such field
    (GPT image models refuse it and always answer `b64_json`); empty in code means `none`."""
    sizes: tuple[str, ...] = ()
    """RENDERFLOW_BACKEND_OPENAI_SIZES: the sizes the model accepts, comma-separated (e.g.
    `1024x1024,1536x1024,1024x1536`): a render is sent the one nearest its aspect ratio; empty: its
    own width x height."""
    request_timeout_s: float = 300.0
    """RENDERFLOW_BACKEND_OPENAI_TIMEOUT_S: longest wait to connect, or for the answer, which comes
    when the image is made."""
    attempts: int = 3
    """RENDERFLOW_BACKEND_OPENAI_ATTEMPTS: tries of each request, first included."""
    backoff_s: float = 1.0
    """RENDERFLOW_BACKEND_OPENAI_BACKOFF_S: first pause between tries; it doubles, with jitter."""
    backoff_max_s: float = 60.0
    """RENDERFLOW_BACKEND_OPENAI_BACKOFF_MAX_S: the cap of that pause, and of a Retry-After honoured."""
    max_output_bytes: int = 64 * MIB
    """RENDERFLOW_BACKEND_OPENAI_MAX_OUTPUT_BYTES: the largest image accepted."""

    @classmethod
    def from_env(cls, env: Env) -> OpenAiImagesSettings:
        """Settings from `RENDERFLOW_BACKEND_OPENAI_*`; ConfigError names a bad one."""
        url = env.optional("RENDERFLOW_BACKEND_OPENAI_URL")
        if url is None:
            raise ConfigError("RENDERFLOW_BACKEND_OPENAI_URL is required by the openai backend")
        check_url(url, "RENDERFLOW_BACKEND_OPENAI_URL", "RENDERFLOW_BACKEND_OPENAI_TOKEN")
        response_format = env.str("RENDERFLOW_BACKEND_OPENAI_RESPONSE_FORMAT", cls.response_format)
        if response_format not in RESPONSE_FORMATS:
            raise ConfigError(
                "RENDERFLOW_BACKEND_OPENAI_RESPONSE_FORMAT must be b64_json, url or none, "
                f"got {response_format!r}"
            )
        sizes = tuple(size.strip() for size in env.list("RENDERFLOW_BACKEND_OPENAI_SIZES"))
        for size in sizes:
            _dimensions(size, "RENDERFLOW_BACKEND_OPENAI_SIZES")
        return cls(
            url=url,
            token=env.str("RENDERFLOW_BACKEND_OPENAI_TOKEN", ""),
            model=env.str("RENDERFLOW_BACKEND_OPENAI_MODEL", ""),
            response_format="" if response_format == "none" else response_format,
            sizes=sizes,
            request_timeout_s=env.float(
                "RENDERFLOW_BACKEND_OPENAI_TIMEOUT_S", cls.request_timeout_s, minimum=0.01
            ),
            attempts=env.int("RENDERFLOW_BACKEND_OPENAI_ATTEMPTS", cls.attempts, minimum=1),
            backoff_s=env.float("RENDERFLOW_BACKEND_OPENAI_BACKOFF_S", cls.backoff_s, minimum=0),
            backoff_max_s=env.float("RENDERFLOW_BACKEND_OPENAI_BACKOFF_MAX_S", cls.backoff_max_s, minimum=0),
            max_output_bytes=env.int(
                "RENDERFLOW_BACKEND_OPENAI_MAX_OUTPUT_BYTES", cls.max_output_bytes, minimum=1
            ),
        )


class OpenAiImagesBackend:
    """Renders images through an OpenAI-compatible images API (see the module docstring)."""

    name = "openai"

    def __init__(self, client: ProviderClient, settings: OpenAiImagesSettings) -> None:
        self._client = client
        self._settings = settings

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: OpenAiImagesSettings) -> AsyncIterator[OpenAiImagesBackend]:
        """A backend with its own session, closed on exit."""
        async with open_client(settings, error_code) as client:
            yield cls(client, settings)

    async def generate(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
        """Asks for the image and checks what comes back."""
        if job.kind != "image":
            raise PermanentBackendError("the openai backend makes images only", "unsupported_kind")
        if job.reference is not None:
            raise PermanentBackendError(
                "the openai backend takes no reference image (its generations route has no input image)",
                "reference_unsupported",
            )
        url = self._client.base / "images" / "generations"
        answer, request_id = await self._client.call_with_id(
            "generate", "POST", url, body=self.request_body(job), id_header=REQUEST_ID_HEADER
        )
        try:
            data, declared = await self._image(answer)
            artifact = await output_artifact(job, data, declared)
        except BackendError as exc:
            exc.provider_request_id = request_id
            raise
        await on_progress(job.steps, job.steps)
        log.info("image generated", extra={"render_id": job.render_id, "request_id": request_id})
        return replace(artifact, provider_request_id=request_id)

    def request_body(self, job: GenerationInput) -> dict[str, Any]:
        """The request for one image of `job`."""
        body: dict[str, Any] = {"prompt": prompt_text(job), "n": 1, "size": self._size(job.width, job.height)}
        if self._settings.model:
            body["model"] = self._settings.model
        if self._settings.response_format:
            body["response_format"] = self._settings.response_format
        return body

    def _size(self, width: int, height: int) -> str:
        if not self._settings.sizes:
            return f"{width}x{height}"
        ratio = width / height

        def distance(size: str) -> float:
            w, h = _dimensions(size, "size")
            return abs(w / h - ratio) + abs(w * h - width * height) / 1e9  # ratio first, then area

        return min(self._settings.sizes, key=distance)

    async def _image(self, answer: Any) -> tuple[bytes | Path, str]:
        """The bytes of the first image of an answer, and the type it declares."""
        images = answer.get("data") if isinstance(answer, dict) else None
        first = images[0] if isinstance(images, list) and images else None
        if not isinstance(first, dict):
            raise PermanentBackendError("the answer holds no image", "bad_output")
        output_format = answer.get("output_format")
        declared = f"image/{output_format}" if isinstance(output_format, str) and output_format else ""
        if isinstance(first.get("b64_json"), str):
            try:
                return base64.b64decode(first["b64_json"], validate=True), declared
            except binascii.Error:
                raise PermanentBackendError("the image is not valid base64", "bad_output") from None
        if isinstance(first.get("url"), str):
            return await self._client.fetch(self._client.output_url(first["url"]))
        raise PermanentBackendError("the answer's image has neither b64_json nor url", "bad_output")


def error_code(body: Any) -> str | None:
    """The API's error code of a refusal (`{"error": {"code": "content_policy_violation", ...}}`)."""
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def prompt_text(job: GenerationInput) -> str:
    """The prompt, the render's rules each on a line of its own, then what to avoid."""
    lines = [job.prompt, *job.rules]
    if job.negative_prompt:
        lines.append(f"Avoid: {job.negative_prompt}")
    return "\n".join(lines)


def _dimensions(size: str, variable: str) -> tuple[int, int]:
    width, _, height = size.partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise ConfigError(f"{variable}: {size!r} is not a WIDTHxHEIGHT size")
    return int(width), int(height)
