"""PostgreSQL storage of the metadata service: every query (in queries.sql), the change-feed
writes that go with each mutation, and the one place where psycopg errors become domain errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, nullcontext
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from psycopg import errors
from psycopg.rows import class_row, dict_row
from psycopg_pool import AsyncConnectionPool

from services.metadata.domain import (
    ApiKey,
    Chain,
    Change,
    Cursor,
    Project,
    Resolved,
    Rule,
    RuleSnapshot,
    User,
)
from shared.db import migrate
from shared.errors import Conflict, DeadlineExceeded, NotFound, Unavailable, ValidationFailed
from shared.statements import load_queries

SCHEMA = "metadata"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# The advisory lock every change-writing transaction holds from just before it allocates its
# seq until it commits (any fixed number works; this one spells "meta").
CHANGES_LOCK_KEY = 0x6D657461

T = TypeVar("T")
ConnectionSource = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]
# (entity, action, entity_id, owner's user_id): one row of the change feed.
ChangeRow = tuple[str, str, UUID, UUID]


Q = load_queries(Path(__file__).with_name("queries.sql"))

_CONFLICTS = {
    "users_name_key": "a user with this name exists",
    "projects_user_slug_key": "a project with this slug exists",
    "api_keys_key_hash_key": "this API key is already registered",
}


@contextmanager
def translated_errors() -> Iterator[None]:
    """psycopg errors become domain errors here, and nowhere else."""
    try:
        yield
    except errors.UniqueViolation as exc:
        raise Conflict(_CONFLICTS.get(exc.diag.constraint_name or "")) from exc
    except errors.ForeignKeyViolation as exc:
        # The only reference a caller names that can vanish under it is its own user.
        raise NotFound("no such user") from exc
    except (errors.CheckViolation, errors.DataError) as exc:
        # The domain validates first; this is the database's second line of defence.
        raise ValidationFailed("invalid value") from exc
    except errors.QueryCanceled as exc:
        raise DeadlineExceeded("the metadata database did not answer in time") from exc
    except errors.TransactionRollback as exc:
        raise Unavailable("concurrent update; try again", retry_after=0.1) from exc
    except (psycopg.OperationalError, TimeoutError) as exc:
        raise Unavailable("the metadata database is unavailable") from exc


async def prepare_schema(database_url: str) -> None:
    """Applies the service's migrations (idempotent; safe from several processes at once)."""
    with translated_errors():
        await migrate(database_url, SCHEMA, MIGRATIONS_DIR)


async def _one(
    conn: psycopg.AsyncConnection[Any], query: str, params: dict[str, Any], row: type[T]
) -> T | None:
    cur = conn.cursor(row_factory=class_row(row))
    await cur.execute(query, params)
    return await cur.fetchone()


async def _all(
    conn: psycopg.AsyncConnection[Any], query: str, params: dict[str, Any], row: type[T]
) -> list[T]:
    cur = conn.cursor(row_factory=class_row(row))
    await cur.execute(query, params)
    return await cur.fetchall()


async def _record(conn: psycopg.AsyncConnection[Any], changes: Sequence[ChangeRow]) -> None:
    """Appends to the change feed inside the caller's transaction, and notifies listeners at commit.

    Why the lock: an identity column hands out seq values when rows are inserted, but
    transactions commit in any order, so without it a reader could see seq N+1 committed while N
    is still in flight, move its high-water mark past N, and never see N. Holding one advisory
    lock from just before the seq is allocated until commit makes change-writing transactions
    commit one at a time, in seq order. Changes are rare (configuration edits, never the submit
    path), so the serialization costs nothing that matters.
    """
    await conn.execute(Q["lock_changes"], {"key": CHANGES_LOCK_KEY})
    entities, actions, entity_ids, user_ids = zip(*changes, strict=True)
    cur = await conn.execute(
        Q["insert_changes"],
        {
            "entities": list(entities),
            "actions": list(actions),
            "entity_ids": list(entity_ids),
            "user_ids": list(user_ids),
        },
    )
    row = await cur.fetchone()
    assert row is not None
    LAST_CHANGE_SEQ.set(int(row[0]))


LAST_CHANGE_SEQ: ContextVar[int] = ContextVar("last_change_seq", default=0)
"""The seq of the last change this task wrote to the feed (0: none): what a write's answer
acknowledges, so that its caller can ask for reads at least that fresh."""


def _uuid_or_none(text: str) -> UUID | None:
    try:
        return UUID(text)
    except ValueError:
        return None


async def _insert_key(
    conn: psycopg.AsyncConnection[Any], user_id: UUID, key_hash: bytes, prefix: str
) -> ApiKey:
    key = await _one(
        conn, Q["insert_api_key"], {"user_id": user_id, "key_hash": key_hash, "prefix": prefix}, ApiKey
    )
    assert key is not None  # INSERT ... RETURNING
    return key


def _page(after: Cursor, limit: int) -> dict[str, Any]:
    return {"after_at": after.created_at, "after_id": after.id, "limit": limit}


class Store:
    """Every read and write of the metadata schema; one transaction per method."""

    def __init__(self, connect: ConnectionSource) -> None:
        self._connect = connect

    @classmethod
    def over_pool(cls, pool: AsyncConnectionPool) -> Store:
        """A store drawing connections from `pool`."""
        return cls(pool.connection)

    @classmethod
    @asynccontextmanager
    async def connected(cls, database_url: str) -> AsyncIterator[Store]:
        """A store over one connection of its own, closed on exit (for administrative tools)."""
        with translated_errors():
            async with await psycopg.AsyncConnection.connect(
                database_url, autocommit=True, application_name="renderflow-metadata-admin"
            ) as conn:
                yield cls(lambda: nullcontext(conn))

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        with translated_errors():
            async with self._connect() as conn:
                # Autocommit: a single statement is its own transaction, with no BEGIN/COMMIT
                # round trips; several statements use an explicit transaction() block.
                if not conn.autocommit:
                    await conn.set_autocommit(True)
                yield conn

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with self._connection() as conn, conn.transaction():
            yield conn

    # Users and API keys.

    async def create_user(self, name: str, key_hash: bytes, prefix: str) -> tuple[User, ApiKey]:
        """Creates a user with one API key; Conflict when the name is taken."""
        async with self._transaction() as conn:
            user = await _one(conn, Q["insert_user"], {"name": name}, User)
            assert user is not None
            key = await _insert_key(conn, user.id, key_hash, prefix)
            await _record(
                conn, [("user", "created", user.id, user.id), ("api_key", "created", key.id, user.id)]
            )
        return user, key

    async def create_api_key(self, user_name: str, key_hash: bytes, prefix: str) -> ApiKey:
        """Adds an API key to the named user."""
        async with self._transaction() as conn:
            user = await self._user(conn, user_name)
            key = await _insert_key(conn, user.id, key_hash, prefix)
            await _record(conn, [("api_key", "created", key.id, user.id)])
        return key

    async def ensure_api_key(self, user_name: str, key_hash: bytes, prefix: str) -> ApiKey:
        """Makes the key valid for the named user, creating the user, storing the key or lifting
        its revocation as needed; Conflict when the key belongs to someone else."""
        async with self._transaction() as conn:
            changes: list[ChangeRow] = []
            user = await _one(conn, Q["insert_user_if_absent"], {"name": user_name}, User)
            if user is None:
                user = await self._user(conn, user_name)
            else:
                changes.append(("user", "created", user.id, user.id))
            key = await _one(conn, Q["api_key_by_hash"], {"key_hash": key_hash}, ApiKey)
            if key is None:
                key = await _insert_key(conn, user.id, key_hash, prefix)
                changes.append(("api_key", "created", key.id, user.id))
            elif key.user_id != user.id:
                raise Conflict("this API key belongs to another user")
            elif key.revoked_at is not None:
                key = await _one(conn, Q["reinstate_api_key"], {"id": key.id}, ApiKey)
                assert key is not None
                changes.append(("api_key", "updated", key.id, user.id))
            if changes:
                await _record(conn, changes)
        return key

    async def list_api_keys(self, user_name: str) -> list[ApiKey]:
        """The named user's keys, oldest first."""
        async with self._connection() as conn:
            user = await self._user(conn, user_name)
            return await _all(conn, Q["api_keys_of_user"], {"user_id": user.id}, ApiKey)

    async def revoke_api_key(self, key_id: UUID) -> ApiKey:
        """Revokes a key (a no-op on a revoked one)."""
        async with self._transaction() as conn:
            key = await _one(conn, Q["revoke_api_key"], {"id": key_id}, ApiKey)
            if key is not None:
                await _record(conn, [("api_key", "revoked", key.id, key.user_id)])
                return key
            key = await _one(conn, Q["api_key_by_id"], {"id": key_id}, ApiKey)
        if key is None:
            raise NotFound("no such API key")
        return key

    async def authenticate(self, key_hash: bytes) -> tuple[User, UUID] | None:
        """The user owning a valid key with this hash, and the key's id."""
        async with self._connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(Q["authenticate"], {"key_hash": key_hash})
            row = await cur.fetchone()
        if row is None:
            return None
        return User(row["id"], row["name"], row["created_at"]), row["key_id"]

    async def _user(self, conn: psycopg.AsyncConnection[Any], name: str) -> User:
        user = await _one(conn, Q["user_by_name"], {"name": name}, User)
        if user is None:
            raise NotFound("no such user")
        return user

    # Projects, chains and rules: every query is scoped to the caller's user_id.

    async def create_project(self, user_id: UUID, slug: str, name: str) -> Project:
        """Creates a project with its default chain."""
        async with self._transaction() as conn:
            project = await _one(
                conn, Q["insert_project"], {"user_id": user_id, "slug": slug, "name": name}, Project
            )
            assert project is not None
            await _record(
                conn,
                [
                    ("project", "created", project.id, user_id),
                    ("chain", "created", project.default_chain_id, user_id),
                ],
            )
        return project

    async def get_project(self, user_id: UUID, slug: str) -> Project:
        """The user's project with this slug."""
        async with self._connection() as conn:
            return await self._project(conn, user_id, slug)

    async def list_projects(self, user_id: UUID, after: Cursor, limit: int) -> list[Project]:
        """Up to `limit` of the user's projects after `after`, in creation order."""
        async with self._connection() as conn:
            return await _all(conn, Q["list_projects"], {"user_id": user_id, **_page(after, limit)}, Project)

    async def create_chain(self, user_id: UUID, slug: str, name: str) -> Chain:
        """Adds a chain to the user's project."""
        async with self._transaction() as conn:
            chain = await _one(
                conn, Q["insert_chain"], {"user_id": user_id, "slug": slug, "name": name}, Chain
            )
            if chain is None:
                raise NotFound("no such project")
            await _record(conn, [("chain", "created", chain.id, user_id)])
        return chain

    async def get_chain(self, user_id: UUID, slug: str, chain_id: UUID) -> Chain:
        """A chain of the user's project."""
        async with self._connection() as conn:
            chain = await _one(
                conn, Q["chain_by_id"], {"user_id": user_id, "slug": slug, "id": chain_id}, Chain
            )
            if chain is None:
                await self._project(conn, user_id, slug)
                raise NotFound("no such chain")
        return chain

    async def list_chains(self, user_id: UUID, slug: str, after: Cursor, limit: int) -> list[Chain]:
        """Up to `limit` chains of the user's project after `after`, in creation order."""
        params = {"user_id": user_id, "slug": slug, **_page(after, limit)}
        async with self._connection() as conn:
            chains = await _all(conn, Q["list_chains"], params, Chain)
            if not chains:
                await self._project(conn, user_id, slug)
        return chains

    async def create_rule(
        self, user_id: UUID, slug: str, chain_id: UUID | None, text: str, active: bool
    ) -> Rule:
        """Adds a rule to the user's project, project-wide or for one of its chains."""
        params = {"user_id": user_id, "slug": slug, "chain_id": chain_id, "text": text, "active": active}
        async with self._transaction() as conn:
            rule = await _one(conn, Q["insert_rule"], params, Rule)
            if rule is None:
                await self._project(conn, user_id, slug)
                raise NotFound("no such chain")
            await _record(conn, [("rule", "created", rule.id, user_id)])
        return rule

    async def list_rules(self, user_id: UUID, slug: str, after: Cursor, limit: int) -> list[Rule]:
        """Up to `limit` rules of the user's project after `after`, in creation order."""
        params = {"user_id": user_id, "slug": slug, **_page(after, limit)}
        async with self._connection() as conn:
            rules = await _all(conn, Q["list_rules"], params, Rule)
            if not rules:
                await self._project(conn, user_id, slug)
        return rules

    async def update_rule(
        self, user_id: UUID, slug: str, rule_id: UUID, text: str | None, active: bool | None
    ) -> Rule:
        """Changes a rule's text and/or activity (None leaves it as it is)."""
        params = {"user_id": user_id, "slug": slug, "id": rule_id, "text": text, "active": active}
        async with self._transaction() as conn:
            rule = await _one(conn, Q["update_rule"], params, Rule)
            if rule is None:
                await self._project(conn, user_id, slug)
                raise NotFound("no such rule")
            await _record(conn, [("rule", "updated", rule.id, user_id)])
        return rule

    async def delete_rule(self, user_id: UUID, slug: str, rule_id: UUID) -> None:
        """Deletes a rule of the user's project."""
        async with self._transaction() as conn:
            cur = await conn.execute(Q["delete_rule"], {"user_id": user_id, "slug": slug, "id": rule_id})
            if await cur.fetchone() is None:
                await self._project(conn, user_id, slug)
                raise NotFound("no such rule")
            await _record(conn, [("rule", "deleted", rule_id, user_id)])

    async def resolve_render(self, user_id: UUID, project_ref: str, chain_id: UUID | None) -> Resolved:
        """The project (slug or id), chain and active rules a render is made with: one statement."""
        params = {
            "user_id": user_id,
            "project": project_ref,
            "project_id": _uuid_or_none(project_ref),
            "chain_id": chain_id,
        }
        async with self._connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(Q["resolve_render"], params)
            row = await cur.fetchone()
        if row is None:
            raise NotFound("no such project")
        if row["chain_id"] is None:
            raise NotFound("no such chain")
        project = Project(
            row["id"], row["user_id"], row["slug"], row["name"], row["default_chain_id"], row["created_at"]
        )
        chain = Chain(
            row["chain_id"],
            project.id,
            project.slug,
            row["chain_name"],
            row["is_default"],
            row["length"],
            row["chain_created_at"],
        )
        rules = [
            RuleSnapshot(rule_id, text)
            for rule_id, text in zip(row["rule_ids"] or [], row["rule_texts"] or [], strict=True)
        ]
        return Resolved(project, chain, rules, int(row["change_seq"]))

    async def _project(self, conn: psycopg.AsyncConnection[Any], user_id: UUID, slug: str) -> Project:
        project = await _one(conn, Q["project_by_slug"], {"user_id": user_id, "slug": slug}, Project)
        if project is None:
            raise NotFound("no such project")
        return project

    # The change feed.

    async def changes_after(self, seq: int, limit: int) -> list[Change]:
        """Up to `limit` changes with a seq above `seq`, in order."""
        async with self._connection() as conn:
            return await _all(conn, Q["changes_after"], {"after": seq, "limit": limit}, Change)

    async def last_change_seq(self) -> int:
        """The highest committed seq (0 when the feed is empty)."""
        async with self._connection() as conn:
            cur = await conn.execute(Q["last_change_seq"])
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def prune_changes(self, retention: timedelta) -> int:
        """Deletes changes older than `retention`; returns how many."""
        async with self._connection() as conn:
            cur = await conn.execute(Q["prune_changes"], {"retention": retention})
            return cur.rowcount
