"""The submit path's one statement: a render at its chain's next position, its job and its
`queued` event, inserted idempotently under the per-user quota, with a chain render made to wait
for the render before it.

Part of the render store (see `storage`): SQL here, psycopg errors translated by its caller.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from services.generation.catalog import Placement
from services.generation.domain import NewEvent, Render, RenderSpec, Submission
from services.generation.records import SELECT_RENDER, render_from_row
from shared.errors import Conflict, QuotaExceeded, ValidationFailed

_BACKEND = "procedural"

# One statement: the chain's next position, the render, its job (queued, or waiting for the render
# before it in its chain), its `queued` event and both wake-ups.
# - The upsert of the user's tenant row locks it until the statement commits, so the quota check
#   (`active`: the user's jobs before this one) is exact under concurrency; a render the quota
#   refuses is not inserted and `id` comes back NULL.
# - The position is taken only for a render that will be inserted (within the quota, not a repeat
#   of an id or of a live idempotency key), so repeats leave no gap in the chain; the upsert of the
#   chain's row serializes positions, which are never shared. (Racing repeats of one key are
#   serialized by the caller's advisory lock, so the second sees the first.)
# - `previous` is the render before it, as far as this statement sees: the caller settles the
#   waiting job at once, which links or releases it as the chain stands.
# - The first render of a chain has nothing to continue from: a `previous` reference is dropped.
# ON CONFLICT DO NOTHING covers the primary key and the (user, idempotency key) index alike.
_SUBMIT = """
WITH t AS (
    INSERT INTO tenants AS t (tenant) VALUES (%(user_id)s)
    ON CONFLICT (tenant) DO UPDATE SET tenant = t.tenant
    RETURNING queued + running + waiting AS active
),
p AS (
    INSERT INTO chain_positions AS c (chain_id, user_id, last)
    SELECT %(chain_id)s, %(user_id)s, 1 FROM t
    WHERE (%(max_active)s = 0 OR t.active < %(max_active)s)
      AND NOT EXISTS (SELECT FROM renders WHERE id = %(id)s)
      AND NOT EXISTS (
          SELECT FROM renders WHERE user_id = %(user_id)s AND idempotency_key = %(idempotency_key)s
      )
    ON CONFLICT (chain_id) DO UPDATE SET last = c.last + 1
    RETURNING last AS position
),
previous AS (
    SELECT id FROM renders
    WHERE user_id = %(user_id)s AND chain_id = %(chain_id)s AND position < (SELECT position FROM p)
    ORDER BY position DESC, created_at DESC LIMIT 1
),
r AS (
    INSERT INTO renders (id, user_id, project_id, project, chain_id, position, kind, prompt,
        negative_prompt, params, rules, reference, batch_id, timings, trace_id, traceparent,
        idempotency_key, request_hash, priority, last_seq, created_at)
    SELECT %(id)s, %(user_id)s, %(project_id)s, %(project)s, %(chain_id)s, p.position, %(kind)s,
        %(prompt)s, %(negative_prompt)s, %(params)s, %(rules)s,
        CASE WHEN %(chains)s AND p.position = 1 THEN NULL ELSE %(reference)s::jsonb END,
        %(batch_id)s, %(timings)s, %(trace_id)s, %(traceparent)s, %(idempotency_key)s,
        %(request_hash)s, %(priority)s, 1, clock_timestamp()
    FROM p
    ON CONFLICT DO NOTHING
    RETURNING *
),
j AS (
    INSERT INTO jobs (render_id, tenant, priority, kind, backend, created_at, state, depends_on)
    SELECT id, user_id, priority, kind, %(backend)s, created_at,
        CASE WHEN %(chains)s AND position > 1 THEN 'waiting' ELSE 'queued' END,
        CASE WHEN %(chains)s THEN (SELECT id FROM previous) END
    FROM r
),
e AS (
    INSERT INTO events (render_id, seq, type, payload)
    SELECT id, 1, 'queued',
        CASE WHEN %(chains)s AND position > 1 THEN %(waiting_event)s ELSE %(event)s END
    FROM r
)
SELECT r.*, CASE WHEN %(chains)s AND r.position > 1 THEN (SELECT id FROM previous) END AS waiting_on,
       t.active AS _active,
       CASE WHEN r.id IS NOT NULL THEN pg_notify('generation_jobs', r.id) END AS _jobs,
       CASE WHEN r.id IS NOT NULL THEN pg_notify('generation_events', r.id || ':1') END AS _events
FROM t LEFT JOIN r ON true
"""

_WAITING = "waiting for the previous render of the chain"
_KEY_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"

_CHAIN_LENGTHS = "SELECT chain_id, last FROM chain_positions WHERE user_id = %s AND chain_id = ANY(%s)"

# An idempotency key stands for its first request for 24 hours (see storage).
_RELEASE_RENDER_KEY = """
UPDATE renders SET idempotency_key = NULL
WHERE user_id = %s AND idempotency_key = %s AND created_at < clock_timestamp() - interval '24 hours'
"""

_RETRY_AFTER = """
SELECT (SELECT running FROM tenants WHERE tenant = %s) AS running,
    (SELECT avg(extract(epoch FROM s.finished_at - s.started_at)) FROM
        (SELECT finished_at, started_at FROM renders WHERE status = 'succeeded'
         ORDER BY finished_at DESC LIMIT 20) s) AS mean_s
"""


async def insert_render(
    conn: AsyncConnection[Any],
    spec: RenderSpec,
    placement: Placement,
    submission: Submission,
    started: float,
    batch_id: str | None,
    max_active: int,
) -> Render:
    """Queues one validated render at its chain's next position (with its job and `queued` event)
    in the caller's connection or transaction, or returns the render a repeat of this submit
    already made. A chain render waits for the render before it: the caller then `settle`s it.
    QuotaExceeded when the user already has `max_active` renders queued or running (0: no limit).
    A keyed submit must run in a transaction holding `lock_key` (see there)."""
    key = submission.idempotency_key or None
    chains = spec.reference is not None and spec.reference.chain_previous
    timings = dict(submission.timings)
    # Measured up to the statement that makes the render durable (its own round trip excluded).
    timings["enqueue_ms"] = round((time.perf_counter() - started) * 1000, 3)
    params = {
        "id": spec.render_id,
        "user_id": submission.user_id,
        "project_id": placement.project_id,
        "project": placement.project,
        "chain_id": placement.chain_id,
        "kind": spec.kind,
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "params": Jsonb(spec.params.__dict__),
        "rules": Jsonb([{"id": r.id, "text": r.text} for r in placement.rules]),
        "reference": Jsonb(spec.reference.to_json()) if spec.reference else None,
        "chains": chains,
        "batch_id": batch_id,
        "timings": Jsonb(timings),
        "trace_id": _trace_id(submission.traceparent),
        "traceparent": submission.traceparent,
        "idempotency_key": key,
        "request_hash": submission.request_hash or None,
        "priority": spec.priority,
        "backend": _BACKEND,
        "event": Jsonb(NewEvent("queued").payload()),
        "waiting_event": Jsonb(NewEvent("queued", message=_WAITING).payload()),
        "max_active": max_active,
    }
    row, active = await _insert(conn, params)
    if row is None and await released(conn, _RELEASE_RENDER_KEY, submission.user_id, key):
        row, active = await _insert(conn, params)
    if row is not None:
        return render_from_row(row)
    existing = await _one(conn, f"{SELECT_RENDER} WHERE id = %s", [spec.render_id])
    if existing is not None:
        if existing["user_id"] != submission.user_id:
            raise Conflict(f"render id {spec.render_id} is taken")
        return replace(render_from_row(existing), replayed=True)
    if key is not None:
        existing = await _one(
            conn,
            f"{SELECT_RENDER} WHERE user_id = %s AND idempotency_key = %s",
            [submission.user_id, key],
        )
        if existing is not None:
            same_request(existing["request_hash"], submission.request_hash)
            return replace(render_from_row(existing), replayed=True)
    if max_active and active >= max_active:
        raise QuotaExceeded(
            f"{active} renders queued or running, the most one user may have; try again when some"
            " have finished",
            retry_after=await _retry_after(conn, submission.user_id),
        )
    raise Conflict("the render is being created by a concurrent request; try again")


async def lock_key(conn: AsyncConnection[Any], user_id: str, key: str) -> None:
    """Holds, until the caller's transaction ends, the lock of one user's idempotency key: racing
    repeats of a keyed submit run one after the other, so the later one finds the render the
    earlier made instead of taking a second chain position."""
    await conn.execute(_KEY_LOCK, [f"{user_id}\n{key}"])


async def chain_lengths(conn: AsyncConnection[Any], user_id: str, chain_ids: list[str]) -> dict[str, int]:
    """The last allocated position of each of the user's chains that has one."""
    cur = await conn.execute(_CHAIN_LENGTHS, [user_id, chain_ids])
    return {str(chain_id): int(last) for chain_id, last in await cur.fetchall()}


async def _insert(conn: AsyncConnection[Any], params: dict[str, Any]) -> tuple[dict[str, Any] | None, int]:
    """Runs _SUBMIT: the render inserted (None when refused or a duplicate) and how many renders
    the user had queued or running before it."""
    row = await _one(conn, _SUBMIT, params)
    assert row is not None  # the tenant row always comes back
    return (row if row["id"] is not None else None), int(row["_active"])


async def _retry_after(conn: AsyncConnection[Any], user_id: str) -> float:
    """Roughly when the first of the user's running renders should end: the mean run time of
    recent renders over how many of the user's run at once (at least 1 s)."""
    row = await _one(conn, _RETRY_AFTER, [user_id])
    mean_s = float(row["mean_s"]) if row and row["mean_s"] is not None else 10.0
    running = int(row["running"]) if row and row["running"] else 1
    return max(1.0, round(mean_s / running, 1))


async def released(conn: AsyncConnection[Any], statement: str, user_id: str, key: str | None) -> bool:
    """Whether the user's key was held by an expired render (or batch) and is now free."""
    if key is None:
        return False
    cur = await conn.execute(statement, [user_id, key])
    return cur.rowcount > 0


def same_request(stored_hash: str | None, request_hash: str) -> None:
    """ValidationFailed when an idempotency key comes back with another request."""
    if (stored_hash or "") != request_hash:
        raise ValidationFailed.field("idempotency_key", "was already used with a different request")


def _trace_id(traceparent: str) -> str:
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


async def _one(conn: AsyncConnection[Any], query: str, params: Any) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(query, params)
    return await cur.fetchone()
