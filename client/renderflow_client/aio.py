"""The client's core, for asyncio: every call of the API, retried where that is safe, and the event
streams that resume after a drop. `Renderflow` (renderflow_client.sync) is the same core behind
blocking calls."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import anyio
import httpx
from httpx_sse import ServerSentEvent, aconnect_sse

from renderflow_client import __version__
from renderflow_client.config import load_config
from renderflow_client.errors import (
    ApiError,
    ConnectionFailed,
    NotFoundError,
    RateLimitedError,
    RenderFailed,
    RenderflowError,
    UnavailableError,
    WaitTimeout,
    error_from_response,
)
from renderflow_client.models import (
    Batch,
    Chain,
    Project,
    Render,
    RenderEvent,
    Rule,
    Upload,
    WebhookEndpoint,
)

JSON = dict[str, Any]
Reference = str | os.PathLike[str] | Mapping[str, Any] | None
"""A reference image: an http(s) URL, a local file (uploaded first), or the API's own form
(`{"render_id": ...}`, `{"upload_id": ...}`, `{"previous": True}`, with `required`)."""

RETRY_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_S = 0.5
BACKOFF_MAX_S = 10.0


class AsyncRenderflow:
    """A client of one Renderflow gateway.

    Calls that fail for a reason that passes (429, 503, 504, a broken connection) are tried again
    up to `max_retries` times with backoff, honouring Retry-After. Only calls that are safe to
    repeat are: reads, deletes, cancels, and submits, which always carry an Idempotency-Key (yours,
    or one made per call and kept across its retries), so a retry never makes a second render.
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        project: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 4,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        config = load_config(url, api_key, project)
        self.url = config.url
        self.project = config.project
        """The project of renders that name none."""
        self.max_retries = max_retries
        headers = {"User-Agent": f"renderflow-client/{__version__}"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._http = http_client or httpx.AsyncClient(
            base_url=config.url, headers=headers, timeout=timeout, follow_redirects=False
        )
        if http_client is not None:
            self._http.headers.update(headers)
        self._timeout = timeout

    async def __aenter__(self) -> AsyncRenderflow:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # Renders

    async def submit(
        self,
        prompt: str,
        *,
        project: str | None = None,
        kind: str = "image",
        params: Mapping[str, Any] | None = None,
        negative_prompt: str | None = None,
        reference: Reference = None,
        chain_id: str | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Render:
        """Queues a render and returns it at once (`queued`). `fields` are the request's other
        members (`priority`, `timeout_s`, `deadline`, `retention_s`, `webhook`)."""
        body = await self.render_request(
            prompt,
            project=project,
            kind=kind,
            params=params,
            negative_prompt=negative_prompt,
            reference=reference,
            **fields,
        )
        path = f"/v1/projects/{body.pop('project')}/chains/{chain_id}/renders" if chain_id else "/v1/renders"
        data = await self._json("POST", path, json=body, idempotency_key=idempotency_key or _new_key())
        return Render.from_json(data)

    async def render_request(
        self,
        prompt: str,
        *,
        project: str | None = None,
        kind: str = "image",
        params: Mapping[str, Any] | None = None,
        negative_prompt: str | None = None,
        reference: Reference = None,
        **fields: Any,
    ) -> JSON:
        """The body of a submit (a local reference file is uploaded for it), as `batch` takes items."""
        body: JSON = {"project": self._project(project), "kind": kind, "prompt": prompt}
        if params:
            body["params"] = dict(params)
        if negative_prompt:
            body["negative_prompt"] = negative_prompt
        if reference is not None:
            body["reference"] = await self._reference(reference)
        body.update({name: value for name, value in fields.items() if value is not None})
        return body

    async def render(self, prompt: str, *, timeout: float | None = None, **submit: Any) -> Render:
        """Submits a render and waits for it to end; the succeeded render (its `output` to
        `download`). RenderFailed when it failed, was cancelled or expired; WaitTimeout (the render
        goes on) when `timeout` seconds pass first."""
        render = await self.submit(prompt, **submit)
        render = await self.wait(render.id, timeout=timeout)
        if not render.succeeded:
            raise RenderFailed(render)
        return render

    async def get(self, render_id: str, *, download_url: bool = False) -> Render:
        """The render; with `download_url`, its output with a presigned link (object stores only)."""
        params = {"download_url": "true"} if download_url else None
        return Render.from_json(await self._json("GET", f"/v1/renders/{render_id}", params=params))

    async def list(
        self,
        *,
        project: str | None = None,
        status: str | None = None,
        kind: str | None = None,
        batch_id: str | None = None,
        chain_id: str | None = None,
        page_size: int | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[Render]:
        """The user's renders, newest first, page after page (`limit`: at most so many)."""
        filters = {
            "project": project,
            "status": status,
            "kind": kind,
            "batch_id": batch_id,
            "chain_id": chain_id,
        }
        count = 0
        async for data in self._pages("/v1/renders", "renders", filters, page_size):
            yield Render.from_json(data)
            count += 1
            if limit is not None and count >= limit:
                return

    async def cancel(self, render_id: str) -> Render:
        """Cancels a queued render at once, or asks a running one's worker to stop it (it ends
        `cancelled` soon after); a render already cancelled is answered as it is."""
        return Render.from_json(await self._json("POST", f"/v1/renders/{render_id}:cancel", safe=True))

    async def retry(self, render_id: str, *, idempotency_key: str | None = None) -> Render:
        """Queues a new render with the inputs of a failed, cancelled or expired one."""
        key = idempotency_key or _new_key()
        return Render.from_json(
            await self._json("POST", f"/v1/renders/{render_id}:retry", idempotency_key=key)
        )

    async def delete_output(self, render_id: str) -> Render:
        """Deletes an ended render's output at once (its record stays)."""
        return Render.from_json(await self._json("DELETE", f"/v1/renders/{render_id}"))

    async def batch(
        self, items: Sequence[Mapping[str, Any]], *, idempotency_key: str | None = None, **common: Any
    ) -> Batch:
        """Queues up to 64 renders atomically (all, or on one bad item none: ValidationError naming
        `items[i]`); `items` as `render_request` makes them (a missing `project` is the client's);
        `common` (deadline, timeout_s, retention_s, webhook) applies to items that state none."""
        body: JSON = {"items": [{"project": self._project(item.get("project")), **item} for item in items]}
        body.update({name: value for name, value in common.items() if value is not None})
        key = idempotency_key or _new_key()
        return Batch.from_json(await self._json("POST", "/v1/renders:batch", json=body, idempotency_key=key))

    async def get_batch(self, batch_id: str) -> Batch:
        return Batch.from_json(await self._json("GET", f"/v1/batches/{batch_id}"))

    async def cancel_batch(self, batch_id: str) -> Batch:
        return Batch.from_json(await self._json("POST", f"/v1/batches/{batch_id}:cancel", safe=True))

    # Following

    async def events(
        self, render_id: str, *, after: int = 0, heartbeat_timeout: float = 45.0, reconnect_for: float = 300.0
    ) -> AsyncGenerator[RenderEvent, None]:
        """The render's events after seq `after`, live, until its terminal event. A stream that
        drops, or stays silent past `heartbeat_timeout` (the server speaks every 15 s), is opened
        again from the last event seen: no gap, no repeat. ConnectionFailed once reconnecting has
        failed for `reconnect_for` seconds in a row."""
        last = after
        cursor = str(after) if after else ""
        async for event in self._stream(
            f"/v1/renders/{render_id}/events", cursor, heartbeat_timeout, reconnect_for
        ):
            seen = RenderEvent.from_json(_event_data(event))
            if seen.seq <= last:
                continue  # never repeat one, whatever the stream does
            last = seen.seq
            yield seen
            if seen.terminal:
                return

    async def batch_events(
        self, batch_id: str, *, heartbeat_timeout: float = 45.0, reconnect_for: float = 300.0
    ) -> AsyncIterator[RenderEvent]:
        """The events of every render of a batch, live, until all have ended; resumed after a drop
        like `events`."""
        async for event in self._stream(
            f"/v1/batches/{batch_id}/events", "", heartbeat_timeout, reconnect_for
        ):
            yield RenderEvent.from_json(_event_data(event))

    async def wait(
        self,
        render_id: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[RenderEvent], Awaitable[None] | None] | None = None,
    ) -> Render:
        """The render once it has ended, in whatever state (`on_event` sees each event on the
        way). WaitTimeout, with the render as it stands, when `timeout` seconds pass first: a wait
        always ends."""
        try:
            with anyio.fail_after(timeout):
                async with contextlib.aclosing(self.events(render_id)) as events:
                    async for event in events:
                        if on_event is not None and (pending := on_event(event)) is not None:
                            await pending
                return await self.get(render_id)
        except TimeoutError:
            render = await self.get(render_id)
            if render.done:
                return render
            raise WaitTimeout(
                f"render {render_id} is still {render.status} after {timeout:g} s", render
            ) from None

    # Outputs

    async def download(
        self, render: str | Render, path: str | os.PathLike[str] | None = None, *, redirect: bool = True
    ) -> bytes | Path:
        """The render's output: its bytes, or written to `path` (a directory: named after the
        render) and that path. Fetched from the object store itself when the gateway offers it
        (`redirect`), resumed where it broke off after a drop, checked against its SHA-256."""
        if isinstance(render, str) or render.output is None:
            render = await self.get(render if isinstance(render, str) else render.id)
        if render.output is None:
            raise (
                RenderFailed(render)
                if render.done
                else RenderflowError(f"render {render.id} is still {render.status}")
            )
        output = render.output
        target = Path(path) if path is not None else None
        if target is not None and target.is_dir():
            target = target / f"{render.id}{output.extension}"
        digest = hashlib.sha256()
        if target is None:
            buffer = bytearray()

            def keep(chunk: bytes) -> None:
                digest.update(chunk)
                buffer.extend(chunk)

            await self._fetch_output(render.id, output.sha256, redirect, keep)
            _check(digest, output.sha256, render.id)
            return bytes(buffer)
        partial = target.with_name(f".{target.name}.part")  # renamed once whole and checked
        try:
            with partial.open("wb") as sink:

                def write(chunk: bytes) -> None:
                    digest.update(chunk)
                    sink.write(chunk)

                await self._fetch_output(render.id, output.sha256, redirect, write)
            _check(digest, output.sha256, render.id)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)
        return target

    async def _fetch_output(
        self, render_id: str, etag: str, redirect: bool, take: Callable[[bytes], None]
    ) -> None:
        """Streams the output into `take`, asking for the rest (Range, If-Range) after a drop."""
        received = 0
        for attempt in range(self.max_retries + 1):
            headers = {"Range": f"bytes={received}-", "If-Range": f'"{etag}"'} if received else {}
            params = {"redirect": "true"} if redirect else None
            try:
                async with self._http.stream(
                    "GET",
                    f"/v1/renders/{render_id}/output",
                    params=params,
                    headers=headers,
                    follow_redirects=True,
                ) as response:
                    if response.status_code >= 400:
                        raise error_from_response(response, await response.aread())
                    if received and response.status_code != 206:
                        raise RenderflowError(f"the output of render {render_id} could not be resumed")
                    async for chunk in response.aiter_bytes():  # as they arrive: a drop loses none
                        take(chunk)
                        received += len(chunk)
                    return
            except (httpx.TransportError, UnavailableError, RateLimitedError) as exc:
                if attempt == self.max_retries:
                    raise _failed(exc) from exc
                await anyio.sleep(_delay(attempt, getattr(exc, "retry_after", None)))

    # Uploads

    async def upload(self, file: str | os.PathLike[str] | bytes | IO[bytes]) -> Upload:
        """Uploads an image (a path, its bytes, or an open binary file) to serve as a reference."""
        if isinstance(file, bytes):
            content = file
        elif hasattr(file, "read"):
            content = file.read()
        else:
            content = await anyio.Path(os.fspath(file)).read_bytes()
        headers = {"Content-Type": "application/octet-stream"}
        return Upload.from_json(await self._json("POST", "/v1/uploads", content=content, headers=headers))

    async def get_upload(self, upload_id: str) -> Upload:
        return Upload.from_json(await self._json("GET", f"/v1/uploads/{upload_id}"))

    async def delete_upload(self, upload_id: str) -> Upload:
        return Upload.from_json(await self._json("DELETE", f"/v1/uploads/{upload_id}"))

    # Projects, chains, rules

    async def create_project(self, slug: str, name: str | None = None) -> Project:
        return Project.from_json(
            await self._json("POST", "/v1/projects", json={"slug": slug, "name": name or slug})
        )

    async def get_project(self, slug: str) -> Project:
        return Project.from_json(await self._json("GET", f"/v1/projects/{slug}"))

    async def ensure_project(self, slug: str, name: str | None = None) -> Project:
        """The project, made if there is none of that slug."""
        try:
            return await self.get_project(slug)
        except NotFoundError:
            return await self.create_project(slug, name)

    async def list_projects(self) -> AsyncIterator[Project]:
        async for data in self._pages("/v1/projects", "projects"):
            yield Project.from_json(data)

    async def create_chain(self, project: str, name: str) -> Chain:
        return Chain.from_json(
            await self._json("POST", f"/v1/projects/{project}/chains", json={"name": name})
        )

    async def list_chains(self, project: str) -> AsyncIterator[Chain]:
        async for data in self._pages(f"/v1/projects/{project}/chains", "chains"):
            yield Chain.from_json(data)

    async def create_rule(
        self, project: str, text: str, *, chain_id: str | None = None, active: bool = True
    ) -> Rule:
        body: JSON = {"text": text, "active": active}
        if chain_id:
            body["chain_id"] = chain_id
        return Rule.from_json(await self._json("POST", f"/v1/projects/{project}/rules", json=body))

    async def list_rules(self, project: str) -> AsyncIterator[Rule]:
        async for data in self._pages(f"/v1/projects/{project}/rules", "rules"):
            yield Rule.from_json(data)

    async def update_rule(
        self, project: str, rule_id: str, *, text: str | None = None, active: bool | None = None
    ) -> Rule:
        body = {name: value for name, value in (("text", text), ("active", active)) if value is not None}
        return Rule.from_json(await self._json("PATCH", f"/v1/projects/{project}/rules/{rule_id}", json=body))

    async def delete_rule(self, project: str, rule_id: str) -> None:
        await self._request("DELETE", f"/v1/projects/{project}/rules/{rule_id}")

    # Webhooks

    async def webhook_secret(self) -> str:
        """The secret that signs the webhooks your renders name (`verify_webhook` checks them)."""
        return str((await self._json("GET", "/v1/webhooks/secret"))["secret"])

    async def create_webhook(
        self, project: str, url: str, *, events: Sequence[str] | None = None, description: str | None = None
    ) -> WebhookEndpoint:
        """A standing receiver of the project's renders' events; its `secret` is in this answer only."""
        body: JSON = {"url": url}
        if events is not None:
            body["events"] = list(events)
        if description:
            body["description"] = description
        return WebhookEndpoint.from_json(
            await self._json("POST", f"/v1/projects/{project}/webhooks", json=body)
        )

    async def list_webhooks(self, project: str) -> builtins.list[WebhookEndpoint]:
        data = await self._json("GET", f"/v1/projects/{project}/webhooks")
        return [WebhookEndpoint.from_json(item) for item in data["webhooks"]]

    async def delete_webhook(self, project: str, endpoint_id: str) -> None:
        await self._request("DELETE", f"/v1/projects/{project}/webhooks/{endpoint_id}")

    # The transport

    def _project(self, project: str | None) -> str:
        chosen = project or self.project
        if not chosen:
            raise ValueError(
                "no project: name one, or set RENDERFLOW_PROJECT (or `project` in the config file)"
            )
        return chosen

    async def _reference(self, reference: Reference) -> JSON:
        if isinstance(reference, Mapping):
            return dict(reference)
        if isinstance(reference, str) and reference.startswith(("http://", "https://")):
            return {"url": reference}
        upload = await self.upload(reference)  # type: ignore[arg-type]
        return {"upload_id": upload.id}

    async def _json(self, method: str, path: str, **options: Any) -> JSON:
        response = await self._request(method, path, **options)
        data = response.json()
        return data if isinstance(data, dict) else {"items": data}

    async def _request(
        self,
        method: str,
        path: str,
        *,
        idempotency_key: str | None = None,
        safe: bool | None = None,
        headers: Mapping[str, str] | None = None,
        **options: Any,
    ) -> httpx.Response:
        """One call, tried again while it fails for a reason that passes, if repeating it is safe
        (`safe`; by default: reads, deletes, and calls with an Idempotency-Key)."""
        sent = dict(headers or {})
        if idempotency_key:
            sent["Idempotency-Key"] = idempotency_key
        repeatable = (
            safe if safe is not None else method in ("GET", "HEAD", "DELETE") or bool(idempotency_key)
        )
        for attempt in range(self.max_retries + 1):
            try:
                response = await self._http.request(method, path, headers=sent, **options)
            except httpx.TransportError as exc:
                # A submit whose answer was lost may have been queued: its key makes the retry safe.
                if not repeatable or attempt == self.max_retries:
                    raise _failed(exc) from exc
                await anyio.sleep(_delay(attempt))
                continue
            if response.status_code < 400:
                return response
            error = error_from_response(response, response.content)
            # A 429 was refused before anything was done; 503 and 504 only for calls safe to repeat.
            again = response.status_code == 429 or (repeatable and response.status_code in RETRY_STATUSES)
            if not again or attempt == self.max_retries:
                raise error
            await anyio.sleep(_delay(attempt, error.retry_after))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _pages(
        self,
        path: str,
        key: str,
        filters: Mapping[str, str | None] | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[JSON]:
        params = {name: value for name, value in (filters or {}).items() if value}
        if page_size:
            params["page_size"] = str(page_size)
        while True:
            page = await self._json("GET", path, params=params)
            for item in page[key]:
                yield item
            token = page.get("next_page_token")
            if not token:
                return
            params["page_token"] = token

    async def _stream(
        self, path: str, cursor: str, heartbeat_timeout: float, reconnect_for: float
    ) -> AsyncIterator[ServerSentEvent]:
        """The server-sent events of `path` after `cursor` (an event id; "": from the first),
        reconnecting from the last one seen (Last-Event-ID) after a drop or a silence, until the
        stream ends on its own after its last event."""
        timeout = httpx.Timeout(self._timeout, read=heartbeat_timeout)
        attempt, failing_since = 0, None
        while True:
            headers = {"Last-Event-ID": cursor} if cursor else {}
            try:
                async with aconnect_sse(self._http, "GET", path, headers=headers, timeout=timeout) as source:
                    response = source.response
                    if response.status_code >= 400:
                        error = error_from_response(response, await response.aread())
                        if response.status_code not in RETRY_STATUSES:
                            raise error
                        raise _Dropped(error)
                    async for event in source.aiter_sse():
                        attempt, failing_since = 0, None
                        if event.event == "message" and not event.data:
                            continue  # a heartbeat
                        cursor = event.id or cursor
                        yield event
                    return  # the server ended it: after the last event
            except (httpx.TransportError, _Dropped) as exc:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > reconnect_for:
                    cause = exc.error if isinstance(exc, _Dropped) else exc
                    raise _failed(cause) from exc
                retry_after = exc.error.retry_after if isinstance(exc, _Dropped) else None
                await anyio.sleep(_delay(attempt, retry_after))
                attempt += 1


class _Dropped(Exception):
    """A stream answered with an error worth reconnecting after (429, 503, ...)."""

    def __init__(self, error: ApiError) -> None:
        self.error = error


def _event_data(event: ServerSentEvent) -> JSON:
    data = event.json()
    if not isinstance(data, dict):
        raise RenderflowError(f"an event that is not an object: {event.data[:100]!r}")
    return data


def _check(digest: Any, sha256: str, render_id: str) -> None:
    if digest.hexdigest() != sha256:
        raise RenderflowError(f"the output of render {render_id} does not match its sha256")


def _new_key() -> str:
    return f"rfc-{uuid.uuid4().hex}"


def _delay(attempt: int, retry_after: float | None = None) -> float:
    """The pause before another try: the server's Retry-After when it gave one, else exponential
    backoff with full jitter."""
    if retry_after is not None:
        return min(retry_after, 60.0)
    return random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_S * 2**attempt))


def _failed(exc: BaseException) -> RenderflowError:
    if isinstance(exc, RenderflowError):
        return exc
    return ConnectionFailed(f"the gateway could not be reached: {type(exc).__name__}: {exc}".rstrip(": "))
