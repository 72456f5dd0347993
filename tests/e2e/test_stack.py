"""The whole stack as `renderflow run` starts it, driven over HTTP only, as a client would."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import psutil
import pytest
from PIL import Image
from renderflow.v1 import generation_pb2, generation_pb2_grpc, metadata_pb2, metadata_pb2_grpc

from shared.grpc_client import create_channel
from shared.settings import Addresses, Env
from tests.conftest import free_port

DEV_KEY = "rf_e2e_development_key_0123456789abcdef"


@dataclass
class Stack:
    url: str
    process: asyncio.subprocess.Process
    run_dir: Path
    addresses: Addresses


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """`renderflow run` with its own embedded PostgreSQL, on free ports, in a fresh run dir."""
    gateway_port = free_port()
    env = {
        **os.environ,
        "RENDERFLOW_RUN_DIR": str(tmp_path / "run"),
        "RENDERFLOW_GATEWAY_PORT": str(gateway_port),
        "RENDERFLOW_LOCAL_PG_PORT": str(free_port()),
        "RENDERFLOW_METADATA_ADDR": f"127.0.0.1:{free_port()}",
        "RENDERFLOW_IMAGEFETCH_ADDR": f"127.0.0.1:{free_port()}",
        "RENDERFLOW_GENERATION_ADDR": f"127.0.0.1:{free_port()}",
        "RENDERFLOW_LOCAL_API_KEY": DEV_KEY,
        "RENDERFLOW_LOCAL_WORKERS": "2",
    }
    env.pop("DATABASE_URL", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tools.cli.main",
        "run",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{gateway_port}"
    banner = await asyncio.wait_for(_read_until(process, url), timeout=90)
    assert DEV_KEY in banner
    try:
        yield Stack(url, process, tmp_path / "run", Addresses.from_env(Env(env)))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _read_until(process: asyncio.subprocess.Process, needle: str) -> str:
    assert process.stdout is not None
    seen = ""
    while needle not in seen or DEV_KEY not in seen:
        line = await process.stdout.readline()
        if not line:
            raise AssertionError(f"renderflow run exited before it was ready:\n{seen}")
        seen += line.decode()
    return seen


async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, str]]:
    event: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if "data" in event:
                yield event
            event = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            event[field] = value.removeprefix(" ")


async def test_thin_path_over_http_then_clean_shutdown(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {DEV_KEY}"}
    async with aiohttp.ClientSession(stack.url, headers=headers) as http:
        async with http.post("/v1/projects", json={"slug": "e2e-demo", "name": "E2E"}) as created:
            assert created.status == 201, await created.text()

        request = {
            "project": "e2e-demo",
            "kind": "image",
            "prompt": "a lighthouse at dusk",
            "params": {"width": 320, "height": 200, "steps": 4, "seed": 7},
        }
        async with http.post("/v1/renders", json=request) as submitted:
            assert submitted.status == 202, await submitted.text()
            render = await submitted.json()
            assert submitted.headers["Location"] == f"/v1/renders/{render['id']}"
            assert render["status"] == "queued"

        types: list[str] = []
        async with http.get(f"/v1/renders/{render['id']}/events") as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            async with asyncio.timeout(60):
                async for event in _sse_events(stream):
                    types.append(event["event"])
                    assert json.loads(event["data"])["seq"] == int(event["id"])
        assert types[0] == "queued" and types[-1] == "succeeded", types

        async with http.get(f"/v1/renders/{render['id']}") as got:
            finished = await got.json()
        assert finished["status"] == "succeeded"
        assert finished["output"]["content_type"] == "image/png"

        async with http.get(f"/v1/renders/{render['id']}/output") as output:
            assert output.status == 200
            image = Image.open(io.BytesIO(await output.read()))
            assert (image.format, image.size) == ("PNG", (320, 200))

    # The services answer only callers with the run's token, which it keeps for people to use.
    token_file = stack.run_dir / "service-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    authenticate = metadata_pb2.AuthenticateRequest(api_key=DEV_KEY)
    async with create_channel(stack.addresses.metadata) as anonymous:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await metadata_pb2_grpc.MetadataServiceStub(anonymous).Authenticate(authenticate)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with create_channel(stack.addresses.metadata, token=token) as channel:
        user = (await metadata_pb2_grpc.MetadataServiceStub(channel).Authenticate(authenticate)).user
    async with create_channel(stack.addresses.generation, token=token) as channel:
        get = generation_pb2.GetRenderRequest(user_id=user.id, render_id=render["id"])
        assert (await generation_pb2_grpc.GenerationServiceStub(channel).GetRender(get)).id == render["id"]

    children = psutil.Process(stack.process.pid).children(recursive=True)
    assert len(children) >= 6  # postgres, three services, two workers, the gateway
    stack.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(stack.process.wait(), timeout=12) == 0
    _gone, alive = psutil.wait_procs(children, timeout=2)
    assert alive == [], f"left behind: {[p.pid for p in alive]}"


async def test_postgres_killed_is_restarted_and_stopped_with_the_rest(stack: Stack) -> None:
    def postmaster() -> int:
        (server,) = [p for p in psutil.Process(stack.process.pid).children() if p.name() == "postgres"]
        return server.pid

    killed = postmaster()
    os.kill(killed, signal.SIGKILL)
    notice = await asyncio.wait_for(_read_until_line(stack.process, f"postgres (pid {killed}) exited"), 30)
    assert "restarting in" in notice

    # Clients get typed errors until it is back, then service again.
    headers = {"Authorization": f"Bearer {DEV_KEY}"}
    statuses: list[int] = []
    async with aiohttp.ClientSession(stack.url, headers=headers) as http, asyncio.timeout(60):
        while not statuses or statuses[-1] != 201:
            project = {"slug": f"after-{len(statuses)}", "name": "After"}
            async with http.post("/v1/projects", json=project) as created:
                statuses.append(created.status)
                if created.status != 201:
                    assert created.content_type == "application/problem+json", await created.text()
                    await asyncio.sleep(0.2)
    restarted = postmaster()
    assert restarted != killed

    children = psutil.Process(stack.process.pid).children(recursive=True)
    stack.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(stack.process.wait(), timeout=12) == 0
    _gone, alive = psutil.wait_procs(children, timeout=2)
    assert alive == [], f"left behind: {[p.pid for p in alive]}"
    assert not (stack.run_dir / "pg" / "postmaster.pid").exists()  # stopped cleanly


async def _read_until_line(process: asyncio.subprocess.Process, needle: str) -> str:
    assert process.stdout is not None
    while True:
        line = (await process.stdout.readline()).decode()
        if not line:
            raise AssertionError(f"renderflow run exited before printing {needle!r}")
        if needle in line:
            return line
