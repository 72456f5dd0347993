"""Uploads in schema `generation` (migration 0011): their records; the bytes are the artifact store's."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

from services.generation.artifacts import StoredArtifact
from services.generation.records import fetch_all, fetch_one
from services.generation.store import connection
from shared.errors import NotFound
from shared.images import Decoded
from shared.statements import load_queries

QUERIES = load_queries(Path(__file__).with_name("queries.sql"))
SWEEP_BATCH = 100


@dataclass(frozen=True)
class Upload:
    """An image a user sent, as decoded."""

    id: str
    content_type: str
    bytes: int
    width: int
    height: int
    sha256: str
    created_at: datetime
    expires_at: datetime

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Upload:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


class UploadStore:
    """The statements of uploads over the generation service's pool (autocommit)."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def insert(
        self, user_id: str, upload_id: str, image: Decoded, stored: StoredArtifact, ttl_s: float
    ) -> Upload:
        """Records an upload whose bytes are stored, kept for `ttl_s` from now (the database's)."""
        params = {
            "id": upload_id,
            "user_id": user_id,
            "content_type": image.content_type,
            "bytes": stored.size,
            "width": image.width,
            "height": image.height,
            "sha256": stored.sha256,
            "ttl_s": ttl_s,
        }
        async with connection(self._pool) as conn:
            row = await fetch_one(conn, QUERIES["insert_upload"], params)
        assert row is not None
        return Upload.from_row(row)

    async def get(self, user_id: str, upload_id: str) -> Upload:
        """The user's upload; NotFound for another user's, an expired one, or none."""
        async with connection(self._pool) as conn:
            row = await fetch_one(conn, QUERIES["get_upload"], {"id": upload_id, "user_id": user_id})
        return _found(row, upload_id)

    async def delete(self, user_id: str, upload_id: str) -> Upload:
        """Deletes the user's upload's record and returns what it was; NotFound as `get`."""
        async with connection(self._pool) as conn:
            row = await fetch_one(conn, QUERIES["delete_upload"], {"id": upload_id, "user_id": user_id})
        return _found(row, upload_id)

    async def live(self, user_id: str, upload_ids: Sequence[str]) -> set[str]:
        """Those of `upload_ids` that are uploads of the user, not expired."""
        async with connection(self._pool) as conn:
            rows = await fetch_all(
                conn, QUERIES["live_uploads"], {"user_id": user_id, "ids": list(upload_ids)}
            )
        return {row["id"] for row in rows}

    async def sweep(self, delete_file: Callable[[str], Awaitable[None]]) -> int:
        """Deletes a batch of uploads past their time, each file before its record's commit (a file
        that fails to go keeps its record, for the next sweep). Returns how many went."""
        async with connection(self._pool) as conn, conn.transaction():
            due = [row["id"] for row in await fetch_all(conn, QUERIES["due_uploads"], {"limit": SWEEP_BATCH})]
            for upload_id in due:
                await delete_file(upload_id)
            if due:
                await conn.execute(QUERIES["uploads_deleted"], {"ids": due})
        return len(due)


def _found(row: dict[str, Any] | None, upload_id: str) -> Upload:
    if row is None:
        raise NotFound(f"upload {upload_id} not found (or it expired)")
    return Upload.from_row(row)
