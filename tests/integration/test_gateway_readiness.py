"""Readiness follows the database: with PostgreSQL unreachable, metadata and generation report
NOT_SERVING over gRPC health and the gateway's /readyz answers 503 naming them; once it is back,
200 again. Liveness never depends on anything."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
from opentelemetry.sdk.trace import TracerProvider
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from gateway.app import running as gateway_running
from gateway.clients import open_clients
from gateway.config import Settings as GatewaySettings
from services.generation.config import Settings as GenerationSettings
from services.generation.server import running as generation_running
from services.metadata.config import Settings as MetadataSettings
from services.metadata.server import running as metadata_running
from shared.settings import Addresses
from tests.conftest import free_port
from tests.support.observed_stack import ObservedStack
from tests.support.tcp_proxy import TcpProxy

# The watchers ping every 2 s with a 2 s timeout; a pool reconnects within a few seconds more.
CHANGE_WITHIN_S = 20.0


async def _ready(http: aiohttp.ClientSession, base: str) -> tuple[int, dict[str, object], str | None]:
    async with http.get(f"{base}/readyz") as response:
        return response.status, json.loads(await response.read()), response.headers.get("Retry-After")


async def _until(http: aiohttp.ClientSession, base: str, status: int, *naming: str) -> dict[str, object]:
    """The first /readyz answer with `status` whose detail names each of `naming`."""

    async def poll() -> dict[str, object]:
        while True:
            got, body, _ = await _ready(http, base)
            if got == status and all(name in str(body.get("detail")) for name in naming):
                return body
            await asyncio.sleep(0.1)

    return await asyncio.wait_for(poll(), CHANGE_WITHIN_S)


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[tuple[str, TcpProxy]]:
    """The test's database behind a proxy the test can cut: (URL through the proxy, proxy)."""
    params = {name: str(value) for name, value in conninfo_to_dict(database_url).items() if value is not None}
    proxy = TcpProxy(params.get("host", "127.0.0.1"), int(params.get("port", "5432")))
    params |= {"host": "127.0.0.1", "port": str(await proxy.start())}
    try:
        yield make_conninfo(**params), proxy
    finally:
        await proxy.cut()


async def test_readyz_follows_the_database(database: tuple[str, TcpProxy], tmp_path: Path) -> None:
    url, proxy = database
    async with AsyncExitStack() as exits:
        metadata_port = await exits.enter_async_context(
            metadata_running(MetadataSettings(listen="127.0.0.1:0", database_url=url, drain_grace_s=0.5))
        )
        generation_port = await exits.enter_async_context(
            generation_running(
                GenerationSettings(
                    listen="127.0.0.1:0",
                    database_url=url,
                    artifact_dir=tmp_path / "artifacts",
                    metadata_addr=f"127.0.0.1:{metadata_port}",
                    drain_grace_s=0.5,
                )
            )
        )
        settings = GatewaySettings(
            port=0,
            shutdown_grace_s=0.5,
            addresses=Addresses(
                metadata=f"127.0.0.1:{metadata_port}",
                generation=f"127.0.0.1:{generation_port}",
                imagefetch=f"127.0.0.1:{free_port()}",  # none: reported, not needed to be ready
            ),
        )
        clients = await exits.enter_async_context(open_clients(settings))
        port = await exits.enter_async_context(
            gateway_running(settings, clients, tracer_provider=TracerProvider())
        )
        http = await exits.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(10)))
        base = f"http://127.0.0.1:{port}"

        status, body, _ = await _ready(http, base)
        assert (status, body["checks"]) == (
            200,
            {"metadata": "serving", "generation": "serving", "imagefetch": "not_serving"},
        )

        await proxy.cut()
        problem = await _until(http, base, 503, "metadata", "generation")
        assert problem["code"] == "unavailable"
        status, _, retry_after = await _ready(http, base)
        assert status == 503 and retry_after is not None and int(retry_after) >= 1
        async with http.get(f"{base}/healthz") as alive:
            assert alive.status == 200  # the process itself is fine

        await proxy.start()
        await _until(http, base, 200)


async def test_readiness_reports_the_image_fetcher(observed: ObservedStack) -> None:
    async with observed.http.get(f"{observed.base}/readyz") as response:
        assert response.status == 200
        body = await response.json()
    assert body == {
        "status": "ok",
        "checks": {"metadata": "serving", "generation": "serving", "imagefetch": "serving"},
    }
