"""The job queue of the worker side: what a claim holds, how the queue is run (`JobPolicy`), and
the rescue of jobs whose lease expired.

Every write after the claim is fenced by the job's lease token (see `records`): a write that
touches no row means the job was taken away, and the caller drops its work.

Fairness: tenants (users) with runnable jobs are served in turn, least recently served first, and
none has more than `tenant_max_running` jobs running, nor all but `reserved_slots` of the live
workers' slots (so a tenant submitting while another's long renders fill the queue starts at once);
within a tenant, higher priority then older first. The per-tenant state (jobs queued and waiting,
claims made, when last served) is one small `tenants` row each, kept by a trigger on `jobs`
(migrations 0002 and 0006), so the claim never scans the queue; running jobs are counted from their
index, and the end of a job does not touch its tenant's row (migration 0006). The live workers'
slots are the `workers` rows (migration 0005).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from services.generation.domain import Ended, NewEvent, Render, RenderError
from services.generation.queries import QUERIES
from services.generation.records import carried_events, fetch_all, record, render_from_row
from shared.statements import name_statements

CLAIM_JOBS = QUERIES["claim_jobs"].format(carried=carried_events("s.id"))
name_statements([("claim_jobs", CLAIM_JOBS)])


@dataclass(frozen=True)
class JobPolicy:
    """How the worker side runs the queue."""

    lease_s: float = 30.0
    max_attempts: int = 3
    tenant_max_running: int = 0
    """0: no cap."""
    reserved_slots: int = 0
    """Slots of the live workers that no one tenant may hold (see `claim_jobs`)."""
    chain_wait_s: float = 60.0
    event_retention_s: float = 7 * 86400.0
    recount_interval_s: float = 60.0
    backends: Mapping[str, str] = field(
        default_factory=lambda: {"image": "procedural", "video": "procedural"}
    )
    """The backend that renders each kind, stamped on the jobs claimed."""
    projects: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """{project id: {kind: backend}}: the projects whose renders another backend makes."""

    def claim_params(self, worker_id: str, limit: int) -> dict[str, Any]:
        """The parameters of `claim_jobs`."""
        return {
            "worker": worker_id,
            "lease_s": self.lease_s,
            "limit": limit,
            "max_attempts": self.max_attempts,
            # The claim compares with an int4.
            "cap": self.tenant_max_running or 2**31 - 1,
            "reserved": self.reserved_slots,
            "live_s": self.lease_s,
            "backends": Jsonb(dict(self.backends)),
            "projects": Jsonb({project: dict(kinds) for project, kinds in self.projects.items()}),
            "by_project": bool(self.projects),
        }


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
    """The backend this worker renders it with (the job row says the same)."""
    created_at: datetime
    claimed_at: datetime
    cancel_requested: bool
    """Set when a cancel raced with a retry or hand-back: the claimer cancels it at once."""
    render: Render | None = field(default=None, compare=False, repr=False)
    """The render as the claim started it (`running`, its first events written); None when the
    claim is only to cancel it."""

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Claim:
        """A claim from a row of `claim_jobs`: the job's columns and the started render's."""
        job = {name: row[name] for name in _CLAIM_COLUMNS}
        return cls(**job, render=render_from_row(row) if row["id"] is not None else None)

    def fence(self) -> dict[str, Any]:
        return {"token": self.lease_token}


_CLAIM_COLUMNS = [f.name for f in fields(Claim) if f.name != "render"]


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
class Expired:
    """What the rescue of expired leases did: jobs requeued, and renders it ended."""

    requeued: int
    ended: list[Ended]

    def count(self, status: str) -> int:
        return sum(end.status == status for end in self.ended)


async def rescue_expired(conn: AsyncConnection[Any], max_attempts: int) -> Expired:
    """Requeues the jobs whose lease expired, failing those out of attempts and cancelling those
    whose cancel was requested; in the caller's transaction."""
    requeued = 0
    ended: list[Ended] = []
    for job in await fetch_all(conn, QUERIES["expired_leases"], [max_attempts]):
        render_id = job["render_id"]
        lost = f"worker {job['worker_id']} stopped renewing its lease (attempt {job['attempts']})"
        if job["cancel_requested"] or job["attempts"] >= job["max_attempts"]:
            await conn.execute(QUERIES["delete_job"], [render_id])
            if job["cancel_requested"]:
                error = RenderError("cancelled", message="cancelled at the user's request")
                status = "cancelled"
            else:
                error = RenderError(
                    "generation_failed", "lease_expired", f"{lost}; no attempts left", retryable=True
                )
                status = "failed"
            done = await record(conn, render_id, [NewEvent(status, error=error)], status=status, error=error)
            if done is not None and done.ended is not None:
                ended.append(done.ended)
        else:
            await conn.execute(QUERIES["requeue_expired"], [render_id])
            await record(conn, render_id, [NewEvent("queued", message=f"requeued: {lost}")], status="queued")
            requeued += 1
    if requeued:
        await conn.execute(QUERIES["notify_jobs"], ["rescued"])
    return Expired(requeued, ended)
