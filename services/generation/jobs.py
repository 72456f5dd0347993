"""The job queue of the worker side: fair claims, heartbeat, fenced writes, retry, hand-back, and
the rescuer's housekeeping (expired leases, chain waits, old events, tenant counts).

Every write after the claim is fenced by the job's lease token (see `records`): a write that
touches no row means the job was taken away, and the caller drops its work.

Fairness: tenants (users) with runnable jobs are served in turn, least recently served first, and
none has more than `tenant_max_running` jobs running; within a tenant, higher priority then older
first. The per-tenant state (counts by state, when last served) is one small `tenants` row each,
kept by a trigger on `jobs` (migration 0002), so the claim never scans the queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from services.generation.chains import settle
from services.generation.domain import NewEvent, Output, RenderError
from services.generation.housekeeping import prune_events, recount_tenants
from services.generation.records import FENCE_END, FENCE_HELD, FENCE_REQUEUE, record
from shared.errors import Unavailable

log = logging.getLogger(__name__)

# The one claim statement: up to `limit` jobs, taken from the tenants in turn.
# 1. candidates: tenants with a runnable job and room under the cap, least recently served first
#    (an index scan of `tenants_ready`, one probe of `jobs_tenant_queue` each, stopping at `limit`).
# 2. locked: those tenant rows, locked in name order (claimers never deadlock on each other, and
#    everything else that locks several tenant rows locks them in that order too). The lock
#    serializes claims per tenant, and a row locked after a wait is re-read at its newest, so
#    `running` is exact and the cap holds however many workers claim at once.
# 3. picked: each tenant's next jobs, up to its room (index scan of `jobs_tenant_queue` in the
#    tenant's order; SKIP LOCKED passes over rows another claimer or a cancel holds).
# 4. chosen: round-robin — every tenant's 1st job, then every tenant's 2nd, ... up to `limit`.
# The trigger on `jobs` moves the tenant's counts and stamps `last_claimed_at` in this statement.
# Planned cost: O(limit) index probes, whatever the number of queued jobs (EXPLAIN ANALYZE with
# 20,000 queued, over 50 tenants or nearly all of one: 0.4-0.7 ms of server time).
_CLAIM = """
WITH candidates AS (
    SELECT t.tenant FROM tenants t
    WHERE t.queued > 0 AND t.running < %(cap)s
      AND EXISTS (SELECT FROM jobs q
                  WHERE q.tenant = t.tenant AND q.state = 'queued' AND q.run_after <= now())
    ORDER BY t.last_claimed_at NULLS FIRST, t.tenant
    LIMIT %(limit)s
),
locked AS (
    SELECT t.tenant, t.running, t.last_claimed_at FROM tenants t
    WHERE t.tenant IN (SELECT tenant FROM candidates) AND t.running < %(cap)s
    ORDER BY t.tenant
    FOR UPDATE
),
picked AS (
    SELECT j.render_id, l.tenant, l.last_claimed_at,
        row_number() OVER (PARTITION BY l.tenant ORDER BY j.priority DESC, j.created_at, j.render_id) AS turn
    FROM locked l CROSS JOIN LATERAL (
        SELECT render_id, priority, created_at FROM jobs
        WHERE jobs.tenant = l.tenant AND jobs.state = 'queued' AND jobs.run_after <= now()
        ORDER BY jobs.priority DESC, jobs.created_at, jobs.render_id
        LIMIT least(%(cap)s - l.running, %(limit)s)
        FOR UPDATE SKIP LOCKED
    ) j
),
chosen AS (
    SELECT render_id FROM picked ORDER BY turn, last_claimed_at NULLS FIRST, tenant LIMIT %(limit)s
)
UPDATE jobs SET state = 'running', attempts = attempts + 1, worker_id = %(worker)s,
    lease_token = gen_random_uuid(), lease_expires_at = now() + make_interval(secs => %(lease_s)s),
    claimed_at = clock_timestamp()
WHERE render_id IN (SELECT render_id FROM chosen)
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
ORDER BY tenant, lease_expires_at LIMIT 100
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
    """What one pass of the rescuer did: expired leases requeued, failed or cancelled; chain
    renders released or failed; renders whose events were pruned; tenant counts corrected."""

    requeued: int = 0
    failed: int = 0
    cancelled: int = 0
    released: int = 0
    dependency_failed: int = 0
    pruned: int = 0
    recounted: int = 0


@dataclass(frozen=True)
class _Expired:
    requeued: int
    failed: list[str]
    cancelled: list[str]


@asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    try:
        yield
    except psycopg.OperationalError as exc:
        raise Unavailable("the database is unavailable") from exc


class JobQueue:
    """The claim table and the fenced writes of the workers."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        lease_s: float,
        max_attempts: int,
        tenant_max_running: int = 0,
        chain_wait_s: float = 60.0,
        event_retention_s: float = 7 * 86400.0,
        recount_interval_s: float = 60.0,
    ) -> None:
        self._pool = pool
        self._lease_s = lease_s
        self._max_attempts = max_attempts
        # 0 means no cap; the claim compares with an int4.
        self._tenant_cap = tenant_max_running or 2**31 - 1
        self._chain_wait_s = chain_wait_s
        self._event_retention_s = event_retention_s
        self._recount_interval_s = recount_interval_s
        self._next_recount = time.monotonic() + recount_interval_s

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[AsyncConnection[Any]]:
        async with _translated(), self._pool.connection() as conn:
            # Single statements commit on their own (one round trip instead of three); the
            # operations of several statements open `conn.transaction()` themselves.
            await conn.set_autocommit(True)
            yield conn

    async def claim(self, worker_id: str, limit: int) -> list[Claim]:
        """Takes up to `limit` runnable jobs, from the tenants in turn (see `_CLAIM`)."""
        async with self._conn() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                _CLAIM,
                {
                    "worker": worker_id,
                    "lease_s": self._lease_s,
                    "limit": limit,
                    "max_attempts": self._max_attempts,
                    "cap": self._tenant_cap,
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
        """Ends a held job (succeeded, failed or cancelled) with its terminal event, then releases
        or fails the chain renders waiting for it; False when the job was no longer this worker's,
        and then nothing changed."""
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
            if seq is not None:
                # Not in the same transaction: should this fail or the worker die right here, the
                # rescuer's sweep settles the dependents instead.
                try:
                    await settle(conn, [claim.render_id])
                except psycopg.Error:
                    log.warning("cannot settle chain dependents", extra={"render_id": claim.render_id})
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
        """One pass of housekeeping: requeues the jobs whose lease expired (their worker died or
        hung), failing those out of attempts and cancelling those whose cancel was requested;
        settles chain renders whose predecessor ended (or never came); prunes old events; now and
        then checks the tenant counts."""
        expired = await self._rescue_expired()
        async with self._conn() as conn:
            ended = [*expired.failed, *expired.cancelled]
            chained = await settle(conn, ended) if ended else None
            swept = await settle(conn, None, self._chain_wait_s)
            pruned = await prune_events(conn, self._event_retention_s)
        recounted = 0
        if time.monotonic() >= self._next_recount:
            self._next_recount = time.monotonic() + self._recount_interval_s
            recounted = await self.recount()
        return Rescued(
            requeued=expired.requeued,
            failed=len(expired.failed),
            cancelled=len(expired.cancelled),
            released=swept.released + (chained.released if chained else 0),
            dependency_failed=swept.failed + (chained.failed if chained else 0),
            pruned=pruned,
            recounted=recounted,
        )

    async def recount(self) -> int:
        """Corrects tenant counts that differ from the jobs and forgets idle tenants; returns how
        many counts it corrected (see `housekeeping.recount_tenants`)."""
        async with self._conn() as conn:
            return await recount_tenants(conn)

    async def _rescue_expired(self) -> _Expired:
        requeued = 0
        failed: list[str] = []
        cancelled: list[str] = []
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
                        cancelled.append(render_id)
                    else:
                        error = RenderError(
                            "generation_failed", "lease_expired", f"{lost}; no attempts left", retryable=True
                        )
                        status = "failed"
                        failed.append(render_id)
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
        return _Expired(requeued, failed, cancelled)

    async def counts(self) -> dict[str, int]:
        """Jobs by state (for scaling decisions and reports)."""
        async with self._conn() as conn:
            cur = await conn.execute("SELECT state, count(*) FROM jobs GROUP BY state")
            return {row[0]: int(row[1]) for row in await cur.fetchall()}
