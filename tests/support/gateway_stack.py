"""The whole stack in this process for tests that drive the gateway from outside: real metadata and
generation servers (and a worker, when asked) on one database, the gateway on port 0; a way to seed
users and their resources through the public API; and the checks those tests share."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
from opentelemetry.sdk.trace import TracerProvider

from gateway.app import running as gateway_running
from gateway.clients import Clients, open_clients
from gateway.config import Settings as GatewaySettings
from services.generation.config import Settings as GenerationSettings
from services.generation.config import WorkerSettings
from services.generation.object_store import ObjectStoreSettings
from services.generation.server import running as generation_running
from services.generation.worker import running_worker
from services.metadata import admin
from services.metadata.config import Settings as MetadataSettings
from services.metadata.server import running as metadata_running
from shared.settings import Addresses
from tests.conftest import free_port

# No request of these tests may hang: a stuck one fails with a clear error instead.
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)
PROBLEM = "application/problem+json"


@dataclass
class LiveStack:
    """A gateway in front of real services, with an HTTP session to it."""

    base: str
    http: aiohttp.ClientSession
    database_url: str
    settings: GatewaySettings
    """The gateway's settings (with the services' addresses)."""
    clients: Clients
    """The gateway's own clients of the services (to observe its upstream streams)."""

    async def user(self, name: str) -> dict[str, str]:
        """Headers authenticating as a new user."""
        _, key = await admin.create_user(self.database_url, name)
        return {"Authorization": f"Bearer {key}"}

    async def call(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> tuple[aiohttp.ClientResponse, Any]:
        """One request; the response (read) and its JSON body, or None when it has none or another type."""
        async with self.http.request(method, self.base + path, headers=headers, **kwargs) as response:
            raw = await response.read()
            is_json = response.content_type.endswith("json")
            return response, json.loads(raw) if raw and is_json else None

    async def created(self, method: str, path: str, headers: dict[str, str], **kwargs: Any) -> Any:
        """The body of a request that must succeed."""
        response, body = await self.call(method, path, headers, **kwargs)
        assert response.status < 300, (method, path, response.status, body)
        return body


@dataclass(frozen=True)
class Resources:
    """One user's project and a resource of every kind in it (the render has finished)."""

    headers: dict[str, str]
    slug: str
    chain_id: str
    rule_id: str
    render_id: str
    batch_id: str


RENDER = {
    "kind": "image",
    "prompt": "a lighthouse at dusk",
    "params": {"width": 64, "height": 64, "steps": 2},
}


async def seed_resources(stack: LiveStack, user: str, slug: str) -> Resources:
    """A user with a project, a second chain, a rule, a finished render in that chain and a batch."""
    headers = await stack.user(user)
    await stack.created("POST", "/v1/projects", headers, json={"slug": slug, "name": slug.title()})
    chain = await stack.created("POST", f"/v1/projects/{slug}/chains", headers, json={"name": "second"})
    rule = await stack.created(
        "POST", f"/v1/projects/{slug}/rules", headers, json={"text": "warm light", "chain_id": chain["id"]}
    )
    render = await stack.created(
        "POST",
        "/v1/renders",
        {**headers, "Prefer": "wait=20"},
        json={**RENDER, "project": slug, "chain_id": chain["id"]},
    )
    assert render["status"] == "succeeded", render
    batch = await stack.created(
        "POST", "/v1/renders:batch", headers, json={"items": [{**RENDER, "project": slug}] * 2}
    )
    return Resources(headers, slug, chain["id"], rule["id"], render["id"], batch["batch_id"])


StartWorker = Callable[[AsyncExitStack, str, Path], Awaitable[None]]
"""Starts what runs the stack's renders, given its exit stack, database URL and artifact directory."""


def procedural_worker(worker_id: str, step_ms: float = 0.0, concurrency: int = 4) -> StartWorker:
    """An in-process worker rendering with the procedural backend, `step_ms` per step; reference
    URLs fail fast (no image-fetch service)."""
    return in_process_worker(worker_id, concurrency, procedural_step_ms=step_ms)


def in_process_worker(worker_id: str, concurrency: int = 4, **changes: Any) -> StartWorker:
    """An in-process worker with its settings changed by `changes` (`backend=BackendSettings(...)`,
    ...); reference URLs fail fast (no image-fetch service)."""

    async def start(exits: AsyncExitStack, database_url: str, artifact_dir: Path) -> None:
        settings = WorkerSettings(
            database_url=database_url,
            artifact_dir=artifact_dir,
            imagefetch_addr=f"127.0.0.1:{free_port()}",
            image_fetch_outage_s=0.0,
            worker_id=worker_id,
            concurrency=concurrency,
            poll_interval_s=0.2,
            rescue_interval_s=0.5,
            shutdown_grace_s=0.2,
            progress_interval_s=0.01,
        )
        await exits.enter_async_context(running_worker(replace(settings, **changes)))

    return start


def running_on_bucket(
    database_url: str, work_dir: Path, bucket: ObjectStoreSettings, worker_id: str, **worker_changes: Any
) -> AbstractAsyncContextManager[LiveStack]:
    """`running_stack` with outputs and uploads in `bucket`, and an in-process worker (its settings
    changed by `worker_changes`) storing there."""
    worker = in_process_worker(worker_id, artifact_s3=bucket, **worker_changes)
    return running_stack(
        database_url, work_dir, start_worker=worker, generation_changes={"artifact_s3": bucket}
    )


@asynccontextmanager
async def running_stack(
    database_url: str,
    work_dir: Path,
    gateway: GatewaySettings | None = None,
    start_worker: StartWorker | None = None,
    tracer_provider: TracerProvider | None = None,
    generation_changes: Mapping[str, Any] | None = None,
) -> AsyncIterator[LiveStack]:
    """Metadata, generation (its settings changed by `generation_changes`), what `start_worker` starts
    (nothing by default) and the gateway (with `gateway`'s settings, its addresses and port replaced,
    its spans to `tracer_provider`), all on port 0."""
    artifact_dir = work_dir / "artifacts"
    async with AsyncExitStack() as exits:
        metadata_port = await exits.enter_async_context(
            metadata_running(
                MetadataSettings(
                    listen="127.0.0.1:0", database_url=database_url, change_poll_s=0.2, drain_grace_s=0.5
                )
            )
        )
        generation_port = await exits.enter_async_context(
            generation_running(
                GenerationSettings(
                    listen="127.0.0.1:0",
                    database_url=database_url,
                    artifact_dir=artifact_dir,
                    metadata_addr=f"127.0.0.1:{metadata_port}",
                    drain_grace_s=0.5,
                    **(generation_changes or {}),
                )
            )
        )
        if start_worker is not None:
            await start_worker(exits, database_url, artifact_dir)
        settings = replace(
            gateway or GatewaySettings(shutdown_grace_s=0.5),
            port=0,
            addresses=Addresses(  # no image fetcher: nothing listens on its port
                metadata=f"127.0.0.1:{metadata_port}",
                generation=f"127.0.0.1:{generation_port}",
                imagefetch=f"127.0.0.1:{free_port()}",
            ),
        )
        clients = await exits.enter_async_context(open_clients(settings))
        port = await exits.enter_async_context(
            gateway_running(settings, clients, tracer_provider=tracer_provider or TracerProvider())
        )
        http = await exits.enter_async_context(aiohttp.ClientSession(timeout=HTTP_TIMEOUT))
        yield LiveStack(f"http://127.0.0.1:{port}", http, database_url, settings, clients)


def assert_problem(response: aiohttp.ClientResponse, body: Any, status: int, code: str) -> None:
    """The response is the problem document of error `code` with HTTP `status`."""
    assert response.status == status, body
    assert response.content_type == PROBLEM
    assert body["status"] == status and body["code"] == code
    assert body["request_id"] == response.headers["X-Request-Id"]
    assert set(body) >= {"type", "title", "detail", "trace_id"}


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    """Waits, bounded, until `check` holds: for states only observable by asking."""

    async def poll() -> None:
        while not await check():  # noqa: ASYNC110 (nothing to wait on but the answer itself)
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout_s)
