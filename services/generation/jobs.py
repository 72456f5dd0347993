"""The job queue of the worker side: claim, heartbeat, fenced writes, retry, hand-back and rescue.

Every write after the claim is fenced by the job's lease token (see `records`): a write that
touches no row means the job was taken away, and the caller drops its work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from services.generation.domain import NewEvent, Output, RenderError
from services.generation.records import FENCE_END, FENCE_HELD, FENCE_REQUEUE, record
from shared.errors import Unavailable

# The one claim statement (a later round makes it fair across tenants: change it here only).
# SKIP LOCKED lets many workers claim at once without waiting on each other's rows.
_CLAIM = """
UPDATE jobs SET state = 'running', attempts = attempts + 1, worker_id = %(worker)s,
    lease_token = gen_random_uuid(), lease_expires_at = now() + make_interval(secs => %(lease_s)s),
    claimed_at = clock_timestamp()
WHERE render_id IN (
    SELECT render_id FROM jobs
    WHERE state = 'queued' AND run_after <= now()
    ORDER BY priority DESC, created_at, render_id
    FOR UPDATE SKIP LOCKED
    LIMIT %(limit)s
)
RETURNING render_id, lease_token::text, worker_id, attempts,
    coalesce(max_attempts, %(max_attempts)s) AS max_attempts, tenant, kind, backend, created_at, claimed_at,
    cancel_requested
"""

_HEARTBEAT = """
UPDATE jobs j SET lease_expires_at = now() + make_interval(secs => %s)
FROM unnest(%s::text[], %s::uuid[]) AS h(render_id, token)
WHERE j.render_id = h.render_id AND j.lease_token = h.token AND j.state = 'running'
RETURNING j.render_id, j.cancel_requested
"""

_EXPIRED = """
SELECT render_id, attempts, coalesce(max_attempts, %s) AS max_attempts, cancel_requested, worker_id
FROM jobs WHERE state = 'running' AND lease_expires_at < now()
ORDER BY lease_expires_at LIMIT 100
FOR UPDATE SKIP LOCKED
"""


@dataclass(frozen=True)
class Claim:
    """A job this worker holds until its lease expires: the token fences every write."""

    render_id: str
    lease_token: str
    worker_id: str
    attempts: int
    max_attempts: int
    tenant: str
    kind: str
    backend: str
    created_at: datetime
    claimed_at: datetime
    cancel_requested: bool
    """Set when a cancel raced with a retry or hand-back: the claimer cancels it at once."""

    def fence(self) -> dict[str, Any]:
        return {"token": self.lease_token}


@dataclass(frozen=True)
class Rescued:
    """What one pass of the rescuer did with expired leases."""

    requeued: int = 0
    failed: int = 0
    cancelled: int = 0


@asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    try:
        yield
    except psycopg.OperationalError as exc:
        raise Unavailable("the database is unavailable") from exc


class JobQueue:
    """The claim table and the fenced writes of the workers."""

    def __init__(self, pool: AsyncConnectionPool, *, lease_s: float, max_attempts: int) -> None:
        self._pool = pool
        self._lease_s = lease_s
        self._max_attempts = max_attempts

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[AsyncConnection[Any]]:
        async with _translated(), self._pool.connection() as conn:
            # Single statements commit on their own (one round trip instead of three); the
            # operations of several statements open `conn.transaction()` themselves.
            await conn.set_autocommit(True)
            yield conn

    async def claim(self, worker_id: str, limit: int) -> list[Claim]:
        """Takes up to `limit` runnable jobs, highest priority and oldest first."""
        async with self._conn() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                _CLAIM,
                {
                    "worker": worker_id,
                    "lease_s": self._lease_s,
                    "limit": limit,
                    "max_attempts": self._max_attempts,
                },
            )
            rows = await cur.fetchall()
        return sorted((Claim(**row) for row in rows), key=lambda c: c.created_at)

    async def heartbeat(self, claims: Sequence[Claim]) -> dict[str, bool]:
        """Renews the leases of `claims`; returns, for each job still held, whether its cancel
        was requested. A job missing from the answer has been taken away."""
        if not claims:
            return {}
        async with self._conn() as conn:
            cur = await conn.execute(
                _HEARTBEAT,
                [self._lease_s, [c.render_id for c in claims], [c.lease_token for c in claims]],
            )
            return {row[0]: row[1] for row in await cur.fetchall()}

    async def progress(self, claim: Claim, events: Sequence[NewEvent], **changes: Any) -> bool:
        """Records events (and render changes) of a job still held; False when it is not."""
        async with self._conn() as conn:
            seq = await record(
                conn, claim.render_id, events, fence=FENCE_HELD, fence_params=claim.fence(), **changes
            )
        return seq is not None

    async def finish(
        self,
        claim: Claim,
        status: str,
        *,
        output: Output | None = None,
        error: RenderError | None = None,
        timings: dict[str, float] | None = None,
        message: str = "",
    ) -> bool:
        """Ends a held job (succeeded, failed or cancelled) with its terminal event; False when the
        job was no longer this worker's, and then nothing changed."""
        event = NewEvent(
            status, progress=1.0 if status == "succeeded" else None, message=message, error=error
        )
        async with self._conn() as conn:
            seq = await record(
                conn,
                claim.render_id,
                [event],
                fence=FENCE_END,
                fence_params=claim.fence(),
                status=status,
                progress=1.0 if status == "succeeded" else None,
                output=output,
                error=error,
                timings=timings,
            )
        return seq is not None

    async def requeue(self, claim: Claim, delay_s: float, message: str, *, refund: bool = False) -> bool:
        """Puts a held job back in the queue, runnable after `delay_s` (a retry), or at once with
        its attempt refunded (`refund`: a hand-back by a stopping worker)."""
        async with self._conn() as conn:
            seq = await record(
                conn,
                claim.render_id,
                [NewEvent("queued", message=message)],
                fence=FENCE_REQUEUE,
                fence_params={**claim.fence(), "delay_s": delay_s, "refund": int(refund)},
                status="queued",
                progress=0.0,
            )
            if seq is not None:
                await conn.execute("SELECT pg_notify('generation_jobs', %s)", [claim.render_id])
        return seq is not None

    async def rescue(self) -> Rescued:
        """Requeues the jobs whose lease expired (their worker died or hung); fails those out of
        attempts and cancels those whose cancel was requested."""
        requeued = failed = cancelled = 0
        async with self._conn() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(_EXPIRED, [self._max_attempts])
            for job in await cur.fetchall():
                render_id = job["render_id"]
                lost = f"worker {job['worker_id']} stopped renewing its lease (attempt {job['attempts']})"
                if job["cancel_requested"] or job["attempts"] >= job["max_attempts"]:
                    await conn.execute("DELETE FROM jobs WHERE render_id = %s", [render_id])
                    if job["cancel_requested"]:
                        error = RenderError("cancelled", message="cancelled at the user's request")
                        status = "cancelled"
                        cancelled += 1
                    else:
                        error = RenderError(
                            "generation_failed", "lease_expired", f"{lost}; no attempts left", retryable=True
                        )
                        status = "failed"
                        failed += 1
                    await record(conn, render_id, [NewEvent(status, error=error)], status=status, error=error)
                else:
                    await conn.execute(
                        "UPDATE jobs SET state = 'queued', lease_token = NULL, lease_expires_at = NULL,"
                        " worker_id = NULL, run_after = now() WHERE render_id = %s",
                        [render_id],
                    )
                    await record(
                        conn, render_id, [NewEvent("queued", message=f"requeued: {lost}")], status="queued"
                    )
                    requeued += 1
            if requeued:
                await conn.execute("SELECT pg_notify('generation_jobs', 'rescued')")
        return Rescued(requeued, failed, cancelled)

    async def counts(self) -> dict[str, int]:
        """Jobs by state (for scaling decisions and reports)."""
        async with self._conn() as conn:
            cur = await conn.execute("SELECT state, count(*) FROM jobs GROUP BY state")
            return {row[0]: int(row[1]) for row in await cur.fetchall()}
