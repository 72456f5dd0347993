"""The one store of generation: the connection pool, schema `generation` and its migrations, every
statement the service and its workers run (by name, from `queries.sql`), and the one edge where
driver errors become domain errors.

The API side uses it through `protocols.ApiStore`, the worker side through `protocols.WorkerStore`.
Connections are in autocommit mode from the start: a single statement commits on its own (one
round trip instead of three), and operations of several statements open `conn.transaction()`.
Renders that end, by whichever path, are reported to `on_ended`: what to count is the caller's
business.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from services.generation import chains, housekeeping
from services.generation.catalog import Placement
from services.generation.domain import (
    Batch,
    Cancelled,
    Ended,
    Event,
    NewEvent,
    Output,
    Page,
    ReferenceOutcome,
    Render,
    RenderError,
    RenderFilter,
    RenderSpec,
    Submission,
)
from services.generation.eta import QueueSnapshot, Sample, queue_snapshot
from services.generation.jobs import CLAIM_JOBS, Claim, JobPolicy, Rescued, rescue_expired
from services.generation.pages import page_of, page_query, page_size
from services.generation.queries import QUERIES
from services.generation.records import (
    carried_events,
    event_from_row,
    fetch_all,
    fetch_one,
    record,
    render_from_row,
)
from services.generation.submissions import insert_batch, insert_render, lock_key
from services.generation.submit_groups import SubmitGroups
from shared.contract import STATUSES, TERMINAL
from shared.db import migrate, open_pool
from shared.errors import Conflict, FailedPrecondition, NotFound, Unavailable, ValidationFailed
from shared.statements import name_statements

log = logging.getLogger(__name__)

SCHEMA = "generation"
MIGRATIONS = Path(__file__).parent / "migrations"
_CANCELLED = RenderError("cancelled", message="cancelled at the user's request")
_NOT_RUN = frozenset({"cancelled", "expired"})
"""Ends a cancel asks for already: a repeat finds the render so and leaves it."""


@cache
def _cancel_jobs_statement() -> str:
    statement = QUERIES["cancel_jobs"].format(carried=carried_events("r.id"))
    name_statements([("cancel_jobs", statement)])
    return statement


_EXPIRED = RenderError("expired", "deadline", "not started by its deadline", retryable=True)
_PAST_DEADLINE_BETWEEN_ATTEMPTS = RenderError(
    "cancelled", "deadline", "its deadline passed while it waited to run again"
)


def database_url(url: str) -> str:
    """`url` (a URL or key=value conninfo) with the search path set to the service's schema."""
    options = conninfo_to_dict(url).get("options") or ""
    return make_conninfo(url, options=f"{options} -c search_path={SCHEMA}".strip())


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
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


@asynccontextmanager
async def connection(pool: AsyncConnectionPool) -> AsyncIterator[AsyncConnection[Any]]:
    """A connection of `pool` (autocommit) whose driver errors arrive as domain errors."""
    async with translated(), pool.connection() as conn:
        yield conn


class Store:
    """Renders, events, batches and the job queue in schema `generation`."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        max_active: int = 0,
        policy: JobPolicy | None = None,
        on_ended: Callable[[Ended], None] = lambda ended: None,
    ) -> None:
        self.pool = pool
        """Autocommit connections: each statement commits on its own, operations of several open a
        transaction."""
        self._max_active = max_active
        """The most renders a user may have queued or running at once (0: no limit)."""
        self._policy = policy or JobPolicy()
        self._on_ended = on_ended
        self._next_recount = time.monotonic() + self._policy.recount_interval_s
        self._submits: SubmitGroups[Render] = SubmitGroups(self._conn)

    @classmethod
    @asynccontextmanager
    async def opened(
        cls,
        url: str,
        *,
        name: str,
        max_size: int,
        min_size: int = 2,
        max_active: int = 0,
        policy: JobPolicy | None = None,
        on_ended: Callable[[Ended], None] = lambda ended: None,
    ) -> AsyncIterator[Store]:
        """The store on the database at `url`, migrated, with its pool open until the block ends."""
        await migrate(url, SCHEMA, MIGRATIONS)
        pool = await open_pool(
            database_url(url), name=name, min_size=min_size, max_size=max_size, autocommit=True
        )
        store = cls(pool, max_active=max_active, policy=policy, on_ended=on_ended)
        try:
            yield store
        finally:
            await store._submits.close()
            await pool.close()

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[AsyncConnection[Any]]:
        async with translated(), self.pool.connection() as conn:
            yield conn

    def _report(self, ended: Iterable[Ended | None]) -> None:
        for end in ended:
            if end is not None:
                self._on_ended(end)

    async def _settle(self, conn: AsyncConnection[Any], ended: Iterable[str]) -> chains.Settled:
        """Releases or fails the chain dependents of the renders `ended` (see `chains.settle`)."""
        settled = await chains.settle(conn, ended)
        self._report(settled.failed)
        return settled

    # The API side ------------------------------------------------------------------------------

    async def submit(
        self, spec: RenderSpec, placement: Placement, submission: Submission, started: float
    ) -> Render:
        """Queues a validated render, or returns the one a repeat of this submit already queued.
        Unkeyed submits of a user that arrive together commit together (see `submit_groups`)."""

        def insert(conn: AsyncConnection[Any]) -> Coroutine[Any, Any, Render]:
            return insert_render(conn, spec, placement, submission, started, None, self._max_active)

        key = submission.idempotency_key
        if key:
            async with self._conn() as conn, conn.transaction():
                await lock_key(conn, submission.user_id, key)
                render = await insert(conn)
        else:
            render = await self._submits.run(submission.user_id, insert)
        if render.waiting_on:
            async with self._conn() as conn:
                settled = await self._settle(conn, [render.waiting_on])
            if settled.changed:
                return await self.get(submission.user_id, render.id)
        return render

    async def submit_batch(
        self, specs: list[RenderSpec], placements: list[Placement], submission: Submission, started: float
    ) -> Batch:
        """Queues every render of a batch in one transaction (or returns the batch a repeat made):
        all of them, or none when one is refused (QuotaExceeded)."""
        async with self._conn() as conn:
            async with conn.transaction():
                batch = await insert_batch(conn, specs, placements, submission, started, self._max_active)
            if batch.waits_on:
                await self._settle(conn, batch.waits_on)
        return replace(await self.get_batch(submission.user_id, batch.id), replayed=batch.replayed)

    async def chain_lengths(self, user_id: str, chain_ids: list[str]) -> dict[str, int]:
        """How many positions each of the user's chains has allocated (those with none left out)."""
        async with self._conn() as conn:
            cur = await conn.execute(QUERIES["chain_lengths"], [user_id, chain_ids])
            return {str(chain_id): int(last) for chain_id, last in await cur.fetchall()}

    async def get(self, user_id: str, render_id: str) -> Render:
        """The user's render; NotFound when it does not exist or is someone else's."""
        async with self._conn() as conn:
            row = await fetch_one(conn, QUERIES["user_render"], [render_id, user_id])
        if row is None:
            raise NotFound(f"render {render_id} not found")
        return render_from_row(row)

    async def queue_snapshot(self, user_id: str) -> QueueSnapshot:
        """The queue as the user's queued renders' estimates need it (see `eta`)."""
        params = {"user_id": user_id, "live_s": self._policy.lease_s}
        async with self._conn() as conn:
            rows = await fetch_all(conn, QUERIES["queue_snapshot"], params)
        return queue_snapshot(user_id, rows)

    async def recent_run_times(self) -> list[Sample]:
        """How long recent renders that succeeded ran, with their kind and parameters."""
        async with self._conn() as conn:
            rows = await fetch_all(conn, QUERIES["recent_run_times"])
        return [Sample(row["kind"], row["params"], row["seconds"]) for row in rows]

    async def queue_depth(self) -> dict[tuple[str, str], tuple[int, float]]:
        """Jobs by (kind, state): queued (retries in backoff included) and running, right now: how
        many, and the age in seconds of the oldest (since its render was submitted)."""
        async with self._conn() as conn:
            rows = await fetch_all(conn, QUERIES["queue_depth"])
        return {(row["kind"], row["state"]): (int(row["jobs"]), float(row["oldest_s"])) for row in rows}

    async def list_page(self, user_id: str, where: RenderFilter, size: int, page_token: str) -> Page:
        """The user's renders matching `where`, newest first (or by chain position), one page."""
        size = page_size(size)
        query, params = page_query(user_id, where, size, page_token)
        async with self._conn() as conn:
            rows = await fetch_all(conn, query, params)
        return page_of([render_from_row(row) for row in rows], size, where.by_position)

    async def cancel(self, user_id: str, render_id: str) -> Cancelled:
        """Cancels a queued (or waiting) render at once, or flags a running one for its worker; a
        render already cancelled or expired is left as it is. FailedPrecondition when it succeeded
        or failed; NotFound when it is not the user's."""
        async with self._conn() as conn:
            outcome = await self._cancel(conn, user_id, render_id)
            if outcome == "cancelled":
                await self._settle(conn, [render_id])  # its chain dependents go on without it
            return outcome

    async def _cancel(self, conn: AsyncConnection[Any], user_id: str, render_id: str) -> Cancelled:
        async with conn.transaction():
            job = await fetch_one(conn, QUERIES["lock_user_job"], [render_id, user_id])
            if job is None:
                render = await fetch_one(conn, QUERIES["user_render_status"], [render_id, user_id])
                if render is None:
                    raise NotFound(f"render {render_id} not found")
                if render["status"] in _NOT_RUN:
                    return "already"
                raise FailedPrecondition(f"render {render_id} has already ended ({render['status']})")
            if job["state"] != "running":
                await conn.execute(QUERIES["delete_job"], [render_id])
                events = [NewEvent("cancelled", error=_CANCELLED)]
                done = await record(conn, render_id, events, status="cancelled", error=_CANCELLED)
                self._report([done.ended if done else None])
                return "cancelled"
            await conn.execute(QUERIES["request_cancel"], [render_id])
            await conn.execute(QUERIES["notify_cancel"], [render_id])
            return "requested"

    async def cancel_batch(self, user_id: str, batch_id: str) -> bool:
        """Cancels every queued render of the user's batch in one statement and flags its running
        ones for their workers; False when none of its renders was left to cancel. NotFound when
        the batch is not the user's."""
        async with self._conn() as conn:
            async with conn.transaction():
                if await fetch_one(conn, QUERIES["user_batch"], [batch_id, user_id]) is None:
                    raise NotFound(f"batch {batch_id} not found")
                jobs = await fetch_all(conn, QUERIES["lock_batch_jobs"], [user_id, batch_id])
                if not jobs:
                    return False
                params = {
                    "queued": [j["render_id"] for j in jobs if j["state"] != "running"],
                    "running": [j["render_id"] for j in jobs if j["state"] == "running"],
                    "error": Jsonb(_CANCELLED.to_json()),
                    "event": Jsonb(NewEvent("cancelled", error=_CANCELLED).payload()),
                }
                ended = await fetch_all(conn, _cancel_jobs_statement(), params)
            self._report(Ended(row["id"], row["kind"], "cancelled", _CANCELLED) for row in ended)
            waited_on = [row["id"] for row in ended if row["dependents_waiting"]]
            if waited_on:
                await self._settle(conn, waited_on)
        return True

    async def delete_output(
        self, user_id: str, render_id: str, delete_file: Callable[[str], Awaitable[None]]
    ) -> None:
        """Deletes the output of the user's ended render at once (`delete_file`, before the commit
        that records it); FailedPrecondition while it has not ended, NotFound when it is not the
        user's. Nothing to delete is no error."""
        async with self._conn() as conn, conn.transaction():
            render = await fetch_one(conn, QUERIES["lock_user_render"], [render_id, user_id])
            if render is None:
                raise NotFound(f"render {render_id} not found")
            if render["status"] not in TERMINAL:
                raise FailedPrecondition(
                    f"render {render_id} has not ended ({render['status']}): cancel it first"
                )
            if render["has_output"]:
                await delete_file(render_id)
                await conn.execute(QUERIES["outputs_deleted"], [[render_id]])

    async def sweep_retention(
        self, delete_file: Callable[[str], Awaitable[None]], record_retention_s: float
    ) -> tuple[int, int]:
        """Deletes the outputs past their retention and (with `record_retention_s` > 0) the renders
        that ended longer ago than that, their files before each commit; a batch of each. Returns
        how many outputs and records went."""
        async with self._conn() as conn:
            async with conn.transaction():
                due = [row["id"] for row in await fetch_all(conn, QUERIES["due_outputs"])]
                for render_id in due:
                    await delete_file(render_id)
                if due:
                    await conn.execute(QUERIES["outputs_deleted"], [due])
            records = 0
            if record_retention_s > 0:
                async with conn.transaction():
                    gone = await fetch_all(conn, QUERIES["due_records"], [record_retention_s])
                    for row in gone:
                        if row["has_output"]:
                            await delete_file(row["id"])
                    records = len(gone)
        return len(due), records

    async def set_priority(self, user_id: str, render_id: str, priority: int) -> None:
        """Changes the priority of the user's queued render; FailedPrecondition once it has started,
        NotFound when it is not the user's."""
        params = {"id": render_id, "user_id": user_id, "priority": priority}
        async with self._conn() as conn:
            changed = await fetch_one(conn, QUERIES["set_priority"], params)
            if changed is None:
                render = await fetch_one(conn, QUERIES["user_render_status"], [render_id, user_id])
                if render is None:
                    raise NotFound(f"render {render_id} not found")
                raise FailedPrecondition(f"render {render_id} is no longer queued ({render['status']})")

    async def continues_from(self, user_id: str, chain_id: str, position: int) -> Render | None:
        """The user's nearest render before `position` in the chain that succeeded, if any: what
        a chain render at `position` continues from."""
        async with self._conn() as conn:
            before = await chains.continues_from(conn, user_id, chain_id, position)
        return None if before is None else await self.get(user_id, before.id)

    async def count_stalled(self, stall_after_s: float) -> int:
        """Running renders without progress for longer than `stall_after_s`."""
        async with self._conn() as conn:
            cur = await conn.execute(QUERIES["count_stalled"], [stall_after_s])
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
            params = {"ids": list(cursors), "after": list(cursors.values()), "limit": limit}
            rows = await fetch_all(conn, QUERIES["events_after_many"], params)
        return [event_from_row(row) for row in rows]

    async def get_batch(self, user_id: str, batch_id: str) -> Batch:
        """The user's batch with its renders (in submission order) and counts by status."""
        async with self._conn() as conn:
            row = await fetch_one(conn, QUERIES["user_batch"], [batch_id, user_id])
            if row is None:
                raise NotFound(f"batch {batch_id} not found")
            rows = await fetch_all(conn, QUERIES["batch_renders"], [row["id"]])
        renders = [render_from_row(r) for r in rows]
        counts: dict[str, int] = {status: 0 for status in STATUSES}
        for render in renders:
            counts[render.status] += 1
        return Batch(str(row["id"]), row["user_id"], row["created_at"], counts, renders)

    # The worker side ---------------------------------------------------------------------------

    async def claim(self, worker_id: str, limit: int) -> list[Claim]:
        """Takes up to `limit` runnable jobs, from the tenants in turn, each stamped with the backend
        the policy names for its kind, and starts their renders (see `claim_jobs`)."""
        async with self._conn() as conn:
            rows = await fetch_all(conn, CLAIM_JOBS, self._policy.claim_params(worker_id, limit))
        return sorted((Claim.from_row(row) for row in rows), key=lambda c: c.created_at)

    async def worker_seen(self, worker_id: str, slots: int) -> None:
        """Counts the worker's slots in the capacity the claim shares out, for a lease from now (with
        the limits per tenant of this store's policy)."""
        policy = self._policy
        async with self._conn() as conn:
            await conn.execute(
                QUERIES["worker_seen"], [worker_id, slots, policy.tenant_max_running, policy.reserved_slots]
            )

    async def worker_gone(self, worker_id: str) -> None:
        """The worker's slots no longer count (it is stopping)."""
        async with self._conn() as conn:
            await conn.execute(QUERIES["worker_gone"], [worker_id])

    async def heartbeat(self, claims: Sequence[Claim]) -> dict[str, bool]:
        """Renews the leases of `claims`; returns, for each job still held, whether its cancel
        was requested. A job missing from the answer has been taken away."""
        if not claims:
            return {}
        params = [self._policy.lease_s, [c.render_id for c in claims], [c.lease_token for c in claims]]
        async with self._conn() as conn:
            cur = await conn.execute(QUERIES["heartbeat"], params)
            return {row[0]: row[1] for row in await cur.fetchall()}

    async def progress(self, claim: Claim, events: Sequence[NewEvent], **changes: Any) -> bool:
        """Records events (and render changes) of a job still held; False when it is not."""
        async with self._conn() as conn:
            done = await record(
                conn, claim.render_id, events, fence="fence_held", fence_params=claim.fence(), **changes
            )
        return done is not None

    async def finish(
        self,
        claim: Claim,
        status: str,
        *,
        output: Output | None = None,
        error: RenderError | None = None,
        timings: dict[str, float] | None = None,
        message: str = "",
        before: Sequence[NewEvent] = (),
        reference: ReferenceOutcome | None = None,
        provider_request_id: str = "",
    ) -> bool:
        """Ends a held job (succeeded, failed or cancelled) with its terminal event, after the
        events `before` (held back by the worker), then releases or fails the chain renders waiting
        for it, if any; False when the job was no longer this worker's, and then nothing changed."""
        progress = 1.0 if status == "succeeded" else None
        event = NewEvent(status, progress=progress, message=message, error=error)
        async with self._conn() as conn:
            done = await record(
                conn,
                claim.render_id,
                [*before, event],
                fence="fence_end",
                fence_params=claim.fence(),
                status=status,
                progress=progress,
                output=output,
                error=error,
                timings=timings,
                reference=reference,
                provider_request_id=provider_request_id,
            )
            if done is None:
                return False
            self._report([done.ended])
            if not done.chained:
                return True
            # Not in the same transaction: should this fail or the worker die right here, the
            # rescuer's sweep settles the dependents instead.
            try:
                await self._settle(conn, [claim.render_id])
            except psycopg.Error:
                log.warning("cannot settle chain dependents", extra={"render_id": claim.render_id})
        return True

    async def requeue(self, claim: Claim, delay_s: float, message: str, *, refund: bool = False) -> bool:
        """Puts a held job back in the queue, runnable after `delay_s` (a retry), or at once with
        its attempt refunded (`refund`: a hand-back by a stopping worker)."""
        async with self._conn() as conn:
            done = await record(
                conn,
                claim.render_id,
                [NewEvent("queued", message=message)],
                fence="fence_requeue",
                fence_params={**claim.fence(), "delay_s": delay_s, "refund": int(refund)},
                status="queued",
                progress=0.0,
            )
            if done is not None:
                await conn.execute(QUERIES["notify_jobs"], [claim.render_id])
        return done is not None

    async def rescue(self) -> Rescued:
        """One pass of housekeeping: requeues the jobs whose lease expired (their worker died or
        hung), failing those out of attempts and cancelling those whose cancel was requested;
        settles chain renders whose predecessor ended (or never came); prunes old events; now and
        then checks the tenant counts."""
        async with self._conn() as conn:
            async with conn.transaction():
                expired = await rescue_expired(conn, self._policy.max_attempts)
            self._report(expired.ended)
            ended = [end.render_id for end in expired.ended]
            chained = await self._settle(conn, ended) if ended else chains.Settled()
            swept = await chains.settle(conn, None, self._policy.chain_wait_s)
            self._report(swept.failed)
            pruned = await housekeeping.prune_events(conn, self._policy.event_retention_s)
        recounted = 0
        if time.monotonic() >= self._next_recount:
            self._next_recount = time.monotonic() + self._policy.recount_interval_s
            recounted = await self.recount()
        return Rescued(
            requeued=expired.requeued,
            failed=expired.count("failed"),
            cancelled=expired.count("cancelled"),
            released=swept.released + chained.released,
            dependency_failed=len(swept.failed) + len(chained.failed),
            pruned=pruned,
            recounted=recounted,
        )

    async def expire_due(self) -> int:
        """Ends the renders whose deadline passed before they (re)started: `expired` when they never
        ran, cancelled with reason `deadline` when an earlier attempt did; their chain dependents go
        on without them. Returns how many ended."""
        async with self._conn() as conn:
            async with conn.transaction():
                ended = [
                    await self._end_at_deadline(conn, job)
                    for job in await fetch_all(conn, QUERIES["due_deadlines"])
                ]
            self._report(ended)
            done = [end.render_id for end in ended if end is not None]
            if done:
                await self._settle(conn, done)
        return len(done)

    async def _end_at_deadline(self, conn: AsyncConnection[Any], job: dict[str, Any]) -> Ended | None:
        render_id = job["render_id"]
        await conn.execute(QUERIES["delete_job"], [render_id])
        status, error = (
            ("cancelled", _PAST_DEADLINE_BETWEEN_ATTEMPTS) if job["attempts"] else ("expired", _EXPIRED)
        )
        done = await record(conn, render_id, [NewEvent(status, error=error)], status=status, error=error)
        return done.ended if done else None

    async def recount(self) -> int:
        """Corrects tenant counts that differ from the jobs and forgets idle tenants; returns how
        many counts it corrected (see `housekeeping.recount_tenants`)."""
        async with self._conn() as conn:
            return await housekeeping.recount_tenants(conn)

    async def counts(self) -> dict[str, int]:
        """Jobs by state (for scaling decisions and reports)."""
        async with self._conn() as conn:
            cur = await conn.execute(QUERIES["job_counts"])
            return {row[0]: int(row[1]) for row in await cur.fetchall()}

    async def reserve_turn(self, backend: str, interval_s: float) -> float:
        """Reserves the next call to `backend`, calls being `interval_s` apart across all workers;
        returns the seconds to wait for it."""
        async with self._conn() as conn:
            cur = await conn.execute(
                QUERIES["reserve_backend_turn"], {"backend": backend, "interval_s": interval_s}
            )
            row = await cur.fetchone()
        return float(row[0]) if row else 0.0
