"""Rows of schema `generation` to domain values, and the one statement that appends events.

Every state change of a render and the events reporting it are written by `record`, in one
statement: a *fence* (a CTE yielding the render id only if the caller still may write) gates the
render update, the event inserts and the NOTIFY, so a worker that lost its lease changes nothing.
Being the one place where renders end, it is also where they are counted for the metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from services.generation.domain import (
    Event,
    NewEvent,
    Output,
    Params,
    Reference,
    Render,
    RenderError,
    Rule,
)
from services.generation.instruments import count_finished
from shared.contract import TERMINAL

# Fences: each selects `render_id` when the write may go ahead (and locks what must stay put).
FENCE_NONE = "SELECT %(id)s::text AS render_id"
# The worker still holds the job: lock it so the rescuer cannot requeue it under our feet.
FENCE_HELD = (
    "SELECT render_id FROM jobs WHERE render_id = %(id)s AND state = 'running'"
    " AND lease_token = %(token)s::uuid FOR UPDATE"
)
# The worker ends the job: it leaves the claim table in the same statement.
FENCE_END = (
    "DELETE FROM jobs WHERE render_id = %(id)s AND state = 'running'"
    " AND lease_token = %(token)s::uuid RETURNING render_id"
)
# The worker gives the job back to the queue (retry after a delay, or hand back on shutdown;
# a hand-back refunds the attempt it did not get to finish).
FENCE_REQUEUE = (
    "UPDATE jobs SET state = 'queued', lease_token = NULL, lease_expires_at = NULL, worker_id = NULL,"
    " run_after = now() + make_interval(secs => %(delay_s)s::float8), attempts = attempts - %(refund)s::int"
    " WHERE render_id = %(id)s AND state = 'running' AND lease_token = %(token)s::uuid RETURNING render_id"
)

# A render row with `waiting_on`: while it waits for its chain predecessor, that render's id.
SELECT_RENDER = """
SELECT renders.*,
    (SELECT j.depends_on FROM jobs j WHERE j.render_id = renders.id AND j.state = 'waiting') AS waiting_on
FROM renders"""

_RECORD = """
WITH fence AS ({fence}),
r AS (
    UPDATE renders SET
        last_seq = last_seq + cardinality(%(types)s::text[]),
        status = coalesce(%(status)s::text, status),
        progress = coalesce(%(progress)s::float8, progress),
        last_progress_at = CASE WHEN %(progress)s::float8 IS NULL THEN last_progress_at
                                ELSE clock_timestamp() END,
        timings = timings || %(timings)s::jsonb,
        output = coalesce(%(output)s::jsonb, output),
        error = coalesce(%(error)s::jsonb, error),
        attempts = coalesce(%(attempts)s::int, attempts),
        started_at = CASE WHEN %(status)s::text = 'running' THEN clock_timestamp() ELSE started_at END,
        finished_at = CASE WHEN %(status)s::text IN ('succeeded', 'failed', 'cancelled')
                           THEN clock_timestamp() ELSE finished_at END
    FROM fence WHERE renders.id = fence.render_id
    RETURNING renders.id, renders.last_seq, renders.kind
),
e AS (
    INSERT INTO events (render_id, seq, type, payload)
    SELECT r.id, r.last_seq - cardinality(%(types)s::text[]) + x.ord, x.type, x.payload
    FROM r, unnest(%(types)s::text[], %(payloads)s::jsonb[]) WITH ORDINALITY AS x(type, payload, ord)
)
SELECT r.last_seq, r.kind, pg_notify('generation_events', r.id || ':' || r.last_seq) FROM r
"""


async def record(
    conn: AsyncConnection[Any],
    render_id: str,
    events: Sequence[NewEvent],
    *,
    fence: str = FENCE_NONE,
    fence_params: dict[str, Any] | None = None,
    status: str | None = None,
    progress: float | None = None,
    timings: dict[str, float] | None = None,
    output: Output | None = None,
    error: RenderError | None = None,
    attempts: int | None = None,
) -> int | None:
    """Applies a render's state change and appends `events` if the fence lets it; returns the new
    last seq, or None when the fence said no (the job was taken away or has ended).

    A terminal `status` counts the render in `renderflow.renders.finished` (whichever path ended it:
    its worker, the rescuer, a cancel, a failed chain predecessor). Inside a transaction that later
    rolls back, the count stays: a rare over-count, where counting after each commit would spread
    this over every caller."""
    params: dict[str, Any] = {
        "id": render_id,
        "types": [event.type for event in events],
        "payloads": [Jsonb(event.payload()) for event in events],
        "status": status,
        "progress": progress,
        "timings": Jsonb(timings or {}),
        "output": Jsonb(output_json(output)) if output else None,
        "error": Jsonb(error.to_json()) if error else None,
        "attempts": attempts,
        **(fence_params or {}),
    }
    cur = conn.cursor(row_factory=tuple_row)
    await cur.execute(_RECORD.format(fence=fence), params)
    row = await cur.fetchone()
    if row is None:
        return None
    if status in TERMINAL:
        count_finished(row[1], status, error)
    return int(row[0])


def output_json(output: Output) -> dict[str, Any]:
    """The stored form of an output."""
    return {
        "url": output.url,
        "content_type": output.content_type,
        "bytes": output.bytes,
        "width": output.width,
        "height": output.height,
        "sha256": output.sha256,
        "duration_s": output.duration_s,
    }


def render_from_row(row: dict[str, Any]) -> Render:
    """A `renders` row as a domain value."""
    reference = row["reference"]
    output = row["output"]
    error = row["error"]
    return Render(
        id=row["id"],
        user_id=row["user_id"],
        project_id=row["project_id"],
        project=row["project"],
        chain_id=row["chain_id"],
        position=row["position"],
        kind=row["kind"],
        status=row["status"],
        progress=row["progress"],
        prompt=row["prompt"],
        negative_prompt=row["negative_prompt"],
        params=Params(**row["params"]),
        rules=tuple(Rule(r["id"], r["text"]) for r in row["rules"]),
        reference=Reference(**reference) if reference else None,
        batch_id=str(row["batch_id"]) if row["batch_id"] else "",
        output=Output(**output) if output else None,
        error=RenderError.from_json(error) if error else None,
        timings={k: float(v) for k, v in row["timings"].items()},
        attempts=row["attempts"],
        trace_id=row["trace_id"],
        traceparent=row["traceparent"],
        priority=row["priority"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        last_progress_at=row["last_progress_at"],
        waiting_on=row.get("waiting_on") or "",
    )


def event_from_row(row: dict[str, Any]) -> Event:
    """An `events` row as a domain value."""
    payload = row["payload"]
    error = payload.get("error")
    return Event(
        render_id=row["render_id"],
        seq=row["seq"],
        type=row["type"],
        at=row["at"],
        progress=payload.get("progress"),
        phase=payload.get("phase", ""),
        message=payload.get("message", ""),
        error=RenderError.from_json(error) if error else None,
    )
