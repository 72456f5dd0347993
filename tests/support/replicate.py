"""A stand-in for Replicate's HTTP API: a real aiohttp server on 127.0.0.1 that answers as Replicate
documents it, runs predictions that render real images (and MP4s), and misbehaves as a test tells
it to, recording what it receives.

    async with ReplicateStandIn(token="r8_test") as replicate:
        settings = ReplicateSettings(url=replicate.url, token="r8_test", model=MODEL, poll_s=0.01)

Written from Replicate's documentation:
- HTTP API reference, https://replicate.com/docs/reference/http: `POST /v1/models/{owner}/{name}/
  predictions` `{input, webhook?, ...}` for an official model by name (no `version` in the body);
  `POST /v1/predictions` `{version, input}`, `version` a 64-character id, `owner/name:id`, or an
  official model's `owner/name` (https://replicate.com/changelog/2025-08-05-run-all-models-with-the-
  same-api-endpoint); `GET /v1/predictions/{id}`; `POST /v1/predictions/{id}/cancel`. The prediction
  object: `{id, model, version, input, logs, output, data_removed, error, status, created_at,
  started_at, completed_at, urls: {get, cancel, stream, web}, metrics: {predict_time, total_time}}`;
  status starting → processing → succeeded | failed | canceled. Output files are URLs on another
  host (replicate.delivery), which this one serves from a second server, without a token.
- Sync mode, https://replicate.com/docs/topics/predictions/create-a-prediction and the API's
  OpenAPI schema: `Prefer: wait` or `wait=N` (1-60) holds the create until the prediction ends (201,
  with its output) or N seconds pass (202, still running). A preference it cannot read is ignored,
  as RFC 7240 has a server do.
- Deadlines, https://replicate.com/changelog/2025-10-16-prediction-deadlines: `Cancel-After`
  (`1m`, `90s`, `1h30m`) cancels a prediction still running then, or `aborted` one not started.
- Rate limits, https://replicate.com/docs/topics/predictions/rate-limits: 429 `{"detail": "Request
  was throttled. Your rate limit resets in ~Ns."}` (here with `Retry-After: N`).
- Errors as problem details `{title, detail, status}`: 401 `Unauthenticated` without a valid token,
  422 `Invalid version or not permitted` for an unknown version (replicate/replicate-python#47),
  422 `Input validation failed` with `invalid_fields` for inputs outside the model's schema, 404
  `Not found.`.

The models: `acme/painter` (an official model, version `VERSION`) makes PNGs; `acme/animator`
(version `ANIMATOR_VERSION`) makes H.264 MP4s. Both render with the procedural backend from their
inputs (`prompt`, `negative_prompt`, `width`, `height` 16..1024, `num_inference_steps` 1..100,
default 8, `seed`, `image` a data URL; the animator also `duration` and `fps`), logging one tqdm
line a step, as diffusion models on Replicate do (`38%|███▊      | 3/8 [00:00<00:00, 9.1it/s]`).

Behaviour, by constructor keywords or attributes:

| attribute | effect |
| --- | --- |
| `token` | API requests without `Authorization: Bearer <token>` get 401 |
| `step_s` | a prediction takes a step every `step_s` s on its own; None: one a poll (a test sees each) |
| `fail_with` | a prediction fails half way with this `error` |
| `never_ends` | a prediction stays `processing` after its first step |
| `create_failures`, `poll_failures` | (status, Retry-After or None) answered first, one a request |
| `lost_creates` | that many creates make their prediction, then answer 502 (a gateway that lost the answer) |
| `output_as` | `list` (default: `["<url>"]`), `url` (one URL) or `data` (a data URL) |
| `urls_base` | the base of the `urls` it gives (default its own; another: as behind a proxy) |

`creates` holds each create's headers and body; `hits` counts requests by route (`create`, `poll`,
`cancel`, `file`) and `times` when each came (loop time); `file_headers` the headers of downloads;
`created`, `polled` and `cancel_received` are set at the first of each.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from aiohttp import web

from services.generation.backends import GenerationInput
from services.generation.backends.procedural import ProceduralBackend
from tests.support import serve_on_loopback

MODEL = "acme/painter"
VERSION = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"
ANIMATOR = "acme/animator"
ANIMATOR_VERSION = "9dcd6d78e7c6560c340d916fe32e9f24aabfa331e5cce95fe31f77fb03121426"
_MODELS = {MODEL: VERSION, ANIMATOR: ANIMATOR_VERSION}
_PREFER_WAIT = re.compile(r"wait(?:=([1-9]|[1-9][0-9]|60))?")
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_INTEGERS = {"width": (16, 1024), "height": (16, 1024), "num_inference_steps": (1, 100)}
_PROBLEM = "application/problem+json"


def _problem(status: int, title: str, detail: str, **more: Any) -> web.Response:
    body = {"title": title, "detail": detail, "status": status, **more}
    return web.json_response(body, status=status, content_type=_PROBLEM)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Prediction:
    """One prediction as the stand-in holds it."""

    id: str
    model: str
    version: str
    input: dict[str, Any]
    steps: int
    status: str = "starting"
    step: int = -1
    """-1: not started; 0..steps: steps done."""
    logs: str = ""
    error: str | None = None
    output: bytes = b""
    content_type: str = ""
    created_at: str = field(default_factory=_now)
    started_at: str | None = None
    completed_at: str | None = None
    deadline: str | None = None
    file_key: str = ""
    """Where its output is on the file host."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None] | asyncio.TimerHandle] = field(default_factory=list)
    """What runs it: its steps (when it runs on its own), its deadline."""

    def end(self, status: str) -> None:
        self.status, self.completed_at = status, _now()
        self.ended.set()
        self.stop()

    def stop(self) -> None:
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()


@dataclass(eq=False, kw_only=True)
class ReplicateStandIn:
    """The API (`url` is its base, `.../v1`) and its file host; its fields are the behaviour the
    module docstring lists, then (not set by the constructor) what it records."""

    token: str = ""
    step_s: float | None = None
    fail_with: str = ""
    never_ends: bool = False
    create_failures: list[tuple[int, str | None]] = field(default_factory=list)
    poll_failures: list[tuple[int, str | None]] = field(default_factory=list)
    lost_creates: int = 0
    output_as: str = "list"
    urls_base: str = ""
    predictions: dict[str, Prediction] = field(default_factory=dict, init=False)
    creates: list[tuple[dict[str, str], Any]] = field(default_factory=list, init=False)
    cancelled: list[str] = field(default_factory=list, init=False)
    file_headers: list[dict[str, str]] = field(default_factory=list, init=False)
    hits: Counter[str] = field(default_factory=Counter, init=False)
    times: dict[str, list[float]] = field(default_factory=dict, init=False)
    created: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    polled: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    cancel_received: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    url: str = field(default="", init=False)
    files_url: str = field(default="", init=False)
    _files: dict[str, Prediction] = field(default_factory=dict, init=False)
    _runners: list[web.AppRunner] = field(default_factory=list, init=False)

    async def __aenter__(self) -> ReplicateStandIn:
        api = web.Application()
        api.router.add_post("/v1/models/{owner}/{name}/predictions", self._create_by_model)
        api.router.add_post("/v1/predictions", self._create_by_version)
        api.router.add_get("/v1/predictions/{id}", self._get)
        api.router.add_post("/v1/predictions/{id}/cancel", self._cancel)
        files = web.Application()
        files.router.add_get("/xezq/{key}/{name}", self._file)
        ports = []
        for app in (api, files):
            runner, port = await serve_on_loopback(app)
            self._runners.append(runner)
            ports.append(port)
        self.url = f"http://127.0.0.1:{ports[0]}/v1"
        self.files_url = f"http://127.0.0.1:{ports[1]}"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for prediction in self.predictions.values():
            prediction.stop()
        for runner in self._runners:
            await runner.cleanup()

    # Routes.

    async def _create_by_model(self, request: web.Request) -> web.StreamResponse:
        model = f"{request.match_info['owner']}/{request.match_info['name']}"
        refused = self._arrived("create", request, self.create_failures) or (
            None
            if model in _MODELS
            else _problem(404, "Not found", "The requested resource could not be found.")
        )
        return refused or await self._create(request, model, version_given=False)

    async def _create_by_version(self, request: web.Request) -> web.StreamResponse:
        refused = self._arrived("create", request, self.create_failures)
        return refused or await self._create(request, "", version_given=True)

    async def _create(self, request: web.Request, model: str, *, version_given: bool) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _problem(400, "Bad request", "The request body is not JSON.")
        self.creates.append((dict(request.headers), body))
        if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
            return _problem(422, "Input validation failed", "- input: Invalid type. Expected: object\n")
        if version_given:
            model = self._model_of(body.get("version"))
            if not model:
                return _problem(
                    422,
                    "Invalid version or not permitted",
                    "The specified version does not exist (or perhaps you don't have permission to use it?)",
                )
        elif "version" in body:
            return _problem(422, "Input validation failed", "- version: Additional property is not allowed\n")
        invalid = _invalid_fields(body["input"])
        if invalid:
            detail = "".join(f"- {field['field']}: {field['description']}\n" for field in invalid)
            return _problem(422, "Input validation failed", detail, invalid_fields=invalid)
        cancel_after = _seconds(request.headers.get("Cancel-After", ""))
        if cancel_after is None:
            return _problem(422, "Invalid Cancel-After", "Cancel-After must be a duration such as 1m or 90s.")
        prediction = self._start(model, body["input"], cancel_after)
        if self.lost_creates > 0:
            self.lost_creates -= 1
            return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>")
        wait = _prefer_wait(request.headers.get("Prefer", ""))
        if wait is not None:
            try:
                await asyncio.wait_for(asyncio.shield(prediction.ended.wait()), wait)
            except TimeoutError:
                return web.json_response(self._json(prediction), status=202)
        return web.json_response(self._json(prediction), status=201)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        prediction = self.predictions.get(request.match_info["id"])
        refused = self._arrived("poll", request, self.poll_failures)
        if refused:
            return refused
        if prediction is None:
            return _problem(404, "Not found", "Not found.")
        if self.step_s is None and prediction.status in ("starting", "processing"):
            await self._advance(prediction)
        self.polled.set()
        return web.json_response(self._json(prediction))

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        prediction = self.predictions.get(request.match_info["id"])
        refused = self._arrived("cancel", request, [])
        if refused:
            return refused
        if prediction is None:
            return _problem(404, "Not found", "Not found.")
        self.cancelled.append(prediction.id)
        if prediction.status in ("starting", "processing"):
            prediction.end("canceled")
        self.cancel_received.set()
        return web.json_response(self._json(prediction))

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.hits["file"] += 1
        self.file_headers.append(dict(request.headers))
        prediction = self._files.get(request.match_info["key"])
        if prediction is None or not prediction.output:
            raise web.HTTPNotFound()
        return web.Response(body=prediction.output, content_type=prediction.content_type)

    def _arrived(
        self, route: str, request: web.Request, failures: list[tuple[int, str | None]]
    ) -> web.Response | None:
        """Counts the request; its refusal (a bad token, a failure the test asked for), if any."""
        self.hits[route] += 1
        self.times.setdefault(route, []).append(asyncio.get_running_loop().time())
        given = request.headers.get("Authorization")
        if self.token and given != f"Bearer {self.token}":
            detail = f"You did not pass {'a valid' if given else 'an'} authentication token"
            return _problem(401, "Unauthenticated", detail)
        if failures:
            status, retry_after = failures.pop(0)
            if status == 429:
                response = web.json_response(
                    {"detail": f"Request was throttled. Your rate limit resets in ~{retry_after or 1}s."},
                    status=429,
                )
            else:
                response = _problem(status, "Internal server error", "Something went wrong.")
            if retry_after is not None:
                response.headers["Retry-After"] = retry_after
            return response
        return None

    # Predictions.

    def _model_of(self, version: Any) -> str:
        """The model a create's `version` names, or "" when none of this server's."""
        if not isinstance(version, str):
            return ""
        for model, version_id in _MODELS.items():
            if version in (version_id, f"{model}:{version_id}", model):
                return model
        return ""

    def _start(self, model: str, given: dict[str, Any], cancel_after: float) -> Prediction:
        prediction = Prediction(
            id="".join(secrets.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(26)),
            model=model,
            version=_MODELS[model],
            input=given,
            steps=int(given.get("num_inference_steps", 8)),
        )
        self.predictions[prediction.id] = prediction
        loop = asyncio.get_running_loop()
        if cancel_after:
            deadline = datetime.now(UTC).timestamp() + cancel_after
            prediction.deadline = datetime.fromtimestamp(deadline, UTC).isoformat().replace("+00:00", "Z")
            prediction.tasks.append(loop.call_later(cancel_after, self.reach_deadline, prediction.id))
        if self.step_s is not None:
            prediction.tasks.append(asyncio.create_task(self._run(prediction, self.step_s)))
        self.created.set()
        return prediction

    async def _run(self, prediction: Prediction, step_s: float) -> None:
        while prediction.status in ("starting", "processing"):
            await asyncio.sleep(step_s)
            await self._advance(prediction)

    async def _advance(self, prediction: Prediction) -> None:
        """One step of the model: it starts, paints a step, fails, or ends with its output."""
        if prediction.status == "starting":
            prediction.status, prediction.started_at, prediction.step = "processing", _now(), 0
            seed = prediction.input.get("seed", 42)
            prediction.logs = f"Using seed: {seed}\n{_bar(0, prediction.steps)}\n"
            return
        if self.never_ends and prediction.step >= 1:
            return
        prediction.step += 1
        prediction.logs += f"{_bar(prediction.step, prediction.steps)}\n"
        if self.fail_with and prediction.step >= prediction.steps // 2:
            prediction.error = self.fail_with
            prediction.logs += f"Traceback (most recent call last):\nRuntimeError: {self.fail_with}\n"
            prediction.end("failed")
        elif prediction.step >= prediction.steps:
            artifact = await ProceduralBackend().generate(_job(prediction), _ignore)
            prediction.output, prediction.content_type = artifact.data, artifact.content_type
            prediction.file_key = secrets.token_hex(12)
            self._files[prediction.file_key] = prediction
            prediction.end("succeeded")

    def reach_deadline(self, prediction_id: str) -> None:
        """What Replicate does when a prediction's `Cancel-After` passes (a test may call it rather
        than wait): one not started is `aborted`, one running `canceled`."""
        prediction = self.predictions[prediction_id]
        if prediction.status == "starting":
            prediction.end("aborted")
        elif prediction.status == "processing":
            prediction.end("canceled")

    def _json(self, prediction: Prediction) -> dict[str, Any]:
        base = f"{self.urls_base or self.url}/predictions/{prediction.id}"
        data: dict[str, Any] = {
            "id": prediction.id,
            "model": prediction.model,
            "version": prediction.version,
            "input": prediction.input,
            "logs": prediction.logs,
            "output": self._output(prediction),
            "data_removed": False,
            "error": prediction.error,
            "status": prediction.status,
            "created_at": prediction.created_at,
            "started_at": prediction.started_at,
            "completed_at": prediction.completed_at,
            "urls": {
                "get": base,
                "cancel": f"{base}/cancel",
                "stream": f"{self.files_url}/v1/streams/{prediction.id}",
                "web": f"https://replicate.com/p/{prediction.id}",
            },
            "metrics": {"predict_time": 0.01 * max(prediction.step, 0), "total_time": 0.02}
            if prediction.completed_at
            else {},
        }
        if prediction.deadline:
            data["deadline"] = prediction.deadline
        return data

    def _output(self, prediction: Prediction) -> Any:
        if prediction.status != "succeeded":
            return None
        if self.output_as == "data":
            encoded = base64.b64encode(prediction.output).decode()
            return f"data:{prediction.content_type};base64,{encoded}"
        suffix = "mp4" if prediction.content_type == "video/mp4" else "png"
        url = f"{self.files_url}/xezq/{prediction.file_key}/out-0.{suffix}"
        return url if self.output_as == "url" else [url]


def _invalid_fields(given: dict[str, Any]) -> list[dict[str, str]]:
    """What the models' input schema refuses in `given`, as Replicate lists it (inputs it does not
    name are left alone)."""
    invalid: list[dict[str, str]] = []
    if not isinstance(given.get("prompt"), str):
        invalid.append({"type": "required", "field": "input", "description": "prompt is required"})
    for name, (low, high) in _INTEGERS.items():
        value = given.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            kind = type(value).__name__
            description = f"Invalid type. Expected: integer, given: {kind}"
            invalid.append({"type": "invalid_type", "field": f"input.{name}", "description": description})
        elif not low <= value <= high:
            word, bound = ("greater", low) if value < low else ("less", high)
            description = f"Must be {word} than or equal to {bound}"
            invalid.append(
                {"type": f"{word}_than_equal", "field": f"input.{name}", "description": description}
            )
    return invalid


def _prefer_wait(header: str) -> float | None:
    """Seconds a `Prefer: wait[=N]` asks to hold the create (60 for a bare `wait`); None: none."""
    for preference in header.split(","):
        if match := _PREFER_WAIT.fullmatch(preference.strip()):
            return float(match.group(1) or 60)
    return None


def _seconds(header: str) -> float | None:
    """The seconds of a `Cancel-After` duration (0: none given); None when it is not one."""
    if not header:
        return 0.0
    match = _DURATION.fullmatch(header.strip())
    if match is None or not any(match.groups()):
        return None
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return float(hours * 3600 + minutes * 60 + seconds)


def _bar(done: int, total: int) -> str:
    """A tqdm progress line, as Replicate's logs show them."""
    filled = round(10 * done / total)
    bar = "█" * filled + " " * (10 - filled)
    return f"{round(100 * done / total):3d}%|{bar}| {done}/{total} [00:00<00:00, 9.1it/s]"


def _job(prediction: Prediction) -> GenerationInput:
    given = prediction.input
    video = prediction.model == ANIMATOR
    image = given.get("image")
    return GenerationInput(
        render_id=prediction.id,
        kind="video" if video else "image",
        prompt=given["prompt"],
        negative_prompt=given.get("negative_prompt", ""),
        width=int(given.get("width", 64)),
        height=int(given.get("height", 64)),
        steps=prediction.steps,
        seed=int(given.get("seed", 42)),
        reference=base64.b64decode(image.partition(",")[2]) if isinstance(image, str) else None,
        duration_s=float(given.get("duration", 1.0)) if video else 0.0,
        fps=int(given.get("fps", 4)) if video else 0,
    )


async def _ignore(step: int, total: int) -> None:
    return None
