"""The render store of the API side: submit (with the per-user quota and chain waits), read,
list, cancel, event logs and batches.

The SQL of these operations lives here and in `submissions` (the submit statement), and psycopg
errors become shared.errors here and nowhere else.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, nullcontext
from dataclasses import replace
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from services.generation.catalog import Placement
from services.generation.chains import continues_from, settle
from services.generation.domain import (
    Batch,
    Event,
    NewEvent,
    Page,
    Render,
    RenderError,
    RenderFilter,
    RenderSpec,
    Submission,
)
from services.generation.records import SELECT_RENDER, event_from_row, record, render_from_row
from services.generation.submissions import chain_lengths, insert_render, lock_key, released, same_request
from shared.contract import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, STATUSES
from shared.errors import (
    Conflict,
    FailedPrecondition,
    NotFound,
    Unavailable,
    ValidationFailed,
)

# An idempotency key stands for its first request for 24 hours; after that it is free again, and
# releasing it from the old render (or batch) lets a new one take it. Run only when an insert
# conflicted, so the submit path pays nothing for it.
_RELEASE_BATCH_KEY = """
UPDATE batches SET idempotency_key = NULL
WHERE user_id = %s AND idempotency_key = %s AND created_at < clock_timestamp() - interval '24 hours'
"""
_INSERT_BATCH = """
INSERT INTO batches (user_id, idempotency_key, request_hash) VALUES (%s, %s, %s)
ON CONFLICT DO NOTHING RETURNING id
"""

# Claims take tenants in turn: a job with k of its tenant's jobs ahead of it starts after about
# k jobs of every other tenant too (fewer when they have fewer queued).
_QUEUE_FIGURES = """
WITH me AS (SELECT * FROM jobs WHERE render_id = %s AND state = 'queued'),
own AS (
    SELECT count(*) AS ahead FROM jobs q, me
    WHERE q.tenant = me.tenant AND q.state = 'queued'
      AND (q.priority > me.priority
           OR (q.priority = me.priority AND (q.created_at, q.render_id) < (me.created_at, me.render_id)))
)
SELECT
    own.ahead + (SELECT coalesce(sum(least(t.queued, own.ahead)), 0) FROM tenants t
                 WHERE t.queued > 0 AND t.tenant <> me.tenant) AS ahead,
    (SELECT coalesce(sum(running), 0) FROM tenants) AS running,
    (SELECT avg(extract(epoch FROM s.finished_at - s.started_at)) FROM
        (SELECT finished_at, started_at FROM renders WHERE status = 'succeeded'
         ORDER BY finished_at DESC LIMIT 20) s) AS avg_run_s
FROM me, own
"""

_STALLED = """
SELECT count(*) FROM jobs j JOIN renders r ON r.id = j.render_id
WHERE j.state = 'running'
  AND coalesce(r.last_progress_at, r.started_at) < now() - make_interval(secs => %s)
"""

_EVENTS_AFTER_MANY = """
SELECT e.* FROM unnest(%s::text[], %s::int[]) AS c(render_id, after)
JOIN events e ON e.render_id = c.render_id AND e.seq > c.after
ORDER BY e.render_id, e.seq
LIMIT %s
"""


@asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    """Turns driver errors into domain errors, once, at this edge."""
    try:
        yield
    except psycopg.errors.UniqueViolation as exc:
        raise Conflict("it exists already") from exc
    except psycopg.DataError as exc:
        # A value PostgreSQL cannot store (validation should have caught it): bad input, not a fault.
        raise ValidationFailed("a value cannot be stored") from exc
    except psycopg.OperationalError as exc:
        raise Unavailable("the database is unavailable") from exc


class RenderStore:
    """Renders, events and batches in schema `generation`, through a connection pool."""

    def __init__(self, pool: AsyncConnectionPool, max_active: int = 0) -> None:
        self._pool = pool
        self._max_active = max_active
        """The most renders a user may have queued or running at once (0: no limit)."""

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[AsyncConnection[Any]]:
        async with _translated(), self._pool.connection() as conn:
            # Single statements commit on their own (one round trip instead of three); the
            # operations of several statements open `conn.transaction()` themselves.
            await conn.set_autocommit(True)
            yield conn

    async def submit(
        self, spec: RenderSpec, placement: Placement, submission: Submission, started: float
    ) -> Render:
        """Queues a validated render, or returns the one a repeat of this submit already queued."""
        async with self._conn() as conn:
            key = submission.idempotency_key
            async with conn.transaction() if key else nullcontext():
                if key:
                    await lock_key(conn, submission.user_id, key)
                max_active = self._max_active
                render = await insert_render(conn, spec, placement, submission, started, None, max_active)
            if render.waiting_on and (await settle(conn, [render.waiting_on])).changed:
                return await self.get(submission.user_id, render.id)
            return render

    async def chain_lengths(self, user_id: str, chain_ids: list[str]) -> dict[str, int]:
        """How many positions each of the user's chains has allocated (those with none left out)."""
        async with self._conn() as conn:
            return await chain_lengths(conn, user_id, chain_ids)

    async def submit_batch(
        self, specs: list[RenderSpec], placements: list[Placement], submission: Submission, started: float
    ) -> Batch:
        """Queues every render of a batch in one transaction (or returns the batch a repeat made):
        all of them, or none when one is refused (QuotaExceeded)."""
        ended: set[str] = set()
        async with self._conn() as conn, conn.transaction():
            key = submission.idempotency_key or None
            batch_params = [submission.user_id, key, submission.request_hash or None]
            row = await _one(conn, _INSERT_BATCH, batch_params)
            if row is None and await released(conn, _RELEASE_BATCH_KEY, submission.user_id, key):
                row = await _one(conn, _INSERT_BATCH, batch_params)
            if row is None:
                existing = await _one(
                    conn,
                    "SELECT id, request_hash FROM batches WHERE user_id = %s AND idempotency_key = %s",
                    [submission.user_id, key],
                )
                if existing is None:
                    raise Conflict("the batch is being created by a concurrent request")
                same_request(existing["request_hash"], submission.request_hash)
                batch_id = str(existing["id"])
            else:
                batch_id = str(row["id"])
                no_key = Submission(
                    submission.user_id, traceparent=submission.traceparent, timings=submission.timings
                )
                renders = [
                    await insert_render(conn, spec, placement, no_key, started, batch_id, self._max_active)
                    for spec, placement in zip(specs, placements, strict=True)
                ]
                # Dependents of renders outside the batch, which may have ended meanwhile.
                ended = {r.waiting_on for r in renders} - {r.id for r in renders} - {""}
        if ended:
            async with self._conn() as conn:
                await settle(conn, ended)
        return replace(await self.get_batch(submission.user_id, batch_id), replayed=row is None)

    async def get(self, user_id: str, render_id: str) -> Render:
        """The user's render; NotFound when it does not exist or is someone else's."""
        async with self._conn() as conn:
            row = await _one(conn, f"{SELECT_RENDER} WHERE id = %s AND user_id = %s", [render_id, user_id])
        if row is None:
            raise NotFound(f"render {render_id} not found")
        return render_from_row(row)

    async def get_any(self, render_id: str) -> Render:
        """A render whoever owns it (for workers)."""
        async with self._conn() as conn:
            row = await _one(conn, f"{SELECT_RENDER} WHERE id = %s", [render_id])
        if row is None:
            raise NotFound(f"render {render_id} not found")
        return render_from_row(row)

    async def queue_figures(self, render_id: str) -> tuple[int, int, float | None] | None:
        """For a queued render: jobs claimed before it, jobs running, and the mean run time of
        recent renders (seconds); None when it is not queued."""
        async with self._conn() as conn:
            row = await _one(conn, _QUEUE_FIGURES, [render_id])
        if row is None:
            return None
        avg = row["avg_run_s"]
        return int(row["ahead"]), int(row["running"]), None if avg is None else float(avg)

    async def queue_depth(self) -> dict[tuple[str, str], int]:
        """Jobs by (kind, state): queued (retries in backoff included) and running, right now."""
        async with self._conn() as conn:
            rows = await _all(conn, "SELECT kind, state, count(*) AS jobs FROM jobs GROUP BY kind, state", [])
        return {(row["kind"], row["state"]): int(row["jobs"]) for row in rows}

    async def list_page(self, user_id: str, where: RenderFilter, page_size: int, page_token: str) -> Page:
        """The user's renders matching `where`, newest first (or by chain position), one page."""
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        clauses: list[sql.Composable] = [sql.SQL("user_id = %s")]
        params: list[Any] = [user_id]
        for column in ("project_id", "chain_id", "status"):
            value = getattr(where, column)
            if value:
                clauses.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
                params.append(value)
        if where.by_position:
            order = sql.SQL("position, id")
            if page_token:
                clauses.append(sql.SQL("(position, id) > (%s, %s)"))
                params.extend(_decode_token(page_token, int))
        else:
            order = sql.SQL("created_at DESC, id DESC")
            if page_token:
                clauses.append(sql.SQL("(created_at, id) < (%s::timestamptz, %s)"))
                params.extend(_decode_token(page_token, str))
        query = sql.SQL(SELECT_RENDER + " WHERE {} ORDER BY {} LIMIT {}").format(
            sql.SQL(" AND ").join(clauses), order, size + 1
        )
        async with self._conn() as conn:
            rows = await _all(conn, query, params)
        renders = [render_from_row(row) for row in rows[:size]]
        token = ""
        if len(rows) > size:
            last = renders[-1]
            key: Any = last.position if where.by_position else last.created_at.isoformat()
            token = _encode_token(key, last.id)
        return Page(renders, token)

    async def cancel(self, user_id: str, render_id: str) -> bool:
        """Cancels a queued (or waiting) render at once (True), or flags a running one for its
        worker (False). FailedPrecondition when it has ended; NotFound when it is not the user's."""
        async with self._conn() as conn:
            cancelled = await self._cancel(conn, user_id, render_id)
            if cancelled:
                await settle(conn, [render_id])  # its chain dependents go on without it
            return cancelled

    async def _cancel(self, conn: AsyncConnection[Any], user_id: str, render_id: str) -> bool:
        async with conn.transaction():
            # Lock order everywhere: the job row, then the render row.
            job = await _one(
                conn,
                "SELECT state FROM jobs WHERE render_id = %s AND tenant = %s FOR UPDATE",
                [render_id, user_id],
            )
            if job is None:
                render = await _one(
                    conn, "SELECT status FROM renders WHERE id = %s AND user_id = %s", [render_id, user_id]
                )
                if render is None:
                    raise NotFound(f"render {render_id} not found")
                raise FailedPrecondition(f"render {render_id} has already ended ({render['status']})")
            if job["state"] != "running":
                await conn.execute("DELETE FROM jobs WHERE render_id = %s", [render_id])
                error = RenderError("cancelled", message="cancelled at the user's request")
                await record(
                    conn, render_id, [NewEvent("cancelled", error=error)], status="cancelled", error=error
                )
                return True
            await conn.execute("UPDATE jobs SET cancel_requested = true WHERE render_id = %s", [render_id])
            await conn.execute("SELECT pg_notify('generation_cancel', %s)", [render_id])
            return False

    async def continues_from(self, user_id: str, chain_id: str, position: int) -> Render | None:
        """The user's nearest render before `position` in the chain that succeeded, if any: what
        a chain render at `position` continues from."""
        async with self._conn() as conn:
            before = await continues_from(conn, user_id, chain_id, position)
        return None if before is None else await self.get(user_id, before.id)

    async def count_stalled(self, stall_after_s: float) -> int:
        """Running renders without progress for longer than `stall_after_s`."""
        async with self._conn() as conn:
            cur = await conn.execute(_STALLED, [stall_after_s])
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def events_after(self, render_id: str, after_seq: int) -> list[Event]:
        """A render's events with seq above `after_seq`, in order."""
        return await self.events_after_many({render_id: after_seq})

    async def events_after_many(self, cursors: Mapping[str, int], limit: int = 10_000) -> list[Event]:
        """The events of several renders, each above its own seq, ordered by render then seq."""
        if not cursors:
            return []
        async with self._conn() as conn:
            rows = await _all(conn, _EVENTS_AFTER_MANY, [list(cursors), list(cursors.values()), limit])
        return [event_from_row(row) for row in rows]

    async def get_batch(self, user_id: str, batch_id: str) -> Batch:
        """The user's batch with its renders (in submission order) and counts by status."""
        async with self._conn() as conn:
            row = await _one(
                conn,
                "SELECT id, user_id, created_at FROM batches WHERE id::text = %s AND user_id = %s",
                [batch_id, user_id],
            )
            if row is None:
                raise NotFound(f"batch {batch_id} not found")
            rows = await _all(
                conn, f"{SELECT_RENDER} WHERE batch_id = %s ORDER BY created_at, id", [row["id"]]
            )
        renders = [render_from_row(r) for r in rows]
        counts: dict[str, int] = {status: 0 for status in STATUSES}
        for render in renders:
            counts[render.status] += 1
        return Batch(str(row["id"]), row["user_id"], row["created_at"], counts, renders)


async def _one(conn: AsyncConnection[Any], query: str, params: Any) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(query, params)
    return await cur.fetchone()


async def _all(conn: AsyncConnection[Any], query: str | sql.Composed, params: Any) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(query, params)
    return await cur.fetchall()


def _encode_token(key: Any, last_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([key, last_id]).encode()).decode().rstrip("=")


def _decode_token(token: str, key_type: type) -> tuple[Any, str]:
    try:
        key, last_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(key, key_type) or not isinstance(last_id, str):
            raise TypeError(key)
        if isinstance(key, str):
            datetime.fromisoformat(key)
        return key, last_id
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ValidationFailed.field("page_token", "is not a token this service issued") from exc
