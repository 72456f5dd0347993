"""Rows of schema `generation` to domain values, and the one statement that records a render's
changes and appends its events.

Every state change of a render and the events reporting it are written by `record`, in one
statement: a *fence* (a statement yielding the render id only if the caller still may write) gates
the render update, the event inserts and the NOTIFY, so a worker that lost its lease changes
nothing. The statements are in `queries.sql`.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, Literal

import orjson
from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row, tuple_row
from psycopg.types.json import Jsonb

from services.generation.domain import (
    Ended,
    Event,
    NewEvent,
    Output,
    Params,
    Reference,
    ReferenceOutcome,
    Render,
    RenderError,
    Rule,
    Webhook,
)
from services.generation.queries import QUERIES
from shared.contract import TERMINAL
from shared.statements import name_statements

Fence = Literal[
    "fence_none",
    "fence_held",
    "fence_end",
    "fence_requeue",
    "fence_release_waiting",
    "fence_abandon_waiting",
]
"""The name of a fence of `queries.sql`: each selects `render_id` when the write may go ahead."""


@dataclass(frozen=True)
class Recorded:
    """What `record` wrote: the render's new last seq, the render's end if it ended it, and whether
    a chain render waits for this one (as of the write: see migration 0006)."""

    seq: int
    ended: Ended | None = None
    chained: bool = False


def carried_events(render: str) -> str:
    """The expression of a NOTIFY's carried events for the render whose id is `render` (see
    `queries.sql`, carried_events; read by `notified_events`)."""
    return QUERIES["carried_events"].format(render=render)


@cache
def _record_statement(fence: Fence) -> str:
    statement = QUERIES["record_change"].format(fence=QUERIES[fence], carried=carried_events("r.id"))
    name_statements([(f"record_change.{fence}", statement)])
    return statement


async def record(
    conn: AsyncConnection[Any],
    render_id: str,
    events: Sequence[NewEvent],
    *,
    fence: Fence = "fence_none",
    fence_params: dict[str, Any] | None = None,
    status: str | None = None,
    progress: float | None = None,
    timings: dict[str, float] | None = None,
    output: Output | None = None,
    error: RenderError | None = None,
    reference: ReferenceOutcome | None = None,
    provider_request_id: str = "",
    attempts: int | None = None,
) -> Recorded | None:
    """Applies a render's state change and appends `events` if the fence lets it; None when the
    fence said no (the job was taken away or has ended). `reference`: what became of the render's
    reference, kept with it; `provider_request_id`: the provider's id of the attempt's request."""
    params: dict[str, Any] = {
        "id": render_id,
        "types": [event.type for event in events],
        "payloads": [Jsonb(event.payload()) for event in events],
        "status": status,
        "progress": progress,
        "timings": Jsonb(timings or {}),
        "output": Jsonb(output_json(output)) if output else None,
        "error": Jsonb(error.to_json()) if error else None,
        "reference": Jsonb({"outcome": reference.to_json()}) if reference else None,
        "provider_request_id": provider_request_id or None,
        "attempts": attempts,
        **(fence_params or {}),
    }
    cur = conn.cursor(row_factory=tuple_row)
    await cur.execute(_record_statement(fence), params)
    row = await cur.fetchone()
    if row is None:
        return None
    ended = Ended(render_id, row[1], status, error) if status is not None and status in TERMINAL else None
    return Recorded(int(row[0]), ended, bool(row[3]))


async def fetch_one(
    conn: AsyncConnection[Any], query: str | sql.Composed, params: Any = None
) -> dict[str, Any] | None:
    """The first row of a statement, as a dict."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(query, params)
    return await cur.fetchone()


async def fetch_all(
    conn: AsyncConnection[Any], query: str | sql.Composed, params: Any = None
) -> list[dict[str, Any]]:
    """Every row of a statement, as dicts."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(query, params)
    return await cur.fetchall()


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
    output = None if row.get("output_deleted_at") else row["output"]
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
        reference=Reference.from_json(reference) if reference else None,
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
        deadline=row["deadline_at"],
        timeout_s=row["timeout_s"] or 0.0,
        retry_of=row["retry_of"] or "",
        retries=tuple(row.get("retries") or ()),
        retention_s=row.get("retention_s"),
        backend=row.get("backend") or "",
        provider_request_id=row.get("provider_request_id") or "",
        webhook=Webhook.from_json(row["webhook"]) if row.get("webhook") else None,
        output_expires_at=row.get("output_expires_at"),
        output_deleted_at=row.get("output_deleted_at"),
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


def notified_events(render_id: str, carried: str) -> list[Event]:
    """The events a notification carried (`carried_events`: a JSON array of [seq, type, at,
    payload], in base64), as read from the log; ValueError when they cannot be read."""
    return [
        event_from_row(
            {
                "render_id": render_id,
                "seq": seq,
                "type": kind,
                "at": datetime.fromisoformat(at),
                "payload": payload,
            }
        )
        for seq, kind, at, payload in orjson.loads(base64.b64decode(carried, validate=True))
    ]
