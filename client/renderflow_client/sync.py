"""The client with blocking calls: the asyncio core (renderflow_client.aio) run on an event loop of
its own, in a thread of its own (anyio's blocking portal), so both faces behave the same. Ctrl-C
while a call waits cancels the call."""

from __future__ import annotations

import builtins
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from renderflow_client.aio import AsyncRenderflow
from renderflow_client.models import Batch, Chain, Project, Render, RenderEvent, Rule, Upload, WebhookEndpoint

T = TypeVar("T")


class Renderflow:
    """A client of one Renderflow gateway; see `AsyncRenderflow` for what each call does. Close it
    (or use it in a `with` block) to let its thread go."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        project: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 4,
    ) -> None:
        self._portal_context: AbstractContextManager[BlockingPortal] = start_blocking_portal()
        self._portal = self._portal_context.__enter__()

        async def make() -> AsyncRenderflow:  # on the portal's loop, which its connections belong to
            return AsyncRenderflow(url, api_key, project=project, timeout=timeout, max_retries=max_retries)

        self.aio = self._portal.call(make)
        """The same client's asyncio face, for code running on the portal's loop."""

    @property
    def url(self) -> str:
        return self.aio.url

    @property
    def project(self) -> str | None:
        return self.aio.project

    def __enter__(self) -> Renderflow:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._portal.call(self.aio.aclose)
        self._portal_context.__exit__(None, None, None)

    # Renders

    def submit(self, prompt: str, **options: Any) -> Render:
        return self._call(self.aio.submit, prompt, **options)

    def render_request(self, prompt: str, **options: Any) -> dict[str, Any]:
        return self._call(self.aio.render_request, prompt, **options)

    def render(self, prompt: str, *, timeout: float | None = None, **submit: Any) -> Render:
        return self._call(self.aio.render, prompt, timeout=timeout, **submit)

    def get(self, render_id: str, *, download_url: bool = False) -> Render:
        return self._call(self.aio.get, render_id, download_url=download_url)

    def list(self, **filters: Any) -> Iterator[Render]:
        return self._iterate(self.aio.list(**filters))

    def cancel(self, render_id: str) -> Render:
        return self._call(self.aio.cancel, render_id)

    def retry(self, render_id: str, *, idempotency_key: str | None = None) -> Render:
        return self._call(self.aio.retry, render_id, idempotency_key=idempotency_key)

    def delete_output(self, render_id: str) -> Render:
        return self._call(self.aio.delete_output, render_id)

    def batch(self, items: Sequence[Mapping[str, Any]], **options: Any) -> Batch:
        return self._call(self.aio.batch, items, **options)

    def get_batch(self, batch_id: str) -> Batch:
        return self._call(self.aio.get_batch, batch_id)

    def cancel_batch(self, batch_id: str) -> Batch:
        return self._call(self.aio.cancel_batch, batch_id)

    # Following

    def events(self, render_id: str, **options: Any) -> Iterator[RenderEvent]:
        return self._iterate(self.aio.events(render_id, **options))

    def batch_events(self, batch_id: str, **options: Any) -> Iterator[RenderEvent]:
        return self._iterate(self.aio.batch_events(batch_id, **options))

    def wait(
        self,
        render_id: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[RenderEvent], None] | None = None,
    ) -> Render:
        """As `AsyncRenderflow.wait`; `on_event` runs on the client's own thread."""
        return self._call(self.aio.wait, render_id, timeout=timeout, on_event=on_event)

    # Outputs and uploads

    def download(
        self, render: str | Render, path: str | os.PathLike[str] | None = None, *, redirect: bool = True
    ) -> bytes | Path:
        return self._call(self.aio.download, render, path, redirect=redirect)

    def upload(self, file: str | os.PathLike[str] | bytes | IO[bytes]) -> Upload:
        return self._call(self.aio.upload, file)

    def get_upload(self, upload_id: str) -> Upload:
        return self._call(self.aio.get_upload, upload_id)

    def delete_upload(self, upload_id: str) -> Upload:
        return self._call(self.aio.delete_upload, upload_id)

    # Projects, chains, rules, webhooks

    def create_project(self, slug: str, name: str | None = None) -> Project:
        return self._call(self.aio.create_project, slug, name)

    def get_project(self, slug: str) -> Project:
        return self._call(self.aio.get_project, slug)

    def ensure_project(self, slug: str, name: str | None = None) -> Project:
        return self._call(self.aio.ensure_project, slug, name)

    def list_projects(self) -> Iterator[Project]:
        return self._iterate(self.aio.list_projects())

    def create_chain(self, project: str, name: str) -> Chain:
        return self._call(self.aio.create_chain, project, name)

    def list_chains(self, project: str) -> Iterator[Chain]:
        return self._iterate(self.aio.list_chains(project))

    def create_rule(self, project: str, text: str, **options: Any) -> Rule:
        return self._call(self.aio.create_rule, project, text, **options)

    def list_rules(self, project: str) -> Iterator[Rule]:
        return self._iterate(self.aio.list_rules(project))

    def update_rule(self, project: str, rule_id: str, **changes: Any) -> Rule:
        return self._call(self.aio.update_rule, project, rule_id, **changes)

    def delete_rule(self, project: str, rule_id: str) -> None:
        self._call(self.aio.delete_rule, project, rule_id)

    def webhook_secret(self) -> str:
        return self._call(self.aio.webhook_secret)

    def create_webhook(self, project: str, url: str, **options: Any) -> WebhookEndpoint:
        return self._call(self.aio.create_webhook, project, url, **options)

    def list_webhooks(self, project: str) -> builtins.list[WebhookEndpoint]:
        return self._call(self.aio.list_webhooks, project)

    def delete_webhook(self, project: str, endpoint_id: str) -> None:
        self._call(self.aio.delete_webhook, project, endpoint_id)

    # The bridge

    def _call(self, function: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Runs a coroutine of the core on its loop and waits for it; an interrupt (Ctrl-C) while
        waiting cancels it there before going on."""

        async def run() -> T:
            return await function(*args, **kwargs)

        future: Future[T] = self._portal.start_task_soon(run)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def _iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        """An async iterator of the core as a plain one, each item fetched on the core's loop."""
        try:
            while True:
                try:
                    yield self._call(items.__anext__)
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                self._portal.call(aclose)
