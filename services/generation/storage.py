"""The render store of the API side: submit, read, list, cancel, event logs and batches.

All SQL of these operations lives here, and psycopg errors become shared.errors here and
nowhere else.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from services.generation.domain import (
    STATUSES,
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
from services.generation.records import event_from_row, record, render_from_row
from shared.errors import Conflict, FailedPrecondition, NotFound, Unavailable, ValidationFailed

DEFAULT_PAGE = 50
MAX_PAGE = 200
_BACKEND = "procedural"

# One statement: the render, its job, its `queued` event and both wake-ups. ON CONFLICT DO
# NOTHING covers the primary key and the (user, idempotency key) index alike, so racing
# duplicates create one render; the loser gets no row and reads the winner's.
_SUBMIT = """
WITH r AS (
    INSERT INTO renders (id, user_id, project_id, project, chain_id, position, kind, prompt,
        negative_prompt, params, rules, reference, batch_id, timings, trace_id, traceparent,
        idempotency_key, request_hash, priority, last_seq, created_at)
    VALUES (%(id)s, %(user_id)s, %(project_id)s, %(project)s, %(chain_id)s, %(position)s, %(kind)s,
        %(prompt)s, %(negative_prompt)s, %(params)s, %(rules)s, %(reference)s, %(batch_id)s,
        %(timings)s, %(trace_id)s, %(traceparent)s, %(idempotency_key)s, %(request_hash)s,
        %(priority)s, 1, clock_timestamp())
    ON CONFLICT DO NOTHING
    RETURNING *
),
j AS (
    INSERT INTO jobs (render_id, tenant, priority, kind, backend, created_at)
    SELECT id, user_id, priority, kind, %(backend)s, created_at FROM r
),
e AS (
    INSERT INTO events (render_id, seq, type) SELECT id, 1, 'queued' FROM r
)
SELECT r.*, pg_notify('generation_jobs', r.id) AS _jobs,
       pg_notify('generation_events', r.id || ':1') AS _events
FROM r
"""

_QUEUE_FIGURES = """
SELECT
    (SELECT count(*) FROM jobs q WHERE q.state = 'queued'
        AND (q.priority > j.priority
             OR (q.priority = j.priority AND (q.created_at, q.render_id) < (j.created_at, j.render_id))))
        AS ahead,
    (SELECT count(*) FROM jobs WHERE state = 'running') AS running,
    (SELECT avg(extract(epoch FROM s.finished_at - s.started_at)) FROM
        (SELECT finished_at, started_at FROM renders WHERE status = 'succeeded'
         ORDER BY finished_at DESC LIMIT 20) s) AS avg_run_s
FROM jobs j WHERE j.render_id = %s AND j.state = 'queued'
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
    except psycopg.OperationalError as exc:
        raise Unavailable("the database is unavailable") from exc


class RenderStore:
    """Renders, events and batches in schema `generation`, through a connection pool."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[AsyncConnection[Any]]:
        async with _translated(), self._pool.connection() as conn:
            # Single statements commit on their own (one round trip instead of three); the
            # operations of several statements open `conn.transaction()` themselves.
            await conn.set_autocommit(True)
            yield conn

    async def submit(self, spec: RenderSpec, submission: Submission, started: float) -> Render:
        """Queues a validated render, or returns the one a repeat of this submit already queued."""
        async with self._conn() as conn:
            return await _submit(conn, spec, submission, started, batch_id=None)

    async def submit_batch(self, specs: list[RenderSpec], submission: Submission, started: float) -> Batch:
        """Queues every render of a batch in one transaction (or returns the batch a repeat made)."""
        async with self._conn() as conn, conn.transaction():
            key = submission.idempotency_key or None
            row = await _one(
                conn,
                "INSERT INTO batches (user_id, idempotency_key, request_hash) VALUES (%s, %s, %s)"
                " ON CONFLICT DO NOTHING RETURNING id",
                [submission.user_id, key, submission.request_hash or None],
            )
            if row is None:
                existing = await _one(
                    conn,
                    "SELECT id, request_hash FROM batches WHERE user_id = %s AND idempotency_key = %s",
                    [submission.user_id, key],
                )
                if existing is None:
                    raise Conflict("the batch is being created by a concurrent request")
                _same_request(existing["request_hash"], submission.request_hash)
                batch_id = str(existing["id"])
            else:
                batch_id = str(row["id"])
                no_key = Submission(
                    submission.user_id, traceparent=submission.traceparent, timings=submission.timings
                )
                for spec in specs:
                    await _submit(conn, spec, no_key, started, batch_id=batch_id)
        return await self.get_batch(submission.user_id, batch_id)

    async def get(self, user_id: str, render_id: str) -> Render:
        """The user's render; NotFound when it does not exist or is someone else's."""
        async with self._conn() as conn:
            row = await _one(
                conn, "SELECT * FROM renders WHERE id = %s AND user_id = %s", [render_id, user_id]
            )
        if row is None:
            raise NotFound(f"render {render_id} not found")
        return render_from_row(row)

    async def get_any(self, render_id: str) -> Render:
        """A render whoever owns it (for workers)."""
        async with self._conn() as conn:
            row = await _one(conn, "SELECT * FROM renders WHERE id = %s", [render_id])
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

    async def list_page(self, user_id: str, where: RenderFilter, page_size: int, page_token: str) -> Page:
        """The user's renders matching `where`, newest first (or by chain position), one page."""
        size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
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
        query = sql.SQL("SELECT * FROM renders WHERE {} ORDER BY {} LIMIT {}").format(
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
        """Cancels a queued render at once (True), or flags a running one for its worker (False).
        FailedPrecondition when it has ended; NotFound when it is not the user's."""
        async with self._conn() as conn, conn.transaction():
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
            if job["state"] == "queued":
                await conn.execute("DELETE FROM jobs WHERE render_id = %s", [render_id])
                error = RenderError("cancelled", message="cancelled at the user's request")
                await record(
                    conn, render_id, [NewEvent("cancelled", error=error)], status="cancelled", error=error
                )
                return True
            await conn.execute("UPDATE jobs SET cancel_requested = true WHERE render_id = %s", [render_id])
            await conn.execute("SELECT pg_notify('generation_cancel', %s)", [render_id])
            return False

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
                conn, "SELECT * FROM renders WHERE batch_id = %s ORDER BY created_at, id", [row["id"]]
            )
        renders = [render_from_row(r) for r in rows]
        counts: dict[str, int] = {status: 0 for status in STATUSES}
        for render in renders:
            counts[render.status] += 1
        return Batch(str(row["id"]), row["user_id"], row["created_at"], counts, renders)


async def _submit(
    conn: AsyncConnection[Any], spec: RenderSpec, submission: Submission, started: float, batch_id: str | None
) -> Render:
    key = submission.idempotency_key or None
    timings = dict(submission.timings)
    # Measured up to the statement that makes the render durable (its own round trip excluded).
    timings["enqueue_ms"] = round((time.perf_counter() - started) * 1000, 3)
    params = {
        "id": spec.render_id,
        "user_id": submission.user_id,
        "project_id": spec.project_id,
        "project": spec.project,
        "chain_id": spec.chain_id,
        "position": spec.position,
        "kind": spec.kind,
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "params": Jsonb(spec.params.__dict__),
        "rules": Jsonb([{"id": r.id, "text": r.text} for r in spec.rules]),
        "reference": Jsonb(spec.reference.to_json()) if spec.reference else None,
        "batch_id": batch_id,
        "timings": Jsonb(timings),
        "trace_id": _trace_id(submission.traceparent),
        "traceparent": submission.traceparent,
        "idempotency_key": key,
        "request_hash": submission.request_hash or None,
        "priority": spec.priority,
        "backend": _BACKEND,
    }
    row = await _one(conn, _SUBMIT, params)
    if row is not None:
        return render_from_row(row)
    existing = await _one(conn, "SELECT * FROM renders WHERE id = %s", [spec.render_id])
    if existing is not None:
        if existing["user_id"] != submission.user_id:
            raise Conflict(f"render id {spec.render_id} is taken")
        return render_from_row(existing)
    if key is not None:
        existing = await _one(
            conn,
            "SELECT * FROM renders WHERE user_id = %s AND idempotency_key = %s",
            [submission.user_id, key],
        )
        if existing is not None:
            _same_request(existing["request_hash"], submission.request_hash)
            return render_from_row(existing)
    raise Conflict("the render is being created by a concurrent request; try again")


def _same_request(stored_hash: str | None, request_hash: str) -> None:
    if (stored_hash or "") != request_hash:
        raise ValidationFailed.field("idempotency_key", "was already used with a different request")


def _trace_id(traceparent: str) -> str:
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


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
