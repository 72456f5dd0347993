"""The `comfyui` backend: renders on a pool of ComfyUI servers (`comfyui_pool.py`), each render a
workflow the operator registered (`comfyui_workflows.py`).

One render on one instance, as ComfyUI's server speaks (server.py; docs.comfy.org, "Routes" and
"Messages" of the ComfyUI server):

1. `GET /ws?clientId=C` (a websocket) first, so no event of the prompt is missed;
2. the reference image, if any: `POST /upload/image` (multipart `image`, `type=input`,
   `overwrite=true`) under a name made of its hash, which the graph's `{image}` then names;
3. `POST /prompt {prompt, client_id: C, prompt_id: P}`: P is chosen here (a fresh one per try), so
   a prompt whose answer was lost can still be found, followed and stopped;
4. P's events on the websocket: `progress {value, max, node}` of the sampler nodes are the
   render's steps; `executing` with node null the end (sent once the history has P, unlike
   `execution_success`); `execution_error` and `execution_interrupted` a failure. While the websocket says
   nothing for `poll_s`, `GET /history/P` and `GET /queue` say whether P ended, still waits, or
   was lost (a restarted ComfyUI forgets its queue); a websocket that drops is reopened;
5. `GET /history/P` → `outputs {node: {images|gifs|videos: [{filename, subfolder, type}]}}`: the
   first saved file of the render's kind, read with `GET /view`; then `POST /history {delete: [P]}`
   so the instance's history does not grow.

Stopping a render (cancelled, past its deadline or its longest duration): `POST /queue
{delete: [P]}` while P waits in the instance's queue, `POST /interrupt {prompt_id: P}` while it
runs. Both only after `GET /queue` has shown where P is, because a ComfyUI older than targeted
interrupts ignores the body and would stop whatever runs.

Failover: an instance that cannot be reached, answers 5xx, or forgot P is marked down, and the
render starts again on another instance within the same attempt (no attempt of the render is
spent, nothing is lost); with none left, the error is transient and the render goes back to the
queue. A workflow ComfyUI refuses (400 on `/prompt`, e.g. a missing model or node) fails the render
(`invalid_workflow`), as does an `execution_error` (`execution_error`), except out of memory, which
another instance may not run out of (transient).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from opentelemetry import metrics
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
from services.generation.backends.comfyui_pool import Instance, Pool
from services.generation.backends.comfyui_workflows import Workflow, Workflows
from services.generation.backends.predictions import MAX_MESSAGE, output_artifact, sniff
from services.generation.backends.provider import MIB, ProviderClient, check_url, provider_session
from services.generation.background import background
from shared.settings import ConfigError, Env

log = logging.getLogger(__name__)

_EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}
_KIND_EXTENSIONS = {"image": (".png", ".jpg", ".jpeg", ".webp"), "video": (".mp4",)}


@dataclass(frozen=True)
class ComfyUISettings:
    """The instances, the workflows, and how patiently both are driven."""

    instances: tuple[tuple[str, int], ...]
    """RENDERFLOW_BACKEND_COMFYUI_URLS: the instances' base URLs, comma-separated, each with `*N`
    when it runs N prompts at once (default 1: ComfyUI executes one prompt at a time), e.g.
    `http://gpu-a:8188,http://gpu-b:8188*2`. Give the worker as many slots
    (RENDERFLOW_WORKER_CONCURRENCY) as the instances have in all."""
    workflows: Workflows
    """RENDERFLOW_BACKEND_COMFYUI_WORKFLOWS: a directory of workflows in ComfyUI's API format, one
    `NAME.json` each (see `comfyui_workflows.py`); unset: the built-in `txt2img` and `img2img`."""
    token: str = field(default="", repr=False)
    """RENDERFLOW_BACKEND_COMFYUI_TOKEN: sent as `Authorization: Bearer` to the instances (for a
    ComfyUI behind an authenticating proxy); a secret, never logged."""
    poll_s: float = 2.0
    """RENDERFLOW_BACKEND_COMFYUI_POLL_S: how long the websocket may be quiet before the prompt's
    history and the queue are asked."""
    request_timeout_s: float = 30.0
    """RENDERFLOW_BACKEND_COMFYUI_TIMEOUT_S: longest wait to connect, or for any read, in one request."""
    health_s: float = 5.0
    """RENDERFLOW_BACKEND_COMFYUI_HEALTH_S: the pause between two health checks of each instance."""
    unavailable_wait_s: float = 60.0
    """RENDERFLOW_BACKEND_COMFYUI_UNAVAILABLE_WAIT_S: how long a render waits for an instance to come
    back when none is up, before it goes back to the queue."""
    attempts: int = 2
    """RENDERFLOW_BACKEND_COMFYUI_ATTEMPTS: tries of each request to an instance before it counts as
    failed (and the render moves to another)."""
    backoff_s: float = 0.2
    """RENDERFLOW_BACKEND_COMFYUI_BACKOFF_S: first pause between tries; it doubles, with jitter."""
    backoff_max_s: float = 5.0
    """RENDERFLOW_BACKEND_COMFYUI_BACKOFF_MAX_S: the cap of that pause."""
    max_output_bytes: int = 512 * MIB
    """RENDERFLOW_BACKEND_COMFYUI_MAX_OUTPUT_BYTES: the largest output accepted."""

    @classmethod
    def from_env(cls, env: Env) -> ComfyUISettings:
        """Settings from `RENDERFLOW_BACKEND_COMFYUI_*`, the workflows read and checked; ConfigError
        names a bad one."""
        entries = env.list("RENDERFLOW_BACKEND_COMFYUI_URLS")
        if not entries:
            raise ConfigError("RENDERFLOW_BACKEND_COMFYUI_URLS is required by the comfyui backend")
        return cls(
            instances=tuple(_instance(entry) for entry in entries),
            workflows=Workflows.load(
                env.str("RENDERFLOW_BACKEND_COMFYUI_WORKFLOWS", ""),
                image=env.str("RENDERFLOW_BACKEND_COMFYUI_WORKFLOW_IMAGE", "txt2img"),
                reference=env.str("RENDERFLOW_BACKEND_COMFYUI_WORKFLOW_REFERENCE", "img2img"),
                video=env.str("RENDERFLOW_BACKEND_COMFYUI_WORKFLOW_VIDEO", ""),
            ),
            token=env.str("RENDERFLOW_BACKEND_COMFYUI_TOKEN", ""),
            poll_s=env.float("RENDERFLOW_BACKEND_COMFYUI_POLL_S", cls.poll_s, minimum=0.01),
            request_timeout_s=env.float(
                "RENDERFLOW_BACKEND_COMFYUI_TIMEOUT_S", cls.request_timeout_s, minimum=0.01
            ),
            health_s=env.float("RENDERFLOW_BACKEND_COMFYUI_HEALTH_S", cls.health_s, minimum=0.01),
            unavailable_wait_s=env.float(
                "RENDERFLOW_BACKEND_COMFYUI_UNAVAILABLE_WAIT_S", cls.unavailable_wait_s, minimum=0
            ),
            attempts=env.int("RENDERFLOW_BACKEND_COMFYUI_ATTEMPTS", cls.attempts, minimum=1),
            backoff_s=env.float("RENDERFLOW_BACKEND_COMFYUI_BACKOFF_S", cls.backoff_s, minimum=0),
            backoff_max_s=env.float("RENDERFLOW_BACKEND_COMFYUI_BACKOFF_MAX_S", cls.backoff_max_s, minimum=0),
            max_output_bytes=env.int(
                "RENDERFLOW_BACKEND_COMFYUI_MAX_OUTPUT_BYTES", cls.max_output_bytes, minimum=1
            ),
        )


def _instance(entry: str) -> tuple[str, int]:
    url, _, slots = entry.strip().partition("*")
    check_url(url, "RENDERFLOW_BACKEND_COMFYUI_URLS", "RENDERFLOW_BACKEND_COMFYUI_TOKEN")
    if slots and not (slots.isdigit() and int(slots) > 0):
        raise ConfigError(
            f"RENDERFLOW_BACKEND_COMFYUI_URLS: {entry.strip()!r}: the slots after * must be > 0"
        )
    return url, int(slots or 1)


class InstanceFailed(Exception):
    """The instance could not be reached, failed, or forgot the prompt: the render moves on."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ComfyUIBackend:
    """Renders on the pool of ComfyUI instances (see the module docstring)."""

    name = "comfyui"

    def __init__(self, pool: Pool, settings: ComfyUISettings, session: aiohttp.ClientSession) -> None:
        self.pool = pool
        self._settings = settings
        self._session = session

    @classmethod
    @asynccontextmanager
    async def open(
        cls, settings: ComfyUISettings, meter_provider: metrics.MeterProvider | None = None
    ) -> AsyncIterator[ComfyUIBackend]:
        """The backend over its own session, its instances checked in the background until exit."""
        async with provider_session(settings.request_timeout_s) as session:
            instances = [
                Instance(
                    ProviderClient(
                        session,
                        url,
                        settings.token,
                        attempts=settings.attempts,
                        backoff_s=settings.backoff_s,
                        backoff_max_s=settings.backoff_max_s,
                        max_output_bytes=settings.max_output_bytes,
                    ),
                    slots,
                )
                for url, slots in settings.instances
            ]
            pool = Pool(
                instances,
                health_s=settings.health_s,
                unavailable_wait_s=settings.unavailable_wait_s,
                meter_provider=meter_provider,
            )
            async with background(pool.watch(), name="comfyui health checks"):
                yield cls(pool, settings, session)

    async def generate(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
        """Runs the job's workflow on an instance of the pool, moving to another while one fails."""
        workflow = self._settings.workflows.choose(job)
        progress = StepProgress(job.steps, on_progress)  # across instances: it never goes back
        tried: set[Instance] = set()
        while True:
            async with self.pool.instance(tried) as instance:
                run = _PromptRun(self._settings, self._session, instance, job, workflow, progress)
                try:
                    return await run.run()
                except InstanceFailed as exc:
                    tried.add(instance)
                    await self.pool.mark_down(instance, exc.reason, str(exc))
                    self.pool.failovers.add(1, {"comfyui.instance": instance.label, "reason": exc.reason})
                    log.warning(
                        "render moved off a failed ComfyUI instance",
                        extra={**run.extra, "reason": exc.reason, "error": str(exc)},
                    )


class _PromptRun:
    """One render's prompt on one instance."""

    def __init__(
        self,
        settings: ComfyUISettings,
        session: aiohttp.ClientSession,
        instance: Instance,
        job: GenerationInput,
        workflow: Workflow,
        progress: StepProgress,
    ) -> None:
        self._settings = settings
        self._session = session
        self._instance = instance
        self._client = instance.client
        self._job = job
        self._workflow = workflow
        self._progress = progress
        self._client_id = f"renderflow-{uuid.uuid4().hex}"
        self.prompt_id = str(uuid.uuid4())
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._entry: dict[str, Any] = {}
        """P's history entry as last read ({} until it ended)."""

    @property
    def extra(self) -> dict[str, str]:
        """Log fields."""
        return {
            "render_id": self._job.render_id,
            "instance": self._instance.label,
            "prompt_id": self.prompt_id,
        }

    async def run(self) -> Artifact:
        try:
            try:
                await self._connect()
                image = await self._upload(self._job.reference) if self._job.reference is not None else None
                await self._queue(self._workflow.graph(self._job, image))
                log.info("prompt queued", extra={**self.extra, "workflow": self._workflow.name})
                await self._follow()
            except InstanceFailed:
                raise
            except BaseException:
                await self._stop()
                raise
            finally:
                if self._ws is not None:
                    await self._ws.close()
            data, declared = await self._output()
            artifact = await output_artifact(self._job, data, declared)
        except BackendError as exc:
            exc.provider_request_id = self.prompt_id
            raise
        await self._forget()
        await self._progress.done()
        log.info("prompt succeeded", extra=self.extra)
        return replace(artifact, provider_request_id=self.prompt_id)

    # The instance's routes -------------------------------------------------------------------

    async def _connect(self) -> None:
        url = self._client.base / "ws" % {"clientId": self._client_id}
        try:
            self._ws = await self._session.ws_connect(url, headers=self._client.headers(url), heartbeat=30)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise InstanceFailed(
                "connection_failed", f"its websocket cannot be opened ({type(exc).__name__})"
            ) from None

    async def _upload(self, data: bytes) -> str:
        """Uploads the reference under a name of its hash; the name the graph gives LoadImage."""
        content_type = sniff(data) or "application/octet-stream"
        name = f"renderflow-{hashlib.sha256(data).hexdigest()[:32]}{_EXTENSIONS.get(content_type, '.png')}"
        form = aiohttp.FormData()
        form.add_field("image", data, filename=name, content_type=content_type)
        form.add_field("overwrite", "true")
        form.add_field("type", "input")
        url = self._client.base / "upload" / "image"
        answer = await self._post(url, form, "upload the reference")
        try:
            uploaded = json.loads(answer)
            subfolder, name = str(uploaded.get("subfolder") or ""), str(uploaded["name"])
        except (ValueError, KeyError, AttributeError):
            raise InstanceFailed("bad_response", "its answer to the upload names no file") from None
        return f"{subfolder}/{name}" if subfolder else name

    async def _queue(self, graph: dict[str, Any]) -> None:
        """Queues the prompt. Not retried blindly: when the answer is lost, the instance is asked
        whether it has P (a second POST would queue it twice)."""
        body = {"prompt": graph, "client_id": self._client_id, "prompt_id": self.prompt_id}
        url = self._client.base / "prompt"
        try:
            async with self._session.post(url, json=body, headers=self._client.headers(url)) as response:
                text = await response.text(errors="replace")
                if response.status == 200:
                    with suppress(ValueError, AttributeError):
                        self.prompt_id = str(json.loads(text).get("prompt_id") or self.prompt_id)
                    return
                if response.status == 400:
                    raise PermanentBackendError(self._refusal(text), "invalid_workflow")
                failure = f"it answered {response.status} to the prompt"
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = f"queueing the prompt failed ({type(exc).__name__})"
        if await self._where() is None:
            raise InstanceFailed("prompt_failed", failure)

    async def _follow(self) -> None:
        """Reads P's events to its end, reporting its sampler steps."""
        samplers = _Samplers(self._workflow.samplers)
        while True:
            assert self._ws is not None
            try:
                message = await self._ws.receive(timeout=self._settings.poll_s)
            except TimeoutError:
                if await self._ended_quietly():
                    return
                continue
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                # The old socket closed first: ComfyUI forgets a client id whose socket closes after
                # a new one with that id has opened. Events may be lost in between: the history says.
                await self._ws.close()
                await self._connect()
                if await self._ended_quietly():
                    return
                continue
            if message.type != aiohttp.WSMsgType.TEXT:
                continue  # binary messages are previews
            kind, data = _event(message.data)
            if data.get("prompt_id") != self.prompt_id:
                continue
            if kind == "progress":
                await self._progress.report(samplers.after(data))
            elif kind == "executing" and data.get("node") is None:
                return  # sent once the history has the prompt (`execution_success` comes before)
            elif kind in ("execution_error", "execution_interrupted"):
                raise _failure(kind, data)

    async def _ended_quietly(self) -> bool:
        """Whether P has ended (a failure raises), asked of the instance while the websocket is
        quiet; InstanceFailed if the instance no longer knows P."""
        where = await self._where()
        if where is None:
            raise InstanceFailed("prompt_lost", "the instance no longer knows the prompt (restarted?)")
        if where == "history":
            self._raise_if_failed(self._entry)
            return True
        return False

    async def _where(self) -> str | None:
        """Where the instance has P: `history` (ended), `queue`, or None."""
        if await self._history():
            return "history"
        queue = await self._call("read the queue", "GET", self._client.base / "queue")
        if self.prompt_id in _queued(queue):
            return "queue"
        return "history" if await self._history() else None  # it may have ended in between

    async def _history(self) -> dict[str, Any]:
        """P's history entry ({} until it ended), kept in `_entry` (the output is read from it)."""
        history = await self._call("read the history", "GET", self._client.base / "history" / self.prompt_id)
        entry = history.get(self.prompt_id) if isinstance(history, dict) else None
        self._entry = entry if isinstance(entry, dict) else {}
        return self._entry

    def _raise_if_failed(self, entry: Mapping[str, Any]) -> None:
        status = entry.get("status") if isinstance(entry.get("status"), dict) else {}
        assert isinstance(status, dict)
        if status.get("status_str") != "error":
            return
        for message in reversed(status.get("messages") or []):
            if (
                isinstance(message, list)
                and len(message) == 2
                and message[0] in ("execution_error", "execution_interrupted")
                and isinstance(message[1], dict)
            ):
                raise _failure(message[0], message[1])
        raise PermanentBackendError("the workflow failed at the instance", "execution_error")

    async def _output(self) -> tuple[bytes | Path, str]:
        """The bytes of the first saved file of the render's kind (a video: into the render's
        workdir, when it has one)."""
        entry = self._entry or await self._history()  # read already when the websocket was quiet
        self._raise_if_failed(entry)
        wanted = _KIND_EXTENSIONS[self._job.kind]
        files = [
            item
            for node in (entry.get("outputs") or {}).values()
            if isinstance(node, dict)
            for items in node.values()
            if isinstance(items, list)
            for item in items
            if isinstance(item, dict) and str(item.get("filename", "")).lower().endswith(wanted)
        ]
        files.sort(key=lambda item: item.get("type") != "output")  # saved files before previews
        if not files:
            raise PermanentBackendError(
                f"the workflow {self._workflow.name!r} saved no {self._job.kind} ({', '.join(wanted)})",
                "bad_output",
            )
        first = files[0]
        query = {key: str(first.get(key) or "") for key in ("filename", "subfolder", "type")}
        try:
            return await self._client.fetch(self._client.base / "view" % query, self._job.output_file())
        except TransientBackendError as exc:
            raise InstanceFailed(exc.reason, f"the output cannot be read: {exc}") from None

    async def _forget(self) -> None:
        """Deletes P's history entry (the output is read): best effort."""
        with suppress(InstanceFailed):
            await self._post(self._client.base / "history", {"delete": [self.prompt_id]}, "forget the prompt")

    async def _stop(self) -> None:
        """Takes P off the instance's queue, or interrupts it while it runs; best effort, bounded."""
        try:
            async with asyncio.timeout(self._settings.request_timeout_s):
                queue = await self._call("read the queue", "GET", self._client.base / "queue")
                if self.prompt_id in _queued(queue, "queue_pending"):
                    await self._post(self._client.base / "queue", {"delete": [self.prompt_id]}, "dequeue")
                    log.info("prompt removed from the instance's queue", extra=self.extra)
                elif self.prompt_id in _queued(queue, "queue_running"):
                    await self._post(
                        self._client.base / "interrupt", {"prompt_id": self.prompt_id}, "interrupt"
                    )
                    log.info("prompt interrupted", extra=self.extra)
        except (InstanceFailed, BackendError, TimeoutError) as exc:
            log.warning("cannot stop the prompt", extra={**self.extra, "error": str(exc)})

    async def _call(self, what: str, method: str, url: URL) -> Any:
        """A JSON request to the instance, retried; InstanceFailed once the tries are used up."""
        try:
            return await self._client.call(what, method, url)
        except TransientBackendError as exc:
            raise InstanceFailed(exc.reason, f"{what}: {exc}") from None

    async def _post(self, url: URL, body: aiohttp.FormData | dict[str, Any], what: str) -> str:
        """A POST whose answer may be empty (ComfyUI's `/queue`, `/interrupt`, `/history`); its text."""
        payload: dict[str, Any] = {"json": body} if isinstance(body, dict) else {"data": body}
        try:
            async with self._session.post(url, headers=self._client.headers(url), **payload) as response:
                text = await response.text(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise InstanceFailed("connection_failed", f"{what}: {type(exc).__name__}") from None
        if response.status >= 500:
            raise InstanceFailed(f"http_{response.status}", f"{what}: it answered {response.status}")
        if response.status >= 400:
            detail = self._client.redacted(text[:MAX_MESSAGE].strip())
            raise PermanentBackendError(f"{what}: the instance refused ({response.status}): {detail}")
        return text

    def _refusal(self, text: str) -> str:
        """ComfyUI's reasons for refusing the graph (400 on `/prompt`), in one line."""
        reasons = []
        try:
            answer = json.loads(text)
            error = answer.get("error") or {}
            reasons.append(str(error.get("message") if isinstance(error, dict) else error))
            for node_id, node in (answer.get("node_errors") or {}).items():
                for problem in node.get("errors") or []:
                    detail = problem.get("details") or problem.get("message")
                    reasons.append(f"node {node_id} ({node.get('class_type', '?')}): {detail}")
        except (ValueError, AttributeError, TypeError):
            reasons.append(text.strip())
        message = f"ComfyUI refused the workflow {self._workflow.name!r}: " + "; ".join(filter(None, reasons))
        return self._client.redacted(message)[:MAX_MESSAGE]


class _Samplers:
    """How far the graph is, from the samplers' `progress` events: the mean of their fractions,
    over as many samplers as the graph has (or as have reported, if more)."""

    def __init__(self, samplers: tuple[str, ...]) -> None:
        self._samplers = samplers
        self._fractions: dict[str, float] = {}

    def after(self, data: Mapping[str, Any]) -> float | None:
        value, maximum = data.get("value"), data.get("max")
        if not (isinstance(value, int | float) and isinstance(maximum, int | float) and maximum > 0):
            return None
        self._fractions[str(data.get("node"))] = min(1.0, max(0.0, value / maximum))
        return sum(self._fractions.values()) / max(len(self._samplers), len(self._fractions), 1)


def _event(text: str) -> tuple[str, dict[str, Any]]:
    try:
        event = json.loads(text)
    except ValueError:
        return "", {}
    if not isinstance(event, dict) or not isinstance(event.get("data"), dict):
        return "", {}
    return str(event.get("type", "")), event["data"]


def _queued(queue: Any, *keys: str) -> set[str]:
    """The prompt ids of the instance's queue (`queue_running`, `queue_pending`, or those named);
    an item is `[number, prompt_id, prompt, extra_data, outputs...]`."""
    keys = keys or ("queue_running", "queue_pending")
    items = [item for key in keys for item in (queue.get(key) or [] if isinstance(queue, dict) else [])]
    return {str(item[1]) for item in items if isinstance(item, list) and len(item) > 1}


def _failure(kind: str, data: Mapping[str, Any]) -> BackendError:
    """The error of an `execution_error` or `execution_interrupted` event."""
    node = f"node {data.get('node_id', '?')} ({data.get('node_type', '?')})"
    if kind == "execution_interrupted":
        return TransientBackendError(f"the prompt was interrupted at the instance, at {node}", "interrupted")
    exception = str(data.get("exception_type") or "error")
    text = f"the workflow failed at {node}: {exception}: {data.get('exception_message') or ''}".strip()
    text = text[:MAX_MESSAGE]
    if "OutOfMemory" in exception or "out of memory" in text.lower():
        return TransientBackendError(text, "out_of_memory")
    return PermanentBackendError(text, "execution_error")
