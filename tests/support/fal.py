"""A stand-in for fal's queue API: a real aiohttp server on 127.0.0.1 that answers as fal documents
it, and misbehaves as a test tells it to.

    async with FalStandIn(key="k-1:s3cret", running_polls=3) as fal:
        settings = FalSettings(model="fal-ai/flux/dev", token="k-1:s3cret", url=fal.url, poll_s=0.01)

Written from:
- The queue, https://docs.fal.ai/model-endpoints/queue and
  https://docs.fal.ai/documentation/model-apis/inference/queue: `POST /{model_id}[/{subpath}]`
  (the body is the model's input) answers `{status: IN_QUEUE, request_id, response_url, status_url,
  cancel_url, queue_position}`; those URLs hold only the model's owner and app, never the subpath
  (https://fal.ai/docs/api-reference/inference-api), and the stand-in serves no other. `GET
  .../requests/{id}/status[?logs=1]` answers 202 with `IN_QUEUE` (`queue_position`) or
  `IN_PROGRESS` (`logs`: `[{message, level, source, timestamp}]`, null unless asked for), and 200
  with `COMPLETED` (`metrics`; `error` and `error_type` when the request failed, as the official
  client reads them: fal-ai/fal `projects/fal_client/src/fal_client/client.py`, `Completed`).
  `GET .../requests/{id}` answers the output once completed (400 before), or, for a failed request,
  the runner's status and `{detail, error_type?}` with `X-Fal-Error-Type`. `PUT
  .../requests/{id}/cancel` answers 202 `CANCELLATION_REQUESTED`, 400 `ALREADY_COMPLETED`, 404
  `NOT_FOUND` (https://fal.ai/docs/inference-api/queue/cancel); a cancelled request completes with
  error_type `client_cancelled` and its result is a 499.
- The start timeout, https://docs.fal.ai/documentation/model-apis/common-parameters:
  `X-Fal-Request-Timeout` (or its successor `X-Fal-Request-Start-Timeout`, which wins), seconds >
  0.1 (else 400 `bad_request`); a request not started within it completes with error_type
  `request_timeout` and its result is a 504 with `X-Fal-Request-Timeout-Type: user`.
- Errors, https://fal.ai/docs/documentation/model-apis/request-errors (`{detail, error_type}`) and
  https://docs.fal.ai/errors (a model's refusal: 422, `detail` a list of `{loc, msg, type}`).
- Outputs, as fal's image models answer: `{images: [{url, width, height, content_type}], seed,
  has_nsfw_concepts, prompt, timings}`, and video models `{video: {url, content_type, file_name,
  file_size}, seed}`; the files are on a second server (another origin, as fal's CDN is) that
  wants no key. With `sync_mode: true` in the input the URL is a `data:` URI instead.

Outputs are real: the procedural backend renders them from the input (`prompt`, `negative_prompt`,
`image_size` as `{width, height}` or one of fal's names such as `landscape_4_3`,
`num_inference_steps`, `seed`, `image_url` as a data URI; for a video, whose model id names
`video`, also `duration` and `fps`). A request whose input lacks a `prompt` or has a bad
`image_size` fails as a model's refusal (422).

Behaviour, by constructor keywords or attributes:

| attribute | effect |
| --- | --- |
| `key` | queue requests without `Authorization: Key <key>` get 401 |
| `queued_polls` | status polls a request stays IN_QUEUE; None: it is never started |
| `running_polls` | polls IN_PROGRESS, logging a progress bar each, before COMPLETED; None: never done |
| `fail_with` | (status, message, error_type or None): the request completes failed so |
| `error_in_status` | False: a failed request's status carries no `error` (a legacy app's) |
| `failures` | a list of (status, Retry-After or None) answered first to queue requests, one each |
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from aiohttp import web

from services.generation.backends import GenerationInput
from services.generation.backends.procedural import ProceduralBackend
from tests.support import serve_on_loopback

IMAGE_SIZES = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
"""fal's named image sizes (its image models' `image_size` enum)."""
START_TIMEOUT_HEADERS = ("X-Fal-Request-Start-Timeout", "X-Fal-Request-Timeout")
"""fal's start timeout, the newer name first (it wins when both are sent)."""
_QUEUE = r"{app:[^/]+/[^/]+}/requests/{id}"


@dataclass
class Request:
    """One request as the queue holds it."""

    id: str
    model: str
    """The endpoint id it was submitted to (`owner/app[/path]`)."""
    app: str
    """`owner/app`: what its status, result and cancel URLs are under."""
    input: dict[str, Any]
    start_by: float | None = None
    """Loop time by which a runner must have started it (its start timeout), if any."""
    state: str = "IN_QUEUE"
    polls: int = 0
    running: int = 0
    logs: list[dict[str, str]] = field(default_factory=list)
    output: dict[str, Any] | None = None
    failure: tuple[int, str, str | None] | None = None
    """(the result's status, the message, fal's error_type) of a request that failed."""


class FalStandIn:
    """The queue (`url`, the base a backend is given) and its file host. `requests` holds each
    request by id, `headers` the headers of each queue request by route (`submit`, `status`,
    `result`, `cancel`), `file_headers` those of downloads, `cancelled` the ids cancelled, `times`
    when each queue request came (loop time)."""

    def __init__(
        self,
        *,
        key: str = "",
        queued_polls: int | None = 1,
        running_polls: int | None = 2,
        fail_with: tuple[int, str, str | None] | None = None,
        error_in_status: bool = True,
        failures: list[tuple[int, str | None]] | None = None,
    ) -> None:
        self.key = key
        self.queued_polls = queued_polls
        self.running_polls = running_polls
        self.fail_with = fail_with
        self.error_in_status = error_in_status
        self.failures = list(failures or [])
        self.requests: dict[str, Request] = {}
        self.headers: dict[str, list[dict[str, str]]] = {}
        self.times: list[float] = []
        self.file_headers: list[dict[str, str]] = []
        self.cancelled: list[str] = []
        self.hits: Counter[str] = Counter()
        self.submitted = asyncio.Event()
        self.started = asyncio.Event()
        self.cancel_received = asyncio.Event()
        self._ids = itertools.count(1)
        self._files: dict[str, tuple[bytes, str]] = {}
        self._runners: list[web.AppRunner] = []
        self.url = ""
        self._files_base = ""

    async def __aenter__(self) -> FalStandIn:
        queue = web.Application()
        queue.router.add_get(f"/{_QUEUE}/status", self._status)
        queue.router.add_put(f"/{_QUEUE}/cancel", self._cancel)
        queue.router.add_get(f"/{_QUEUE}", self._result)
        queue.router.add_post("/{model:.+}", self._submit)
        files = web.Application()
        files.router.add_get("/files/{name}", self._file)
        for app in (queue, files):
            runner, port = await serve_on_loopback(app)
            self._runners.append(runner)
            self._files_base = f"http://127.0.0.1:{port}"
            self.url = self.url or self._files_base
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for runner in self._runners:
            await runner.cleanup()

    async def _arrived(self, route: str, request: web.Request) -> web.StreamResponse | None:
        """Notes a queue request; the refusal it gets first (no key, a failure to answer), if any."""
        self.hits[route] += 1
        self.headers.setdefault(route, []).append(dict(request.headers))
        self.times.append(asyncio.get_running_loop().time())
        if self.key and request.headers.get("Authorization") != f"Key {self.key}":
            return web.json_response({"detail": "No user found for Key ID and Secret"}, status=401)
        if self.failures:
            status, retry_after = self.failures.pop(0)
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            detail = "Too many concurrent requests" if status == 429 else "upstream connect error"
            return web.json_response({"detail": detail}, status=status, headers=headers)
        return None

    def _urls(self, queued: Request) -> dict[str, str]:
        base = f"{self.url}/{queued.app}/requests/{queued.id}"
        return {
            "request_id": queued.id,
            "response_url": base,
            "status_url": f"{base}/status",
            "cancel_url": f"{base}/cancel",
        }

    async def _submit(self, request: web.Request) -> web.StreamResponse:
        if (refused := await self._arrived("submit", request)) is not None:
            return refused
        model = request.match_info["model"].strip("/")
        parts = model.split("/")
        if len(parts) < 2:
            return web.json_response({"detail": f"Application '{model}' not found"}, status=404)
        start_by = None
        header = next((request.headers[h] for h in START_TIMEOUT_HEADERS if h in request.headers), None)
        if header is not None:
            try:
                seconds = float(header)
            except ValueError:
                seconds = 0.0
            if not seconds > 0.1:
                body = {"detail": f"Invalid request timeout: {header}", "error_type": "bad_request"}
                return web.json_response(body, status=400, headers={"X-Fal-Error-Type": "bad_request"})
            start_by = asyncio.get_running_loop().time() + seconds
        try:
            given = await request.json()
        except ValueError:
            return web.json_response({"detail": "the body is not JSON"}, status=400)
        if not isinstance(given, dict):
            return web.json_response({"detail": "the body must be a JSON object"}, status=422)
        queued = Request(f"req-{next(self._ids)}", model, "/".join(parts[:2]), given, start_by)
        self.requests[queued.id] = queued
        self.submitted.set()
        position = self.queued_polls or 0
        return web.json_response({"status": "IN_QUEUE", **self._urls(queued), "queue_position": position})

    async def _named(self, route: str, request: web.Request) -> Request | web.StreamResponse:
        """The request a queue URL names (as fal names it: owner and app only), brought up to date;
        or the answer refusing the call."""
        if (refused := await self._arrived(route, request)) is not None:
            return refused
        queued = self.requests.get(request.match_info["id"])
        if queued is None or queued.app != request.match_info["app"]:
            body = {"status": "NOT_FOUND"} if route == "cancel" else {"detail": "Request not found"}
            return web.json_response(body, status=404)
        self._expire(queued)
        return queued

    async def _status(self, request: web.Request) -> web.StreamResponse:
        queued = await self._named("status", request)
        if not isinstance(queued, Request):
            return queued
        if queued.state != "COMPLETED":
            await self._advance(queued)
        with_logs = request.query.get("logs", "0").lower() in ("1", "true")
        body: dict[str, Any] = {"status": queued.state, **self._urls(queued)}
        body["logs"] = list(queued.logs) if with_logs else None
        if queued.state == "IN_QUEUE":
            body["queue_position"] = max(0, (self.queued_polls or 0) - queued.polls)
        elif queued.state == "COMPLETED":
            body["metrics"] = {"inference_time": 0.01 * queued.running}
            if queued.failure is not None and self.error_in_status:
                _, message, error_type = queued.failure
                body |= {"error": message, "error_type": error_type}
        return web.json_response(body, status=200 if queued.state == "COMPLETED" else 202)

    def _expire(self, queued: Request) -> None:
        """Ends a request still queued past its start timeout, as fal does."""
        now = asyncio.get_running_loop().time()
        if queued.state == "IN_QUEUE" and queued.start_by is not None and now >= queued.start_by:
            queued.state, queued.failure = "COMPLETED", (504, "Request timed out", "request_timeout")

    async def _advance(self, queued: Request) -> None:
        """One poll's worth of the request's life: queued, then running (a progress bar line a
        poll), then done."""
        queued.polls += 1
        if queued.state == "IN_QUEUE":
            if self.queued_polls is None or queued.polls <= self.queued_polls:
                return
            queued.state = "IN_PROGRESS"
            self.started.set()
            self._log(queued, "Loading the model")
        queued.running += 1
        if self.running_polls is None:
            self._log(queued, "still working")
            return
        steps = int(queued.input.get("num_inference_steps") or 28)
        done = steps * min(queued.running, self.running_polls) // max(self.running_polls, 1)
        percent = round(100 * done / steps)
        self._log(queued, f"{percent:3d}%|{'#' * (percent // 10):<10}| {done}/{steps} [00:01<00:01, 9.9it/s]")
        if queued.running >= self.running_polls:
            await self._complete(queued)

    def _log(self, queued: Request, message: str) -> None:
        stamp = datetime.now(UTC).isoformat()
        queued.logs.append({"message": message, "level": "INFO", "source": "user", "timestamp": stamp})

    async def _complete(self, queued: Request) -> None:
        queued.state = "COMPLETED"
        if self.fail_with is not None:
            queued.failure = self.fail_with
            return
        try:
            job = _job(queued)
        except (KeyError, TypeError, ValueError) as exc:  # what the model's input schema refuses
            queued.failure = (422, f"Invalid input: {exc!r}", None)
            return
        artifact = await ProceduralBackend().generate(job, _ignore)
        name = f"{queued.id}.{'mp4' if job.kind == 'video' else 'png'}"
        self._files[name] = (artifact.data, artifact.content_type)
        if queued.input.get("sync_mode") is True:
            url = f"data:{artifact.content_type};base64,{base64.b64encode(artifact.data).decode()}"
        else:
            url = f"{self._files_base}/files/{name}"
        file = {"url": url, "content_type": artifact.content_type}
        if job.kind == "video":
            queued.output = {
                "video": {**file, "file_name": name, "file_size": len(artifact.data)},
                "seed": job.seed,
            }
        else:
            image = {**file, "width": artifact.width, "height": artifact.height}
            queued.output = {
                "images": [image],
                "seed": job.seed,
                "has_nsfw_concepts": [False],
                "prompt": job.prompt,
                "timings": {"inference": 0.01},
            }

    async def _result(self, request: web.Request) -> web.StreamResponse:
        queued = await self._named("result", request)
        if not isinstance(queued, Request):
            return queued
        if queued.state != "COMPLETED":
            return web.json_response({"detail": "Request is still in progress"}, status=400)
        if queued.failure is None:
            return web.json_response(queued.output)
        status, message, error_type = queued.failure
        if error_type is None:  # a model's refusal: fal's typed error objects
            detail = {
                "loc": ["body"],
                "msg": message,
                "type": "value_error",
                "url": "https://docs.fal.ai/errors",
            }
            return web.json_response({"detail": [detail]}, status=status)
        headers = {"X-Fal-Error-Type": error_type}
        if error_type == "request_timeout":
            headers["X-Fal-Request-Timeout-Type"] = "user"
        body = {"detail": message, "error_type": error_type}
        return web.json_response(body, status=status, headers=headers)

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        queued = await self._named("cancel", request)
        if not isinstance(queued, Request):
            return queued
        if queued.state == "COMPLETED":
            return web.json_response({"status": "ALREADY_COMPLETED"}, status=400)
        self.cancelled.append(queued.id)
        self.cancel_received.set()
        queued.state = "COMPLETED"
        queued.failure = (499, "Request cancelled by the client.", "client_cancelled")
        return web.json_response({"status": "CANCELLATION_REQUESTED"}, status=202)

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.file_headers.append(dict(request.headers))
        found = self._files.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        data, content_type = found
        return web.Response(body=data, content_type=content_type)


def _job(queued: Request) -> GenerationInput:
    given = queued.input
    if not isinstance(given.get("prompt"), str) or not given["prompt"]:
        raise KeyError("prompt")
    size = given.get("image_size", "landscape_4_3")
    if isinstance(size, dict):
        width, height = int(size["width"]), int(size["height"])
    else:
        width, height = IMAGE_SIZES[str(size)]
    image = given.get("image_url")
    return GenerationInput(
        render_id=queued.id,
        kind="video" if "video" in queued.model else "image",
        prompt=given["prompt"],
        negative_prompt=str(given.get("negative_prompt", "")),
        width=width,
        height=height,
        steps=int(given.get("num_inference_steps") or 28),
        seed=int(given.get("seed") or 0),
        reference=base64.b64decode(image.partition(",")[2]) if isinstance(image, str) else None,
        duration_s=float(given.get("duration") or 1.0),
        fps=int(given.get("fps") or 8),
    )


async def _ignore(step: int, total: int) -> None:
    return None
