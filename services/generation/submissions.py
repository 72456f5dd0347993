"""Queuing renders: one render at its chain's next position with its job and `queued` event,
inserted idempotently under the per-user quota, a chain render made to wait for the render before
it; and a batch of them, all or none.

The statements are `submit_render` and its neighbours in `queries.sql`; the caller (the store)
translates driver errors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from services.generation.catalog import Placement
from services.generation.domain import NewEvent, Render, RenderSpec, Submission
from services.generation.queries import QUERIES
from services.generation.records import fetch_one, render_from_row
from shared.errors import Conflict, QuotaExceeded, ValidationFailed

_WAITING = "waiting for the previous render of the chain"


@dataclass(frozen=True)
class BatchInserted:
    """A batch queued (or found, when a repeat of its submit): its id, whether it was there
    already, and renders outside it that its renders wait for."""

    id: str
    replayed: bool
    waits_on: set[str]


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
        "deadline_at": spec.deadline,
        "timeout_s": spec.timeout_s or None,
        "retry_of": spec.retry_of or None,
        "retention_s": spec.retention_s or None,
        "webhook": Jsonb(spec.webhook.to_json()) if spec.webhook else None,
        "event": Jsonb(NewEvent("queued").payload()),
        "waiting_event": Jsonb(NewEvent("queued", message=_WAITING).payload()),
        "max_active": max_active,
    }
    row, active = await _insert(conn, params)
    if row is None and await _released(conn, "release_render_key", submission.user_id, key):
        row, active = await _insert(conn, params)
    if row is not None:
        return render_from_row(row)
    existing = await fetch_one(conn, QUERIES["any_render"], [spec.render_id])
    if existing is not None:
        if existing["user_id"] != submission.user_id:
            raise Conflict(f"render id {spec.render_id} is taken")
        return replace(render_from_row(existing), replayed=True)
    if key is not None:
        existing = await fetch_one(conn, QUERIES["render_by_key"], [submission.user_id, key])
        if existing is not None:
            _same_request(existing["request_hash"], submission.request_hash)
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
    await conn.execute(QUERIES["lock_idempotency_key"], [f"{user_id}\n{key}"])


async def insert_batch(
    conn: AsyncConnection[Any],
    specs: list[RenderSpec],
    placements: list[Placement],
    submission: Submission,
    started: float,
    max_active: int,
) -> BatchInserted:
    """Queues every render of a batch in the caller's transaction, or finds the batch a repeat of
    this submit made. QuotaExceeded when one is refused: the caller's rollback drops them all."""
    key = submission.idempotency_key or None
    batch_params = [submission.user_id, key, submission.request_hash or None]
    row = await fetch_one(conn, QUERIES["insert_batch"], batch_params)
    if row is None and await _released(conn, "release_batch_key", submission.user_id, key):
        row = await fetch_one(conn, QUERIES["insert_batch"], batch_params)
    if row is None:
        existing = await fetch_one(conn, QUERIES["batch_by_key"], [submission.user_id, key])
        if existing is None:
            raise Conflict("the batch is being created by a concurrent request")
        _same_request(existing["request_hash"], submission.request_hash)
        return BatchInserted(str(existing["id"]), replayed=True, waits_on=set())
    batch_id = str(row["id"])
    no_key = Submission(submission.user_id, traceparent=submission.traceparent, timings=submission.timings)
    renders = [
        await insert_render(conn, spec, placement, no_key, started, batch_id, max_active)
        for spec, placement in zip(specs, placements, strict=True)
    ]
    # Dependents of renders outside the batch, which may have ended meanwhile.
    outside = {r.waiting_on for r in renders} - {r.id for r in renders} - {""}
    return BatchInserted(batch_id, replayed=False, waits_on=outside)


async def _insert(conn: AsyncConnection[Any], params: dict[str, Any]) -> tuple[dict[str, Any] | None, int]:
    """Runs _SUBMIT: the render inserted (None when refused or a duplicate) and how many renders
    the user had queued or running before it."""
    row = await fetch_one(conn, QUERIES["submit_render"], params)
    assert row is not None  # the tenant row always comes back
    return (row if row["id"] is not None else None), int(row["_active"])


async def _retry_after(conn: AsyncConnection[Any], user_id: str) -> float:
    """Roughly when the first of the user's running renders should end: the mean run time of
    recent renders over how many of the user's run at once (at least 1 s)."""
    row = await fetch_one(conn, QUERIES["retry_after_figures"], [user_id])
    mean_s = float(row["mean_s"]) if row and row["mean_s"] is not None else 10.0
    running = int(row["running"]) if row and row["running"] else 1
    return max(1.0, round(mean_s / running, 1))


async def _released(conn: AsyncConnection[Any], release: str, user_id: str, key: str | None) -> bool:
    """Whether the user's key was held by an expired render (or batch) and is now free."""
    if key is None:
        return False
    cur = await conn.execute(QUERIES[release], [user_id, key])
    return cur.rowcount > 0


def _same_request(stored_hash: str | None, request_hash: str) -> None:
    """ValidationFailed when an idempotency key comes back with another request."""
    if (stored_hash or "") != request_hash:
        raise ValidationFailed.field("idempotency_key", "was already used with a different request")


def _trace_id(traceparent: str) -> str:
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""
