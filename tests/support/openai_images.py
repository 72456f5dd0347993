"""A stand-in for an OpenAI-compatible images API: a real aiohttp server on 127.0.0.1 that answers
as the API reference describes, and misbehaves as a test tells it to.

Written from OpenAI's documentation:
- Create image, https://platform.openai.com/docs/api-reference/images/create: `POST
  /v1/images/generations` with JSON `{prompt (required), model?, n? (1-10, dall-e-3: 1), size?,
  response_format? (url | b64_json; dall-e models only: GPT image models always answer b64_json and
  refuse the field), quality?, ...}`.
- The image response, https://platform.openai.com/docs/api-reference/images/object: `{created (unix
  seconds), data: [{b64_json | url, revised_prompt?}], output_format? (png | jpeg | webp)}`; a URL
  answer points at the generated file (on another host, valid for an hour).
- Errors, https://platform.openai.com/docs/guides/error-codes: `{"error": {"message", "type",
  "param", "code"}}`; 400 `invalid_request_error` (a refused prompt: code
  `content_policy_violation`), 401 `invalid_api_key`, 429 rate limit (with `Retry-After`, see
  https://platform.openai.com/docs/guides/rate-limits), 500/503 server errors.

The image is real: a PNG of the asked size, filled with a colour taken from the prompt, so a test
can tell which request made it. Files for URL answers are served by a second server (another
origin, as a CDN would be), which records the headers it gets.

Behaviour, by constructor keywords or attributes:

| attribute | effect |
| --- | --- |
| `token` | requests without `Authorization: Bearer <token>` get 401 `invalid_api_key` |
| `gpt_image` | behave as a GPT image model: refuse `response_format`, answer b64_json with `output_format` |
| `failures` | a list of (status, error code, Retry-After or None) answered first, one per request |
| `hold` | an Event generation waits for (a slow render): `held` is set then, `gone` when its client left |
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import time
from types import TracebackType
from typing import Any

from aiohttp import web
from PIL import Image

from tests.support import serve_on_loopback

_SIZES_DALL_E_3 = {"1024x1024", "1792x1024", "1024x1792"}


def _error(status: int, message: str, code: str | None, kind: str = "invalid_request_error") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status)


def png(width: int, height: int, prompt: str) -> bytes:
    """A PNG of that size in a colour of the prompt."""
    colour = tuple(hashlib.sha256(prompt.encode()).digest()[:3])
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG")
    return buffer.getvalue()


class OpenAiImagesStandIn:
    """The API (`url` is its base, `.../v1`) and its file host; `requests` holds each JSON body
    received, `headers` each request's headers, `file_headers` those of file downloads."""

    def __init__(
        self,
        *,
        token: str = "",
        gpt_image: bool = False,
        failures: list[tuple[int, str | None, str | None]] | None = None,
    ) -> None:
        self.token = token
        self.gpt_image = gpt_image
        self.failures = list(failures or [])
        self.hold: asyncio.Event | None = None
        self.held = asyncio.Event()
        self.gone = asyncio.Event()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.file_headers: list[dict[str, str]] = []
        self._files: dict[str, bytes] = {}
        self._runners: list[web.AppRunner] = []
        self.url = ""
        self._files_base = ""

    async def __aenter__(self) -> OpenAiImagesStandIn:
        api = web.Application()
        api.router.add_post("/v1/images/generations", self._generate)
        files = web.Application()
        files.router.add_get("/files/{name}", self._file)
        for app in (api, files):
            runner, port = await serve_on_loopback(app)
            self._runners.append(runner)
            base = f"http://127.0.0.1:{port}"
            self._files_base = base
            if not self.url:
                self.url = f"{base}/v1"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.hold is not None:
            self.hold.set()
        for runner in self._runners:
            await runner.cleanup()

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        self.headers.append(dict(request.headers))
        response = await self._answer(request)
        response.headers["x-request-id"] = f"req_{len(self.headers)}"
        return response

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.", None)
        self.requests.append(body)
        if self.failures:
            status, code, retry_after = self.failures.pop(0)
            response = _error(
                status, f"stand-in failure {status}", code, "server_error" if status >= 500 else "x"
            )
            if retry_after is not None:
                response.headers["Retry-After"] = retry_after
            return response
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return _error(400, "Missing required parameter: 'prompt'.", "missing_required_parameter")
        if "content policy" in prompt:
            return _error(400, "Your request was rejected by the safety system.", "content_policy_violation")
        if self.gpt_image and "response_format" in body:
            return _error(400, "Unknown parameter: 'response_format'.", "unknown_parameter")
        size = str(body.get("size", "1024x1024"))
        width, _, height = size.partition("x")
        if not (width.isdigit() and height.isdigit()):
            return _error(400, f"Invalid value: '{size}'.", "invalid_value")
        if body.get("model") == "dall-e-3" and size not in _SIZES_DALL_E_3:
            return _error(
                400,
                f"Invalid value: '{size}'. Supported values are: {sorted(_SIZES_DALL_E_3)}",
                "invalid_value",
            )
        if self.hold is not None:
            self.held.set()
            try:
                await self.hold.wait()
            except asyncio.CancelledError:
                self.gone.set()  # the client went away: aiohttp cancels the handler
                raise
        image = png(int(width), int(height), prompt)
        answer: dict[str, Any] = {"created": int(time.time())}
        if self.gpt_image or body.get("response_format") == "b64_json":
            answer["data"] = [{"b64_json": base64.b64encode(image).decode()}]
            if self.gpt_image:
                answer["output_format"] = "png"
        else:
            name = f"img-{len(self._files)}.png"
            self._files[name] = image
            answer["data"] = [{"url": f"{self._files_base}/files/{name}", "revised_prompt": prompt}]
        return web.json_response(answer)

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.file_headers.append(dict(request.headers))
        data = self._files.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="image/png")
