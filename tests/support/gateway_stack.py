"""The whole stack in this process for tests that drive the gateway from outside: real metadata and
generation servers and a worker on one database, the gateway on port 0, and a way to seed users
and their resources through the public API."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from opentelemetry.sdk.trace import TracerProvider
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from gateway.app import running as gateway_running
from gateway.clients import open_clients
from gateway.config import Settings as GatewaySettings
from services.generation.config import Settings as GenerationSettings
from services.generation.config import WorkerSettings
from services.generation.server import running as generation_running
from services.generation.worker import running_worker
from services.metadata import admin
from services.metadata.config import Settings as MetadataSettings
from services.metadata.server import running as metadata_running
from shared.settings import Addresses
from tests.conftest import free_port

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)


@dataclass
class LiveStack:
    """A gateway in front of real services, with an HTTP session to it."""

    base: str
    http: aiohttp.ClientSession
    database_url: str

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


@asynccontextmanager
async def running_stack(
    database_url: str, work_dir: Path, gateway: GatewaySettings | None = None
) -> AsyncIterator[LiveStack]:
    """Metadata, generation, a worker (fast procedural renders) and the gateway, all on port 0."""
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
                    drain_grace_s=0.5,
                )
            )
        )
        await exits.enter_async_context(
            running_worker(
                WorkerSettings(
                    database_url=database_url,
                    artifact_dir=artifact_dir,
                    imagefetch_addr=f"127.0.0.1:{free_port()}",  # none: references fail fast
                    worker_id="stack",
                    poll_interval_s=0.2,
                    shutdown_grace_s=0.2,
                    procedural_step_ms=0.0,
                )
            )
        )
        settings = replace(
            gateway or GatewaySettings(),
            port=0,
            shutdown_grace_s=0.5,
            addresses=Addresses(
                metadata=f"127.0.0.1:{metadata_port}", generation=f"127.0.0.1:{generation_port}"
            ),
        )
        clients = await exits.enter_async_context(open_clients(settings))
        port = await exits.enter_async_context(
            gateway_running(settings, clients, tracer_provider=TracerProvider())
        )
        http = await exits.enter_async_context(aiohttp.ClientSession(timeout=HTTP_TIMEOUT))
        yield LiveStack(f"http://127.0.0.1:{port}", http, database_url)


@pytest.fixture(scope="module")
def module_database_url(pg_server_url: str) -> Iterator[str]:
    """A new, empty database shared by the tests of one module, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = {key: str(value) for key, value in conninfo_to_dict(pg_server_url).items() if value is not None}
    params["dbname"] = name
    yield make_conninfo(**params)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
