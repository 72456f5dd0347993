"""Administrative functions for the `renderflow` CLI, run directly against the database.

Each applies the migrations first (idempotent), opens its own connection and closes it, and goes
through the same domain code as the gRPC service, so it writes the same change-feed rows: a key
revoked here is dropped at once by every gateway caching `Authenticate` answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.metadata.service import Metadata
from services.metadata.store import Store, prepare_schema


@asynccontextmanager
async def _metadata(database_url: str) -> AsyncIterator[Metadata]:
    await prepare_schema(database_url)
    async with Store.connected(database_url) as store:
        yield Metadata(store)


async def create_user(database_url: str, name: str) -> tuple[str, str]:
    """Creates a user with one API key; returns (user_id, api_key). Conflict when the name is taken."""
    async with _metadata(database_url) as metadata:
        user, issued = await metadata.create_user(name)
    return str(user.id), issued.secret


async def ensure_dev_user(database_url: str, api_key: str | None, name: str = "dev") -> str:
    """The API key in force for the development user, creating the user when missing.

    With `api_key`, makes that exact key valid for the user (stored if absent, revocation lifted)
    and returns it; without, issues a new key and returns it (only its hash is kept, so an
    earlier key cannot be returned again).
    """
    async with _metadata(database_url) as metadata:
        return await metadata.ensure_user_key(name, api_key)


async def list_keys(database_url: str, name: str) -> list[dict[str, object]]:
    """The user's API keys, oldest first: id, prefix, created_at, revoked_at (None while valid)."""
    async with _metadata(database_url) as metadata:
        found = await metadata.list_api_keys(name)
    return [
        {"id": str(key.id), "prefix": key.prefix, "created_at": key.created_at, "revoked_at": key.revoked_at}
        for key in found
    ]


async def revoke_key(database_url: str, key_id: str) -> None:
    """Revokes an API key (NotFound when unknown) and notifies the change feed."""
    async with _metadata(database_url) as metadata:
        await metadata.revoke_api_key(key_id)
