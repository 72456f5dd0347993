"""Chain dependencies: a render whose reference is "the previous render of its chain" waits until
that predecessor ends, then runs with its output, or fails with `dependency_failed`.

The predecessor is the user's render at the same chain's position - 1. A position can be allocated
and never used (the submit after `PrepareRender` refused, or its gateway gone): when no render has
come for position - 1 within the chain wait, the nearest earlier render of the chain stands in for
it, so one lost position does not fail the rest of the chain. A dependent's job is
`waiting` (not claimable) until `settle` releases it. `settle` runs right after whatever may end a
predecessor (a worker's finish, a cancel, the rescuer) and after a chain render's submit; the
rescuer also runs it over every waiting job, so a wake-up lost to a crash or a race only delays a
release by one rescue interval. Every change is fenced on `state = 'waiting'`, so settling twice
is harmless.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from services.generation.domain import NewEvent, RenderError
from services.generation.records import record

# The user's nearest earlier render of the chain (the newest, should a client have submitted one
# position twice). Settling decides when a gap below a render may be skipped; by the time the
# render runs, this is the render it was released after.
_PREDECESSOR = """
SELECT id, status FROM renders
WHERE user_id = %s AND chain_id = %s AND position < %s
ORDER BY position DESC, created_at DESC LIMIT 1
"""

# Waiting jobs with their predecessor as it stands now. `{which}` picks the dependents of given
# renders (through `depends_on`, or by position for those submitted before their predecessor),
# or every waiting job that needs something done (the rescuer's sweep).
_DEPENDENTS = """
SELECT j.render_id, j.depends_on, d.chain_id, d.position, p.id AS predecessor, p.status,
    j.created_at < now() - make_interval(secs => %(wait_s)s) AS overdue
FROM jobs j
JOIN renders d ON d.id = j.render_id
LEFT JOIN LATERAL (
    SELECT id, status FROM renders p
    WHERE p.user_id = d.user_id AND p.chain_id = d.chain_id AND p.position < d.position
        AND (p.position = d.position - 1 OR j.created_at < now() - make_interval(secs => %(wait_s)s))
    ORDER BY p.position DESC, p.created_at DESC LIMIT 1
) p ON true
WHERE j.state = 'waiting' AND {which}
ORDER BY j.created_at
LIMIT 1000
"""
_OF_GIVEN = "(j.depends_on = ANY(%(ids)s) OR (j.depends_on IS NULL AND p.id = ANY(%(ids)s)))"
_NEEDING_WORK = (
    "(p.id IS NULL OR p.status IN ('succeeded', 'failed', 'cancelled') OR j.depends_on IS DISTINCT FROM p.id)"
)

# The predecessor succeeded: the job becomes claimable.
_RELEASE = (
    "UPDATE jobs SET state = 'queued', depends_on = %(predecessor)s, run_after = now()"
    " WHERE render_id = %(id)s AND state = 'waiting' RETURNING render_id"
)
# The predecessor failed, was cancelled or never came: the job leaves the claim table.
_ABANDON = "DELETE FROM jobs WHERE render_id = %(id)s AND state = 'waiting' RETURNING render_id"
_LINK = "UPDATE jobs SET depends_on = %s WHERE render_id = %s AND state = 'waiting'"
_NO_WAIT = float(10**9)  # targeted settles never give up on a missing predecessor


@dataclass(frozen=True)
class Predecessor:
    """The render a chain render waits for, as it stood when looked up."""

    id: str
    status: str


@dataclass
class Settled:
    """What `settle` did."""

    released: int = 0
    failed: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.released or self.failed)


async def predecessor(
    conn: AsyncConnection[Any], user_id: str, chain_id: str, position: int
) -> Predecessor | None:
    """The nearest render before `position` in the user's chain, if one has been submitted."""
    cur = await conn.execute(_PREDECESSOR, [user_id, chain_id, position])
    row = await cur.fetchone()
    return None if row is None else Predecessor(row[0], row[1])


async def settle(
    conn: AsyncConnection[Any], ended: Iterable[str] | None, missing_wait_s: float = _NO_WAIT
) -> Settled:
    """Releases or fails the dependents of the renders `ended` (None: of every waiting job), and
    so on down each chain; a job whose predecessor has not been submitted `missing_wait_s` after
    it was fails too. `conn` must be in autocommit mode: each change is one statement."""
    done = Settled()
    which = _NEEDING_WORK if ended is None else _OF_GIVEN
    ids = list(ended or ())
    while which == _NEEDING_WORK or ids:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(_DEPENDENTS.format(which=which), {"ids": ids, "wait_s": missing_wait_s})
        failed: list[str] = []
        for job in await cur.fetchall():
            outcome = await _settle_one(conn, job, missing_wait_s)
            if outcome == "failed":
                failed.append(job["render_id"])
            done.released += outcome == "released"
        done.failed += len(failed)
        which, ids = _OF_GIVEN, failed
    if done.released:
        await conn.execute("SELECT pg_notify('generation_jobs', 'released')")
    return done


async def _settle_one(
    conn: AsyncConnection[Any], job: dict[str, Any], missing_wait_s: float
) -> Literal["released", "failed"] | None:
    """Acts on one waiting job; says whether it released or failed it."""
    render_id, before, status = job["render_id"], job["predecessor"], job["status"]
    if before is None:
        if not job["overdue"]:
            return None
        message = (
            f"no render before position {job['position']} of chain {job['chain_id']} was submitted"
            f" within {missing_wait_s:g} s"
        )
        return await _fail(conn, render_id, RenderError("dependency_failed", "missing", message))
    if status == "succeeded":
        note = f"the previous render of the chain, {before}, has succeeded"
        seq = await record(
            conn,
            render_id,
            [NewEvent("queued", message=note)],
            fence=_RELEASE,
            fence_params={"predecessor": before},
        )
        return None if seq is None else "released"
    if status in ("failed", "cancelled"):
        message = f"the previous render of the chain, {before}, has {status}"
        return await _fail(conn, render_id, RenderError("dependency_failed", status, message))
    if job["depends_on"] != before:
        await conn.execute(_LINK, [before, render_id])
    return None


async def _fail(conn: AsyncConnection[Any], render_id: str, error: RenderError) -> Literal["failed"] | None:
    seq = await record(
        conn, render_id, [NewEvent("failed", error=error)], fence=_ABANDON, status="failed", error=error
    )
    return None if seq is None else "failed"
