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
from dataclasses import dataclass, field
from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from services.generation.domain import Ended, NewEvent, RenderError
from services.generation.queries import QUERIES
from services.generation.records import record
from shared.statements import name_statements

_OF_GIVEN = QUERIES["waiting_dependents"].format(which=QUERIES["dependents_of_given"])
_NEEDING_WORK = QUERIES["waiting_dependents"].format(which=QUERIES["dependents_needing_work"])
name_statements(
    [("waiting_dependents.of_given", _OF_GIVEN), ("waiting_dependents.needing_work", _NEEDING_WORK)]
)
_NO_WAIT = float(10**9)  # targeted settles never give up on a missing predecessor


@dataclass(frozen=True)
class Predecessor:
    """An earlier render of a chain, as it stood when looked up."""

    id: str
    status: str


@dataclass
class Settled:
    """What `settle` did: how many renders it released, and those it failed."""

    released: int = 0
    failed: list[Ended] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.released or self.failed)


async def continues_from(
    conn: AsyncConnection[Any], user_id: str, chain_id: str, position: int
) -> Predecessor | None:
    """The nearest render before `position` in the user's chain that succeeded, if any."""
    cur = await conn.execute(QUERIES["continues_from"], [user_id, chain_id, position])
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
        await cur.execute(which, {"ids": ids, "wait_s": missing_wait_s})
        failed: list[Ended] = []
        for job in await cur.fetchall():
            outcome = await _settle_one(conn, job, missing_wait_s)
            if isinstance(outcome, Ended):
                failed.append(outcome)
            done.released += outcome == "released"
        done.failed += failed
        which, ids = _OF_GIVEN, [end.render_id for end in failed]
    if done.released:
        await conn.execute(QUERIES["notify_jobs"], ["released"])
    return done


async def _settle_one(
    conn: AsyncConnection[Any], job: dict[str, Any], missing_wait_s: float
) -> Literal["released"] | Ended | None:
    """Acts on one waiting job; says whether it released or failed it."""
    render_id, nearest, before = job["render_id"], job["nearest"], job["predecessor"]
    if before is not None and job["status"] != "succeeded":
        # Still queued or running: named, so that its end settles this job.
        if job["depends_on"] != before:
            await conn.execute(QUERIES["link_predecessor"], {"predecessor": before, "id": render_id})
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
    events = [NewEvent("queued", message=note)]
    params = {"predecessor": predecessor}
    done = await record(conn, render_id, events, fence="fence_release_waiting", fence_params=params)
    return None if done is None else "released"


async def _fail(conn: AsyncConnection[Any], render_id: str, error: RenderError) -> Ended | None:
    events = [NewEvent("failed", error=error)]
    done = await record(conn, render_id, events, fence="fence_abandon_waiting", status="failed", error=error)
    return None if done is None else done.ended
