"""Callers are who they say they are: every RPC of every service, unary and streaming, requires the
service token (RENDERFLOW_SERVICE_TOKEN); only the health check and reflection answer without it.
And no process starts without a token."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from renderflow.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    imagefetch_pb2,
    imagefetch_pb2_grpc,
    metadata_pb2,
    metadata_pb2_grpc,
)

from services.generation.config import Settings as GenerationSettings
from services.generation.server import running as generation_running
from services.imagefetch.config import Settings as ImageFetchSettings
from services.imagefetch.server import running as imagefetch_running
from services.metadata.config import Settings as MetadataSettings
from services.metadata.server import running as metadata_running
from shared.errors import Unauthenticated
from shared.grpc_client import create_channel
from shared.rpc_errors import from_rpc_error
from shared.service_auth import TOKEN_PREFIX, new_service_token
from shared.settings import ConfigError, Env
from shared.url_guard import parse_allow_list
from tests.support.generation import Accounts, spec
from tests.support.origin import Origin
from tools.cli.main import run_service_token

REPO = Path(__file__).resolve().parents[2]
TOKEN = new_service_token()
WRONG = new_service_token()


def _serving(
    name: str, database_url: str, tmp_path: Path, metadata_addr: str = ""
) -> AbstractAsyncContextManager[int]:
    """Service `name` on a port of its own, requiring TOKEN (generation: with the metadata service
    at `metadata_addr`); entered, it gives the port."""
    if name == "metadata":
        return metadata_running(
            MetadataSettings(listen="127.0.0.1:0", database_url=database_url, service_token=TOKEN)
        )
    if name == "generation":
        return generation_running(
            GenerationSettings(
                listen="127.0.0.1:0",
                database_url=database_url,
                artifact_dir=tmp_path / "artifacts",
                metadata_addr=metadata_addr,
                drain_grace_s=0.5,
                service_token=TOKEN,
            )
        )
    allow = parse_allow_list(["127.0.0.1"])
    return imagefetch_running(
        ImageFetchSettings(listen="127.0.0.1:0", allow=allow, drain_grace_s=0.5, service_token=TOKEN)
    )


@pytest.fixture
async def metadata(database_url: str, tmp_path: Path) -> AsyncIterator[str]:
    async with _serving("metadata", database_url, tmp_path) as port:
        yield f"127.0.0.1:{port}"


@pytest.fixture
async def accounts(metadata: str) -> AsyncIterator[Accounts]:
    """Users of `metadata`, with a project each, made over a trusted channel."""
    async with create_channel(metadata, token=TOKEN) as channel:
        yield Accounts(metadata_pb2_grpc.MetadataServiceStub(channel))


@pytest.fixture
async def generation(database_url: str, tmp_path: Path, metadata: str) -> AsyncIterator[str]:
    async with _serving("generation", database_url, tmp_path, metadata) as port:
        yield f"127.0.0.1:{port}"


@pytest.fixture
async def imagefetch(tmp_path: Path) -> AsyncIterator[str]:
    async with _serving("imagefetch", "", tmp_path) as port:
        yield f"127.0.0.1:{port}"


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with Origin() as origin:
        yield origin


async def _refused(call: Any, token: str | None) -> None:
    """`call` (unary or streaming) fails UNAUTHENTICATED, saying why."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    error = caught.value
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ("missing service token" if token is None else "wrong service token") in (error.details() or "")
    assert TOKEN not in (error.details() or "") and (token is None or token not in (error.details() or ""))
    # Renderflow's own clients take it for a fault of the deployment (the gateway: a logged 500),
    # never for an end user's bad API key (a 401).
    mapped = from_rpc_error(error)
    assert not isinstance(mapped, Unauthenticated) and mapped.code == "internal"


SERVICES = {
    "metadata": "renderflow.v1.MetadataService",
    "generation": "renderflow.v1.GenerationService",
    "imagefetch": "renderflow.v1.ImageFetchService",
}
TOKENS = pytest.mark.parametrize("token", [None, WRONG], ids=["missing", "wrong"])


@TOKENS
async def test_metadata_refuses_callers_without_the_token(metadata: str, token: str | None) -> None:
    async with create_channel(metadata, token=TOKEN) as trusted:
        service = metadata_pb2_grpc.MetadataServiceStub(trusted)
        await service.CreateUser(metadata_pb2.CreateUserRequest(name="alice"))
        keys_before = await service.ListApiKeys(metadata_pb2.ListApiKeysRequest(user_name="alice"))
    async with create_channel(metadata, token=token) as channel:
        stub = metadata_pb2_grpc.MetadataServiceStub(channel)
        await _refused(stub.CreateApiKey(metadata_pb2.CreateApiKeyRequest(user_name="alice")), token)
        await _refused(stub.WatchChanges(metadata_pb2.WatchChangesRequest(after_seq=0)), token)
    async with create_channel(metadata, token=TOKEN) as trusted:
        service = metadata_pb2_grpc.MetadataServiceStub(trusted)
        keys_after = await service.ListApiKeys(metadata_pb2.ListApiKeysRequest(user_name="alice"))
    assert keys_after == keys_before  # no key was made


async def test_metadata_serves_callers_with_the_token(metadata: str) -> None:
    async with create_channel(metadata, token=TOKEN) as channel:
        stub = metadata_pb2_grpc.MetadataServiceStub(channel)
        user = await stub.CreateUser(metadata_pb2.CreateUserRequest(name="bob"))
        key = await stub.CreateApiKey(metadata_pb2.CreateApiKeyRequest(user_name="bob"))
        assert key.api_key and key.key.id
        changes = stub.WatchChanges(metadata_pb2.WatchChangesRequest(after_seq=0))
        first = await asyncio.wait_for(changes.read(), 10)
        assert isinstance(first, metadata_pb2.Change)
        changes.cancel()
    assert (first.entity, first.action, first.user_id) == ("user", "created", user.user.id)


@TOKENS
async def test_generation_refuses_callers_without_the_token(
    generation: str, accounts: Accounts, token: str | None
) -> None:
    alice = await accounts.user("alice")
    async with create_channel(generation, token=TOKEN) as trusted:
        service = generation_pb2_grpc.GenerationServiceStub(trusted)
        render = await service.Submit(generation_pb2.SubmitRequest(user_id=alice, render=spec()))
    async with create_channel(generation, token=token) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        # Another user's render, by its owner's id: exactly what a caller without the token must not read.
        get = generation_pb2.GetRenderRequest(user_id=alice, render_id=render.id)
        await _refused(stub.GetRender(get), token)
        watch = generation_pb2.WatchRequest(user_id=alice, render_id=render.id)
        await _refused(stub.Watch(watch), token)
        await _refused(stub.Submit(generation_pb2.SubmitRequest(user_id=alice, render=spec())), token)
        lengths = generation_pb2.GetChainLengthsRequest(user_id=alice, chain_ids=[render.chain_id])
        await _refused(stub.GetChainLengths(lengths), token)
    async with create_channel(generation, token=TOKEN) as trusted:
        service = generation_pb2_grpc.GenerationServiceStub(trusted)
        listed = await service.ListRenders(generation_pb2.ListRendersRequest(user_id=alice))
        counted = await service.GetChainLengths(lengths)
    assert [r.id for r in listed.renders] == [render.id]  # the refused submit made nothing
    assert dict(counted.lengths) == {render.chain_id: 1}  # nor took a position


async def test_generation_serves_callers_with_the_token(generation: str, accounts: Accounts) -> None:
    # Submit reads the project from metadata, which requires the token of generation too.
    alice = await accounts.user("alice")
    async with create_channel(generation, token=TOKEN) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        render = await stub.Submit(generation_pb2.SubmitRequest(user_id=alice, render=spec()))
        got = await stub.GetRender(generation_pb2.GetRenderRequest(user_id=alice, render_id=render.id))
        assert got.id == render.id and got.position == 1
        events = stub.Watch(generation_pb2.WatchRequest(user_id=alice, render_id=render.id))
        first = await asyncio.wait_for(events.read(), 10)
        assert isinstance(first, generation_pb2.RenderEvent)
        events.cancel()
    assert first.type == "queued"


@TOKENS
async def test_imagefetch_refuses_callers_without_the_token(
    imagefetch: str, origin: Origin, token: str | None
) -> None:
    request = imagefetch_pb2.FetchRequest(url=origin.url("/image/refused"))
    async with create_channel(imagefetch, token=token) as channel:
        stub = imagefetch_pb2_grpc.ImageFetchServiceStub(channel)
        await _refused(stub.Fetch(request), token)
        await _refused(stub.FetchWithProgress(request), token)
    assert origin.hits["/image/refused"] == 0  # nothing was fetched


async def test_imagefetch_serves_callers_with_the_token(imagefetch: str, origin: Origin) -> None:
    async with create_channel(imagefetch, token=TOKEN) as channel:
        stub = imagefetch_pb2_grpc.ImageFetchServiceStub(channel)
        fetched = await stub.Fetch(imagefetch_pb2.FetchRequest(url=origin.url("/image/unary")))
        request = imagefetch_pb2.FetchRequest(url=origin.url("/image/stream"))
        updates = [update async for update in stub.FetchWithProgress(request)]
    assert fetched.image.data == origin.image
    assert updates[-1].result.image.data == origin.image


@pytest.mark.parametrize("server", SERVICES)
async def test_health_and_reflection_answer_without_the_token(
    server: str, database_url: str, tmp_path: Path
) -> None:
    """Probes and the supervisor hold no token; reflection describes the schema and calls nothing."""
    async with AsyncExitStack() as exits:
        metadata_addr = ""
        if server == "generation":
            metadata_port = await exits.enter_async_context(_serving("metadata", database_url, tmp_path))
            metadata_addr = f"127.0.0.1:{metadata_port}"
        port = await exits.enter_async_context(_serving(server, database_url, tmp_path, metadata_addr))
        channel = await exits.enter_async_context(create_channel(f"127.0.0.1:{port}"))
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        answers = [answer async for answer in reflection.ServerReflectionInfo(iter([ask]))]
    listed = {service.name for service in answers[0].list_services_response.service}
    assert SERVICES[server] in listed


# The processes: each refuses to start without a token, before it does anything else.


@pytest.mark.parametrize(
    "module",
    [
        "services.metadata",
        "services.imagefetch",
        "services.generation",
        "services.generation.worker",
        "gateway",
    ],
)
async def test_no_process_starts_without_the_token(module: str, tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "RENDERFLOW_SERVICE_TOKEN"}
    env |= {
        "DATABASE_URL": "postgresql://renderflow@db.invalid/renderflow",
        "RENDERFLOW_RUN_DIR": str(tmp_path),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, cwd=REPO, env=env, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode != 0
    assert "RENDERFLOW_SERVICE_TOKEN must be set" in stderr.decode()


@pytest.mark.parametrize("bad", ["too-short", "a token with spaces in it", "a-token-with-a-newline\n"])
def test_a_malformed_token_is_refused_without_being_echoed(bad: str) -> None:
    with pytest.raises(ConfigError, match="RENDERFLOW_SERVICE_TOKEN") as caught:
        ImageFetchSettings.from_env(Env({"RENDERFLOW_SERVICE_TOKEN": bad}))
    assert bad.strip() not in str(caught.value)


def test_the_token_never_shows_in_settings() -> None:
    token = new_service_token()
    settings = MetadataSettings.from_env(
        Env({"DATABASE_URL": "postgresql://db/x", "RENDERFLOW_SERVICE_TOKEN": token})
    )
    assert settings.service_token == token and token not in repr(settings)
    generation = GenerationSettings(listen="x", database_url="y", artifact_dir=Path(), metadata_addr="z")
    assert token not in repr(replace(generation, service_token=token))


def test_renderflow_run_makes_a_token_and_keeps_it_for_people(tmp_path: Path) -> None:
    made = run_service_token(Env({}), tmp_path)
    path = tmp_path / "service-token"
    assert made.startswith(TOKEN_PREFIX) and path.read_text() == made + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert run_service_token(Env({}), tmp_path) != made  # a new one each run
    given = "a-token-chosen-by-the-operator"
    assert run_service_token(Env({"RENDERFLOW_SERVICE_TOKEN": given}), tmp_path) == given
    assert path.read_text() == given + "\n"
    with pytest.raises(ConfigError, match="RENDERFLOW_SERVICE_TOKEN"):
        run_service_token(Env({"RENDERFLOW_SERVICE_TOKEN": "short"}), tmp_path)
