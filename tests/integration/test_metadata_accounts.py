"""Users and API keys over gRPC and through the CLI's admin functions, against a real PostgreSQL."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import psycopg
import pytest
from renderflow.v1 import metadata_pb2 as pb
from renderflow.v1.metadata_pb2_grpc import MetadataServiceStub

from services.metadata import admin
from services.metadata.config import Settings
from services.metadata.server import running
from shared.errors import Conflict, NotFound, Unauthenticated, ValidationFailed
from shared.grpc_client import create_channel
from shared.rpc_errors import rpc_errors

if TYPE_CHECKING:
    from renderflow.v1.metadata_pb2_grpc import MetadataServiceAsyncStub

DEV_KEY = "rf_dev_0123456789abcdefghijklmnop"


@pytest.fixture
async def stub(database_url: str) -> AsyncIterator[MetadataServiceAsyncStub]:
    settings = Settings(listen="127.0.0.1:0", database_url=database_url, drain_grace_s=1.0)
    async with running(settings) as port, create_channel(f"127.0.0.1:{port}") as channel:
        yield MetadataServiceStub(channel)


async def _authenticate(stub: MetadataServiceAsyncStub, key: str) -> pb.AuthenticateResponse:
    with rpc_errors():
        return await stub.Authenticate(pb.AuthenticateRequest(api_key=key))


async def test_key_authenticates_until_revoked(stub: MetadataServiceAsyncStub, database_url: str) -> None:
    created = await stub.CreateUser(pb.CreateUserRequest(name="alice"))
    key = created.api_key
    assert key.startswith("rf_") and len(key) > 40
    assert key.startswith(created.key.prefix) and len(created.key.prefix) < 16
    who = await _authenticate(stub, key)
    assert (who.user.id, who.user.name, who.key_id) == (created.user.id, "alice", created.key.id)

    second = await stub.CreateApiKey(pb.CreateApiKeyRequest(user_name="alice"))
    listed = await stub.ListApiKeys(pb.ListApiKeysRequest(user_name="alice"))
    assert [k.id for k in listed.keys] == [created.key.id, second.key.id]

    revoked = await stub.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=created.key.id))
    assert revoked.key.HasField("revoked_at")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Authenticate(pb.AuthenticateRequest(api_key=key))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await _authenticate(stub, second.api_key)).key_id == second.key.id
    for unknown in ("", "rf_nope", key + "x"):
        with pytest.raises(Unauthenticated):
            await _authenticate(stub, unknown)

    # Only a hash and a short prefix are kept.
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT key_hash, prefix FROM metadata.api_keys ORDER BY created_at, id")
        assert await cur.fetchall() == [
            (hashlib.sha256(key.encode()).digest(), created.key.prefix),
            (hashlib.sha256(second.api_key.encode()).digest(), second.key.prefix),
        ]


async def test_user_names_are_unique_and_checked(stub: MetadataServiceAsyncStub) -> None:
    await stub.CreateUser(pb.CreateUserRequest(name="alice"))
    with pytest.raises(Conflict), rpc_errors():
        await stub.CreateUser(pb.CreateUserRequest(name="alice"))
    for bad in ("", "a" * 65, "al ice", "alice/bob"):
        with pytest.raises(ValidationFailed) as caught, rpc_errors():
            await stub.CreateUser(pb.CreateUserRequest(name=bad))
        assert [e.field for e in caught.value.errors] == ["name"]
    with pytest.raises(NotFound), rpc_errors():
        await stub.CreateApiKey(pb.CreateApiKeyRequest(user_name="nobody"))
    for key_id in ("not-a-uuid", "00000000-0000-0000-0000-000000000000"):
        with pytest.raises(NotFound), rpc_errors():
            await stub.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=key_id))


async def test_ensure_dev_user_with_a_fixed_key_is_idempotent(
    stub: MetadataServiceAsyncStub, database_url: str
) -> None:
    assert await admin.ensure_dev_user(database_url, DEV_KEY) == DEV_KEY
    assert await admin.ensure_dev_user(database_url, DEV_KEY) == DEV_KEY
    [key] = await admin.list_keys(database_url, "dev")
    assert (await _authenticate(stub, DEV_KEY)).key_id == key["id"]

    # Revoked by hand, then made valid again by the next start.
    await admin.revoke_key(database_url, str(key["id"]))
    with pytest.raises(Unauthenticated):
        await _authenticate(stub, DEV_KEY)
    assert await admin.ensure_dev_user(database_url, DEV_KEY) == DEV_KEY
    assert (await _authenticate(stub, DEV_KEY)).user.name == "dev"
    assert len(await admin.list_keys(database_url, "dev")) == 1

    # Without a key, a new one is issued each time; all stay valid.
    fresh = await admin.ensure_dev_user(database_url, None)
    assert fresh != DEV_KEY
    assert (await _authenticate(stub, fresh)).user.name == "dev"
    assert len(await admin.list_keys(database_url, "dev")) == 2

    # A key of another user is not handed over.
    with pytest.raises(Conflict):
        await admin.ensure_dev_user(database_url, DEV_KEY, name="someone")
    with pytest.raises(ValidationFailed):
        await admin.ensure_dev_user(database_url, "short")


async def test_admin_functions_manage_users_and_keys(database_url: str) -> None:
    user_id, key = await admin.create_user(database_url, "carol")
    [listed] = await admin.list_keys(database_url, "carol")
    assert set(listed) == {"id", "prefix", "created_at", "revoked_at"}
    assert key.startswith(str(listed["prefix"])) and listed["revoked_at"] is None
    await admin.revoke_key(database_url, str(listed["id"]))
    [revoked] = await admin.list_keys(database_url, "carol")
    assert revoked["revoked_at"] is not None
    assert len(user_id) == 36
    with pytest.raises(Conflict):
        await admin.create_user(database_url, "carol")
    with pytest.raises(NotFound):
        await admin.revoke_key(database_url, "00000000-0000-0000-0000-000000000000")
    with pytest.raises(NotFound):
        await admin.list_keys(database_url, "nobody")
