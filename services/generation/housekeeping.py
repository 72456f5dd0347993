"""The rescuer's housekeeping that keeps the hot tables small and the tenant counts true: old
events pruned, tenant rows checked against the jobs, idle tenants forgotten.

Rows of finished jobs need nothing here: a job leaves the claim table in the statement that ends
it.
"""

from __future__ import annotations

import logging
from typing import Any

from psycopg import AsyncConnection

from services.generation.queries import QUERIES

log = logging.getLogger(__name__)

_PRUNE_BATCH = 500


async def prune_events(conn: AsyncConnection[Any], retention_s: float, max_batches: int = 10) -> int:
    """Deletes the events of renders that ended more than `retention_s` ago, a batch of renders at
    a time; returns how many renders lost their events. `conn` must be in autocommit mode."""
    pruned = 0
    for _ in range(max_batches):
        cur = await conn.execute(QUERIES["prune_events"], [retention_s, _PRUNE_BATCH])
        row = await cur.fetchone()
        renders = int(row[0]) if row else 0
        pruned += renders
        if renders < _PRUNE_BATCH:
            break
    return pruned


async def recount_tenants(conn: AsyncConnection[Any]) -> int:
    """Corrects tenant counts that differ from the jobs (they should not: the trigger keeps them
    in the same transactions as the jobs; this is the safety net against manual edits), then
    forgets tenants idle for a day; returns how many counts it corrected. `conn` must be in
    autocommit mode."""
    recounted = 0
    cur = await conn.execute(QUERIES["drifted_tenants"])
    drifted = [row[0] for row in await cur.fetchall()]
    if drifted:
        async with conn.transaction():
            await conn.execute(QUERIES["lock_tenants"], [drifted])
            cur = await conn.execute(QUERIES["recount_tenants"], [drifted])
            recounted = cur.rowcount
        log.warning("tenant counts corrected", extra={"tenants": drifted})
    await conn.execute(QUERIES["forget_idle_tenants"])
    return recounted
