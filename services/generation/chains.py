"""Chain dependencies: a render whose reference is "the previous render of its chain" continues
from the nearest earlier render of its chain that succeeded.

Its job is `waiting` (not claimable) while the nearest earlier render that has not failed or been
cancelled is still queued or running. A render that failed or was cancelled is skipped over, so
one bad render does not doom the rest of its chain. Once the nearest earlier render that has not
failed has succeeded, the job is released and its reference is that render's output (the last
frame of a video, see `references`); its `queued` event says which render it continues from.

With nothing to continue from (every earlier render of the chain failed or was cancelled, or none
was submitted within the chain wait) the render runs without a reference, as the first of a chain
does; only if its reference is `required` does it fail instead, with `dependency_failed` (reason
`none_succeeded` or `missing`), before any attempt. That is the one meaning of `dependency_failed`.

A position is taken in the statement that inserts its render, so submits leave no gap; should a
position still be missing (positions allocated before they moved here, a row removed by hand), the
render at position - 1 is waited for until the chain wait has passed, then the earlier ones stand
in for it. `settle` runs right after whatever may end a render (a worker's
finish, a cancel, the rescuer) and after a chain render's submit; the rescuer also runs it over
every waiting job, so a wake-up lost to a crash or a race only delays a release by one rescue
interval. Every change is fenced on `state = 'waiting'`, so settling twice is harmless.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from services.generation.domain import NewEvent, RenderError
from services.generation.records import record

# The nearest earlier render of the chain that succeeded: by the time a chain render runs, the one
# it was released after (if any).
_CONTINUES_FROM = """
SELECT id, status FROM renders
WHERE user_id = %s AND chain_id = %s AND position < %s AND status = 'succeeded'
ORDER BY position DESC, created_at DESC LIMIT 1
"""

# Waiting jobs with, as they stand now, `nearest`: the render at position - 1 (any earlier one once
# the job is overdue), and `predecessor`: the nearest render at or before it that has not failed or
# been cancelled (none while `nearest` is not known). `{which}` picks the dependents of given
# renders, or every waiting job that needs something done (the rescuer's sweep).
_DEPENDENTS = """
SELECT j.render_id, j.depends_on, d.chain_id, d.position, o.overdue,
    coalesce((d.reference->>'required')::boolean, false) AS required,
    n.id AS nearest, n.status AS nearest_status, p.id AS predecessor, p.status
FROM jobs j
JOIN renders d ON d.id = j.render_id
CROSS JOIN LATERAL (SELECT j.created_at < now() - make_interval(secs => %(wait_s)s) AS overdue) o
LEFT JOIN LATERAL (
    SELECT id, status, position FROM renders n
    WHERE n.user_id = d.user_id AND n.chain_id = d.chain_id AND n.position < d.position
        AND (n.position = d.position - 1 OR o.overdue)
    ORDER BY n.position DESC, n.created_at DESC LIMIT 1
) n ON true
LEFT JOIN LATERAL (
    SELECT id, status FROM renders p
    WHERE p.user_id = d.user_id AND p.chain_id = d.chain_id AND p.position <= n.position
        AND p.status NOT IN ('failed', 'cancelled')
    ORDER BY p.position DESC, p.created_at DESC LIMIT 1
) p ON true
WHERE j.state = 'waiting' AND {which}
ORDER BY j.created_at
LIMIT 1000
"""
_OF_GIVEN = (
    "(j.depends_on = ANY(%(ids)s) OR (j.depends_on IS NULL AND (n.id = ANY(%(ids)s) OR p.id = ANY(%(ids)s))))"
)
_NEEDING_WORK = (
    "(p.status = 'succeeded' OR j.depends_on IS DISTINCT FROM p.id"
    " OR (p.id IS NULL AND (n.id IS NOT NULL OR o.overdue)))"
)

# The job becomes claimable, continuing from `predecessor` (None: from nothing).
_RELEASE = (
    "UPDATE jobs SET state = 'queued', depends_on = %(predecessor)s, run_after = now()"
    " WHERE render_id = %(id)s AND state = 'waiting' RETURNING render_id"
)
# It cannot run: the job leaves the claim table.
_ABANDON = "DELETE FROM jobs WHERE render_id = %(id)s AND state = 'waiting' RETURNING render_id"
_LINK = "UPDATE jobs SET depends_on = %s WHERE render_id = %s AND state = 'waiting'"
_NO_WAIT = float(10**9)  # targeted settles never give up on a missing predecessor


@dataclass(frozen=True)
class Predecessor:
    """An earlier render of a chain, as it stood when looked up."""

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


async def continues_from(
    conn: AsyncConnection[Any], user_id: str, chain_id: str, position: int
) -> Predecessor | None:
    """The nearest render before `position` in the user's chain that succeeded, if any."""
    cur = await conn.execute(_CONTINUES_FROM, [user_id, chain_id, position])
    row = await cur.fetchone()
    return None if row is None else Predecessor(row[0], row[1])


async def settle(
    conn: AsyncConnection[Any], ended: Iterable[str] | None, missing_wait_s: float = _NO_WAIT
) -> Settled:
    """Releases or fails the dependents of the renders `ended` (None: of every waiting job), and
    so on down each chain; a job with no render before it `missing_wait_s` after it was submitted
    runs without a reference (or fails, if required). `conn` must be in autocommit mode: each
    change is one statement."""
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
    render_id, nearest, before = job["render_id"], job["nearest"], job["predecessor"]
    if before is not None and job["status"] != "succeeded":
        # Still queued or running: named, so that its end settles this job.
        if job["depends_on"] != before:
            await conn.execute(_LINK, [before, render_id])
        return None
    if before is not None:
        if before == nearest:
            note = f"the previous render of the chain, {before}, has succeeded"
        else:
            note = (
                f"continuing from {before}, the nearest earlier render of the chain that succeeded"
                f" ({nearest} has {job['nearest_status']})"
            )
        return await _release(conn, render_id, before, note)
    if nearest is None and not job["overdue"]:
        return None  # position - 1 may still be submitted
    where = f"before position {job['position']} of chain {job['chain_id']}"
    if nearest is None:
        reason, why = "missing", f"no render {where} was submitted within {missing_wait_s:g} s"
    else:
        reason, why = "none_succeeded", f"no render {where} has succeeded"
    if job["required"]:
        error = RenderError("dependency_failed", reason, f"{why}, and the reference is required")
        return await _fail(conn, render_id, error)
    return await _release(conn, render_id, None, f"{why}; it runs without a reference")


async def _release(
    conn: AsyncConnection[Any], render_id: str, predecessor: str | None, note: str
) -> Literal["released"] | None:
    seq = await record(
        conn,
        render_id,
        [NewEvent("queued", message=note)],
        fence=_RELEASE,
        fence_params={"predecessor": predecessor},
    )
    return None if seq is None else "released"


async def _fail(conn: AsyncConnection[Any], render_id: str, error: RenderError) -> Literal["failed"] | None:
    seq = await record(
        conn, render_id, [NewEvent("failed", error=error)], fence=_ABANDON, status="failed", error=error
    )
    return None if seq is None else "failed"
