"""A fake prediction API for tests: a real aiohttp server on 127.0.0.1 that speaks the protocol the
`http` backend drives, and misbehaves as a test tells it to, counting what it receives.

    async with Provider(token="s3cret", polls_to_finish=3) as provider:
        settings = HttpBackendSettings(url=provider.url, token="s3cret", poll_s=0.01)

Routes (under `/v1`): `POST /predictions` (honours `Idempotency-Key`), `GET /predictions/{id}`,
`POST /predictions/{id}/cancel`, and `GET /files/{id}` for the outputs. Outputs are real: the
procedural backend renders them from the prediction's input (a PNG, or an H.264 MP4 for videos).

Behaviour, set by constructor keywords or attributes before the backend calls:

| attribute | effect |
| --- | --- |
| `polls_to_finish` | 0: succeeded at once; N: succeeds (or fails) at the Nth poll; None: never ends |
| `fail_with` | the prediction ends `failed` with this message |
| `create_errors` | that many 500s on create first; `commit_failed_creates` makes them create anyway |
| `poll_errors` | that many 500s on polls first |
| `rate_limited`, `retry_after` | that many 429s with `Retry-After: <retry_after>` on create first |
| `output_as` | `url` (default), `list` (a list of URLs), `data` (a data URL), `html` (a URL to a page) |
| `progress_in` | `progress` (default: a 0..1 field), `logs` (a progress bar line), `none` |
| `token` | requests to the API without `Authorization: Bearer <token>` get 401 |
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web

from services.generation.backends import GenerationInput
from services.generation.backends.procedural import ProceduralBackend
from tests.support import serve_on_loopback

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Prediction:
    """One prediction as the provider holds it."""

    id: str
    input: dict[str, Any]
    status: str = "starting"
    polls: int = 0
    output: bytes = b""
    content_type: str = ""
    error: str | None = None


class Provider:
    """The server; see the module docstring for its knobs. `hits` counts requests by route
    (`create`, `poll`, `cancel`, `file`), `times` holds when each came (loop time)."""

    def __init__(
        self,
        *,
        token: str = "",
        polls_to_finish: int | None = 0,
        fail_with: str = "",
        create_errors: int = 0,
        commit_failed_creates: bool = False,
        poll_errors: int = 0,
        rate_limited: int = 0,
        retry_after: str = "1",
        output_as: str = "url",
        progress_in: str = "progress",
    ) -> None:
        self.token = token
        self.polls_to_finish = polls_to_finish
        self.fail_with = fail_with
        self.create_errors = create_errors
        self.commit_failed_creates = commit_failed_creates
        self.poll_errors = poll_errors
        self.rate_limited = rate_limited
        self.retry_after = retry_after
        self.output_as = output_as
        self.progress_in = progress_in
        self.predictions: dict[str, Prediction] = {}
        self.by_key: dict[str, str] = {}
        self.idempotency_keys: list[str] = []
        self.cancelled: list[str] = []
        self.hits: Counter[str] = Counter()
        self.times: dict[str, list[float]] = {}
        self.created = asyncio.Event()
        self.cancel_received = asyncio.Event()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The API's base URL (what RENDERFLOW_BACKEND_HTTP_URL would be)."""
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> Provider:
        app = web.Application()
        app.router.add_post("/v1/predictions", self._create)
        app.router.add_get("/v1/predictions/{id}", self._poll)
        app.router.add_post("/v1/predictions/{id}/cancel", self._cancel)
        app.router.add_get("/v1/files/{id}", self._file)
        self._runner, self.port = await serve_on_loopback(app)
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Provider:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _arrived(self, route: str) -> None:
        self.hits[route] += 1
        self.times.setdefault(route, []).append(asyncio.get_running_loop().time())

    def _authorized(self, request: web.Request) -> bool:
        return not self.token or request.headers.get("Authorization") == f"Bearer {self.token}"

    async def _create(self, request: web.Request) -> web.StreamResponse:
        self._arrived("create")
        if not self._authorized(request):
            return web.json_response({"detail": "Invalid token."}, status=401)
        if self.rate_limited > 0:
            self.rate_limited -= 1
            return web.json_response(
                {"detail": "slow down"}, status=429, headers={"Retry-After": self.retry_after}
            )
        key = request.headers.get("Idempotency-Key", "")
        self.idempotency_keys.append(key)
        body = await request.json()
        if not isinstance(body.get("input"), dict) or not body["input"].get("prompt"):
            return web.json_response({"detail": "input.prompt is required"}, status=422)
        existing = self.by_key.get(key) if key else None
        if existing is None and (self.create_errors == 0 or self.commit_failed_creates):
            prediction = Prediction(f"p{next(self._ids)}", body["input"])
            self.predictions[prediction.id] = prediction
            if key:
                self.by_key[key] = prediction.id
            self.created.set()
            if self.polls_to_finish == 0:
                await self._end(prediction)
            existing = prediction.id
        if self.create_errors > 0:
            self.create_errors -= 1
            return web.Response(status=500, text="internal error")
        assert existing is not None
        return web.json_response(self._json(self.predictions[existing]), status=201)

    async def _poll(self, request: web.Request) -> web.StreamResponse:
        self._arrived("poll")
        if not self._authorized(request):
            return web.json_response({"detail": "Invalid token."}, status=401)
        prediction = self.predictions.get(request.match_info["id"])
        if prediction is None:
            return web.json_response({"detail": "Not found."}, status=404)
        if self.poll_errors > 0:
            self.poll_errors -= 1
            return web.Response(status=502, text="bad gateway")
        if prediction.status in ("starting", "processing"):
            prediction.polls += 1
            prediction.status = "processing"
            if self.polls_to_finish is not None and prediction.polls >= self.polls_to_finish:
                await self._end(prediction)
        return web.json_response(self._json(prediction))

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        self._arrived("cancel")
        if not self._authorized(request):
            return web.json_response({"detail": "Invalid token."}, status=401)
        prediction = self.predictions.get(request.match_info["id"])
        if prediction is None:
            return web.json_response({"detail": "Not found."}, status=404)
        self.cancelled.append(prediction.id)
        if prediction.status in ("starting", "processing"):
            prediction.status = "canceled"
        self.cancel_received.set()
        return web.json_response(self._json(prediction))

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self._arrived("file")
        prediction = self.predictions.get(request.match_info["id"])
        if prediction is None or not prediction.output:
            return web.Response(status=404)
        if self.output_as == "html":
            return web.Response(text="<html><body>Access denied</body></html>", content_type="text/html")
        return web.Response(body=prediction.output, content_type=prediction.content_type)

    async def _end(self, prediction: Prediction) -> None:
        if self.fail_with:
            prediction.status, prediction.error = "failed", self.fail_with
        else:
            artifact = await ProceduralBackend().generate(_job(prediction), _ignore)
            prediction.status = "succeeded"
            prediction.output, prediction.content_type = artifact.data, artifact.content_type

    def _json(self, prediction: Prediction) -> dict[str, Any]:
        data: dict[str, Any] = {"id": prediction.id, "status": prediction.status, "error": prediction.error}
        if prediction.status == "processing" and self.polls_to_finish != 0:
            fraction = prediction.polls / (self.polls_to_finish or 2 * prediction.polls)
            if self.progress_in == "progress":
                data["progress"] = round(fraction, 4)
            elif self.progress_in == "logs":
                total = self.polls_to_finish or "?"
                data["logs"] = (
                    f"loading\n{round(fraction * 100)}%|####  | {prediction.polls}/{total} [00:01<00:02]"
                )
        if prediction.status == "succeeded":
            file = f"{self.url}/files/{prediction.id}"
            if self.output_as == "data":
                encoded = base64.b64encode(prediction.output).decode()
                data["output"] = f"data:{prediction.content_type};base64,{encoded}"
            else:
                data["output"] = [file] if self.output_as == "list" else file
        return data


def _job(prediction: Prediction) -> GenerationInput:
    given = prediction.input
    return GenerationInput(
        render_id=prediction.id,
        kind=given.get("kind", "image"),
        prompt=given["prompt"],
        negative_prompt=given.get("negative_prompt", ""),
        width=int(given.get("width", 64)),
        height=int(given.get("height", 64)),
        steps=int(given.get("steps", 4)),
        seed=int(given.get("seed", 0)),
        rules=tuple(given.get("rules", ())),
        reference=_decoded(given.get("image")),
        duration_s=float(given.get("duration_s", 0.0)),
        fps=int(given.get("fps", 0)),
    )


def _decoded(data_url: str | None) -> bytes | None:
    if not data_url:
        return None
    return base64.b64decode(data_url.partition(",")[2])


async def _ignore(step: int, total: int) -> None:
    return None
