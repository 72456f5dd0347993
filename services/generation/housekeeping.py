"""The rescuer's housekeeping that keeps the hot tables small and the tenant counts true: old
events pruned, tenant rows checked against the jobs, idle tenants forgotten.

Rows of finished jobs need nothing here: a job leaves the claim table in the statement that ends
it.
"""

from __future__ import annotations

import logging
from typing import Any

from psycopg import AsyncConnection

log = logging.getLogger(__name__)

# Events of renders that ended before the retention: found through their terminal event, deleted
# a batch of renders at a time.
_PRUNE = """
WITH ended AS (
    SELECT render_id FROM events
    WHERE type IN ('succeeded', 'failed', 'cancelled') AND at < now() - make_interval(secs => %s)
    ORDER BY at LIMIT %s
),
gone AS (DELETE FROM events e USING ended WHERE e.render_id = ended.render_id RETURNING 1)
SELECT (SELECT count(*) FROM ended), (SELECT count(*) FROM gone)
"""
_PRUNE_BATCH = 500

# Tenant rows whose counts differ from the jobs (read without locks: a hint, checked again below).
_DRIFTED = """
SELECT t.tenant FROM tenants t
LEFT JOIN (
    SELECT tenant, count(*) FILTER (WHERE state = 'queued') AS queued,
        count(*) FILTER (WHERE state = 'running') AS running,
        count(*) FILTER (WHERE state = 'waiting') AS waiting
    FROM jobs GROUP BY tenant
) c USING (tenant)
WHERE (t.queued, t.running, t.waiting)
    IS DISTINCT FROM (coalesce(c.queued, 0), coalesce(c.running, 0), coalesce(c.waiting, 0))
"""
# Every change of the counts needs the tenant row's lock: with it held, a fresh count is exact.
_RECOUNT = """
UPDATE tenants t SET
    queued = (SELECT count(*) FROM jobs WHERE tenant = t.tenant AND state = 'queued'),
    running = (SELECT count(*) FROM jobs WHERE tenant = t.tenant AND state = 'running'),
    waiting = (SELECT count(*) FROM jobs WHERE tenant = t.tenant AND state = 'waiting')
WHERE t.tenant = ANY(%s)
"""
# Tenants idle for a day leave the table (a later job brings them back); rows in use are skipped.
_FORGET_IDLE = """
DELETE FROM tenants WHERE tenant IN (
    SELECT tenant FROM tenants
    WHERE queued = 0 AND running = 0 AND waiting = 0
      AND coalesce(last_claimed_at, '-infinity') < now() - interval '1 day'
    LIMIT 1000 FOR UPDATE SKIP LOCKED
)
"""


async def prune_events(conn: AsyncConnection[Any], retention_s: float, max_batches: int = 10) -> int:
    """Deletes the events of renders that ended more than `retention_s` ago, a batch of renders at
    a time; returns how many renders lost their events. `conn` must be in autocommit mode."""
    pruned = 0
    for _ in range(max_batches):
        cur = await conn.execute(_PRUNE, [retention_s, _PRUNE_BATCH])
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
    cur = await conn.execute(_DRIFTED)
    drifted = [row[0] for row in await cur.fetchall()]
    if drifted:
        async with conn.transaction():
            await conn.execute(
                "SELECT FROM tenants WHERE tenant = ANY(%s) ORDER BY tenant FOR UPDATE", [drifted]
            )
            cur = await conn.execute(_RECOUNT, [drifted])
            recounted = cur.rowcount
        log.warning("tenant counts corrected", extra={"tenants": drifted})
    await conn.execute(_FORGET_IDLE)
    return recounted
