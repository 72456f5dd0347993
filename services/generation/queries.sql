-- Every statement the generation service and its workers run, by name (see `queries.py`).
-- A block runs from its `-- name:` line to the next one; the comment lines right after the name
-- say what it does. Migrations are not here: they are in `migrations/`.
-- `{...}` marks a part that the store fills in (a fence, a filter) before running the statement.

-- Submitting --------------------------------------------------------------------------------

-- name: submit_render
-- One statement: the chain's next position, the render, its job (queued, or waiting for the
-- render before it in its chain), its `queued` event and both wake-ups.
-- - The upsert of the user's tenant row locks it until the statement commits, so the quota check
--   (`active`: the user's jobs before this one) never lets one more in under concurrency (running
--   jobs are counted as migration 0006 says); a render the quota refuses is not inserted and `id`
--   comes back NULL.
-- - A render left waiting marks the render it waits for (`dependents_waiting`), if that one has not
--   ended: its end then settles this one (see migration 0006).
-- - The position is taken only for a render that will be inserted (within the quota, not a repeat
--   of an id or of a live idempotency key), so repeats leave no gap in the chain; the upsert of the
--   chain's row serializes positions, which are never shared. (Racing repeats of one key are
--   serialized by the caller's advisory lock, so the second sees the first.)
-- - `previous` is the render before it, as far as this statement sees: the caller settles the
--   waiting job at once, which links or releases it as the chain stands.
-- - The first render of a chain has nothing to continue from: a `previous` reference is dropped.
-- - The job's backend is left to the worker that claims it (see claim_jobs).
-- ON CONFLICT DO NOTHING covers the primary key and the (user, idempotency key) index alike.
WITH t AS (
    INSERT INTO tenants AS t (tenant) VALUES (%(user_id)s)
    ON CONFLICT (tenant) DO UPDATE SET tenant = t.tenant
    RETURNING t.queued + t.waiting + t.claimed
        - coalesce((SELECT s.claimed FROM tenants s WHERE s.tenant = %(user_id)s), 0)
        + (SELECT count(*) FROM jobs r WHERE r.tenant = %(user_id)s AND r.state = 'running') AS active
),
p AS (
    INSERT INTO chain_positions AS c (chain_id, user_id, last)
    SELECT %(chain_id)s, %(user_id)s, 1 FROM t
    WHERE (%(max_active)s = 0 OR t.active < %(max_active)s)
      AND NOT EXISTS (SELECT FROM renders WHERE id = %(id)s)
      AND NOT EXISTS (
          SELECT FROM renders WHERE user_id = %(user_id)s AND idempotency_key = %(idempotency_key)s
      )
    ON CONFLICT (chain_id) DO UPDATE SET last = c.last + 1
    RETURNING last AS position
),
previous AS (
    SELECT id FROM renders
    WHERE user_id = %(user_id)s AND chain_id = %(chain_id)s AND position < (SELECT position FROM p)
    ORDER BY position DESC, created_at DESC LIMIT 1
),
r AS (
    INSERT INTO renders (id, user_id, project_id, project, chain_id, position, kind, prompt,
        negative_prompt, params, rules, reference, batch_id, timings, trace_id, traceparent,
        idempotency_key, request_hash, priority, deadline_at, timeout_s, retry_of, retention_s, webhook,
        hooked, last_seq, created_at)
    SELECT %(id)s, %(user_id)s, %(project_id)s, %(project)s, %(chain_id)s, p.position, %(kind)s,
        %(prompt)s, %(negative_prompt)s, %(params)s, %(rules)s,
        CASE WHEN %(chains)s AND p.position = 1 THEN NULL ELSE %(reference)s::jsonb END,
        %(batch_id)s, %(timings)s, %(trace_id)s, %(traceparent)s, %(idempotency_key)s,
        %(request_hash)s, %(priority)s, %(deadline_at)s, %(timeout_s)s, %(retry_of)s, %(retention_s)s,
        %(webhook)s,
        %(webhook)s::jsonb IS NOT NULL OR EXISTS (
            SELECT FROM webhook_endpoints w
            WHERE w.project_id = %(project_id)s AND w.user_id = %(user_id)s AND w.enabled),
        1, clock_timestamp()
    FROM p
    ON CONFLICT DO NOTHING
    RETURNING *
),
j AS (
    INSERT INTO jobs (render_id, tenant, priority, kind, created_at, deadline_at, state, depends_on)
    SELECT id, user_id, priority, kind, created_at, deadline_at,
        CASE WHEN %(chains)s AND position > 1 THEN 'waiting' ELSE 'queued' END,
        CASE WHEN %(chains)s THEN (SELECT id FROM previous) END
    FROM r
    RETURNING state, depends_on
),
marked AS (
    UPDATE renders SET dependents_waiting = true
    WHERE id = (SELECT depends_on FROM j WHERE state = 'waiting')
      AND status NOT IN ('succeeded', 'failed', 'cancelled', 'expired')
),
e AS (
    INSERT INTO events (render_id, seq, type, payload)
    SELECT id, 1, 'queued',
        CASE WHEN %(chains)s AND position > 1 THEN %(waiting_event)s ELSE %(event)s END
    FROM r
)
SELECT r.*, CASE WHEN %(chains)s AND r.position > 1 THEN (SELECT id FROM previous) END AS waiting_on,
       t.active AS _active,
       CASE WHEN r.id IS NOT NULL THEN pg_notify('generation_jobs', r.id) END AS _jobs,
       CASE WHEN r.id IS NOT NULL THEN pg_notify('generation_events', r.id || ':1') END AS _events
FROM t LEFT JOIN r ON true

-- name: lock_idempotency_key
-- Holds one user's idempotency key until the transaction ends (racing repeats run in turn).
SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))

-- name: release_render_key
-- An idempotency key stands for its first request for 24 hours; after that it is free again, and
-- releasing it from the old render lets a new one take it. Run only when an insert conflicted.
UPDATE renders SET idempotency_key = NULL
WHERE user_id = %s AND idempotency_key = %s AND created_at < clock_timestamp() - interval '24 hours'

-- name: release_batch_key
-- The same for a batch.
UPDATE batches SET idempotency_key = NULL
WHERE user_id = %s AND idempotency_key = %s AND created_at < clock_timestamp() - interval '24 hours'

-- name: insert_batch
-- A new batch; nothing when the user's idempotency key is taken.
INSERT INTO batches (user_id, idempotency_key, request_hash) VALUES (%s, %s, %s)
ON CONFLICT DO NOTHING RETURNING id

-- name: batch_by_key
-- The batch a user's idempotency key stands for.
SELECT id, request_hash FROM batches WHERE user_id = %s AND idempotency_key = %s

-- name: retry_after_figures
-- How many of the user's renders run, and the mean run time of recent renders (seconds).
SELECT (SELECT count(*) FROM jobs WHERE tenant = %s AND state = 'running') AS running,
    (SELECT avg(extract(epoch FROM s.finished_at - s.started_at)) FROM
        (SELECT finished_at, started_at FROM renders WHERE status = 'succeeded'
         ORDER BY finished_at DESC LIMIT 20) s) AS mean_s

-- name: chain_lengths
-- The last allocated position of each of the user's chains that has one.
SELECT chain_id, last FROM chain_positions WHERE user_id = %s AND chain_id = ANY(%s)

-- Reading renders, events and batches -------------------------------------------------------
-- A render row comes with `waiting_on`: while it waits for its chain predecessor, that render's id;
-- and `retries`: the renders that retried it, oldest first.

-- name: user_render
-- The user's render.
SELECT renders.*,
    (SELECT j.depends_on FROM jobs j WHERE j.render_id = renders.id AND j.state = 'waiting') AS waiting_on,
    ARRAY(SELECT x.id FROM renders x WHERE x.retry_of = renders.id ORDER BY x.created_at) AS retries
FROM renders WHERE id = %s AND user_id = %s

-- name: any_render
-- A render, whoever owns it.
SELECT renders.*,
    (SELECT j.depends_on FROM jobs j WHERE j.render_id = renders.id AND j.state = 'waiting') AS waiting_on,
    ARRAY(SELECT x.id FROM renders x WHERE x.retry_of = renders.id ORDER BY x.created_at) AS retries
FROM renders WHERE id = %s

-- name: render_by_key
-- The render a user's idempotency key stands for.
SELECT renders.*,
    (SELECT j.depends_on FROM jobs j WHERE j.render_id = renders.id AND j.state = 'waiting') AS waiting_on,
    ARRAY(SELECT x.id FROM renders x WHERE x.retry_of = renders.id ORDER BY x.created_at) AS retries
FROM renders WHERE user_id = %s AND idempotency_key = %s

-- name: list_renders
-- One page of renders: `{where}` and `{order}` are the filter and the keyset order of the page.
SELECT renders.*,
    (SELECT j.depends_on FROM jobs j WHERE j.render_id = renders.id AND j.state = 'waiting') AS waiting_on,
    ARRAY(SELECT x.id FROM renders x WHERE x.retry_of = renders.id ORDER BY x.created_at) AS retries
FROM renders WHERE {where} ORDER BY {order} LIMIT {limit}

-- name: user_batch
-- The user's batch.
SELECT id, user_id, created_at FROM batches WHERE id::text = %s AND user_id = %s

-- name: batch_renders
-- A batch's renders in submission order.
SELECT renders.*,
    (SELECT j.depends_on FROM jobs j WHERE j.render_id = renders.id AND j.state = 'waiting') AS waiting_on,
    ARRAY(SELECT x.id FROM renders x WHERE x.retry_of = renders.id ORDER BY x.created_at) AS retries
FROM renders WHERE batch_id = %s ORDER BY created_at, id

-- name: events_after_many
-- The events of several renders, each above its own seq, ordered by render then seq: one probe of
-- the primary key per render (a plain join let the planner scan the whole table, which grows with
-- every render of the retention period).
SELECT e.* FROM unnest(%(ids)s::text[], %(after)s::int[]) AS c(render_id, after)
CROSS JOIN LATERAL (
    SELECT * FROM events e WHERE e.render_id = c.render_id AND e.seq > c.after ORDER BY e.seq LIMIT %(limit)s
) e
ORDER BY e.render_id, e.seq
LIMIT %(limit)s

-- name: queue_snapshot
-- What the start of a user's queued renders is estimated from (see `eta`), as rows by `part`:
-- `slots` (the live workers' slots, in `seconds`; their limits per tenant in `params`), `running` (every running job, `seconds` it has
-- run), `queued` (the user's queued jobs, and as many of each other tenant's, each in the claim's
-- order: `turn`; tenants in the order the claim serves them: `rank`; `seconds` before it may run).
WITH own AS (SELECT count(*) AS n FROM jobs WHERE tenant = %(user_id)s AND state = 'queued'),
served AS (
    SELECT t.tenant, row_number() OVER (ORDER BY t.last_claimed_at NULLS FIRST, t.tenant) AS rank
    FROM tenants t WHERE t.queued > 0
    ORDER BY t.last_claimed_at NULLS FIRST, t.tenant
    LIMIT 200
)
SELECT 'slots' AS part, NULL AS render_id, NULL AS tenant, NULL AS kind,
    (SELECT jsonb_build_object('cap', coalesce(max(tenant_cap), 0), 'reserved', coalesce(max(reserved), 0))
     FROM workers WHERE seen_at > now() - make_interval(secs => %(live_s)s)) AS params,
    (SELECT coalesce(sum(slots), 0) FROM workers
     WHERE seen_at > now() - make_interval(secs => %(live_s)s))::float8 AS seconds,
    0::bigint AS rank, 0::bigint AS turn
UNION ALL
SELECT 'running', j.render_id, j.tenant, j.kind, r.params,
    extract(epoch FROM clock_timestamp() - j.claimed_at)::float8, 0, 0
FROM jobs j JOIN renders r ON r.id = j.render_id
WHERE j.state = 'running'
UNION ALL
SELECT 'queued', q.render_id, s.tenant, q.kind, r.params,
    greatest(0, extract(epoch FROM q.run_after - clock_timestamp()))::float8, s.rank, q.turn
FROM served s CROSS JOIN LATERAL (
    SELECT render_id, kind, run_after,
        row_number() OVER (ORDER BY priority DESC, created_at, render_id) AS turn
    FROM jobs WHERE jobs.tenant = s.tenant AND jobs.state = 'queued'
    ORDER BY priority DESC, created_at, render_id
    LIMIT (SELECT least(n, 1000) FROM own)
) q
JOIN renders r ON r.id = q.render_id

-- name: recent_run_times
-- How long recent renders that succeeded ran (claim to end), with their kind and parameters.
SELECT kind, params, extract(epoch FROM finished_at - started_at)::float8 AS seconds FROM renders
WHERE status = 'succeeded' AND started_at IS NOT NULL
ORDER BY finished_at DESC LIMIT 500

-- name: queue_depth
-- Jobs by kind and state, right now, and how long the oldest of each has been there (seconds).
SELECT kind, state, count(*) AS jobs, extract(epoch FROM now() - min(created_at)) AS oldest_s
FROM jobs GROUP BY kind, state

-- name: job_counts
-- Jobs by state.
SELECT state, count(*) FROM jobs GROUP BY state

-- name: count_stalled
-- Running renders without progress for longer than the given seconds.
SELECT count(*) FROM jobs j JOIN renders r ON r.id = j.render_id
WHERE j.state = 'running'
  AND coalesce(r.last_progress_at, r.started_at) < now() - make_interval(secs => %s)

-- Cancelling --------------------------------------------------------------------------------

-- name: lock_user_job
-- The user's job, locked (lock order everywhere: the job row, then the render row).
SELECT state FROM jobs WHERE render_id = %s AND tenant = %s FOR UPDATE

-- name: user_render_status
-- The status of the user's render.
SELECT status FROM renders WHERE id = %s AND user_id = %s

-- name: delete_job
-- The job leaves the claim table.
DELETE FROM jobs WHERE render_id = %s

-- name: request_cancel
-- Flags a running job for its worker.
UPDATE jobs SET cancel_requested = true WHERE render_id = %s

-- name: notify_cancel
-- Tells the workers a cancel was requested.
SELECT pg_notify('generation_cancel', %s)

-- name: lock_batch_jobs
-- The jobs of the user's batch, locked (a claim holding one is waited for: it is then seen running).
SELECT j.render_id, j.state FROM jobs j
WHERE j.tenant = %s AND j.render_id IN (SELECT id FROM renders WHERE batch_id = %s)
ORDER BY j.render_id
FOR UPDATE

-- name: cancel_jobs
-- In one statement, with their job rows locked by the caller: the jobs `queued` (or waiting) leave
-- the claim table and their renders end `cancelled` with their event; the jobs `running` are
-- flagged for their workers. Returns the ended renders (and whether a chain render waits for each).
WITH gone AS (
    DELETE FROM jobs WHERE render_id = ANY(%(queued)s::text[]) AND state <> 'running'
    RETURNING render_id
),
r AS (
    UPDATE renders SET status = 'cancelled', error = %(error)s::jsonb, last_seq = last_seq + 1,
        finished_at = clock_timestamp()
    FROM gone WHERE renders.id = gone.render_id
    RETURNING renders.id, renders.last_seq, renders.kind, renders.dependents_waiting
),
e AS (
    INSERT INTO events (render_id, seq, type, payload)
    SELECT r.id, r.last_seq, 'cancelled', %(event)s::jsonb FROM r
    RETURNING render_id, seq, type, at, payload
),
flagged AS (
    UPDATE jobs SET cancel_requested = true WHERE render_id = ANY(%(running)s::text[]) AND state = 'running'
    RETURNING render_id, pg_notify('generation_cancel', render_id)
)
SELECT r.id, r.kind, r.dependents_waiting,
    pg_notify('generation_events', r.id || ':' || r.last_seq || {carried}) AS _events
FROM r

-- name: set_priority
-- A queued (or waiting) render's new priority, on its job (the claim's order) and its row.
WITH j AS (
    UPDATE jobs SET priority = %(priority)s
    WHERE render_id = %(id)s AND tenant = %(user_id)s AND state <> 'running'
    RETURNING render_id
)
UPDATE renders SET priority = %(priority)s FROM j WHERE renders.id = j.render_id RETURNING renders.id

-- name: notify_jobs
-- Wakes the workers: there is work to claim.
SELECT pg_notify('generation_jobs', %s)

-- Recording a render's changes --------------------------------------------------------------

-- name: record_change
-- Applies a render's state change and appends its events, in one statement, if `{fence}` (a
-- statement selecting `render_id` when the write may go ahead) lets it; returns the new last seq,
-- the render's kind and whether a chain render waits for it (`dependents_waiting`, read at its
-- newest: see migration 0006). Its NOTIFY carries the events (`{carried}`: see carried_events).
WITH fence AS ({fence}),
r AS (
    UPDATE renders SET
        last_seq = last_seq + cardinality(%(types)s::text[]),
        status = coalesce(%(status)s::text, status),
        progress = coalesce(%(progress)s::float8, progress),
        last_progress_at = CASE WHEN %(progress)s::float8 IS NULL THEN last_progress_at
                                ELSE clock_timestamp() END,
        timings = timings || %(timings)s::jsonb,
        output = coalesce(%(output)s::jsonb, output),
        error = coalesce(%(error)s::jsonb, error),
        reference = coalesce(reference || %(reference)s::jsonb, reference),
        provider_request_id = coalesce(%(provider_request_id)s::text, provider_request_id),
        attempts = coalesce(%(attempts)s::int, attempts),
        started_at = CASE WHEN %(status)s::text = 'running' THEN clock_timestamp() ELSE started_at END,
        finished_at = CASE WHEN %(status)s::text IN ('succeeded', 'failed', 'cancelled', 'expired')
                           THEN clock_timestamp() ELSE finished_at END,
        output_expires_at = CASE WHEN %(status)s::text = 'succeeded' AND retention_s IS NOT NULL
                                 THEN clock_timestamp() + make_interval(secs => retention_s)
                                 ELSE output_expires_at END
    FROM fence WHERE renders.id = fence.render_id
    RETURNING renders.id, renders.last_seq, renders.kind, renders.dependents_waiting
),
e AS (
    INSERT INTO events (render_id, seq, type, payload)
    SELECT r.id, r.last_seq - cardinality(%(types)s::text[]) + x.ord, x.type, x.payload
    FROM r, unnest(%(types)s::text[], %(payloads)s::jsonb[]) WITH ORDINALITY AS x(type, payload, ord)
    RETURNING render_id, seq, type, at, payload
)
SELECT r.last_seq, r.kind, pg_notify('generation_events', r.id || ':' || r.last_seq || {carried}),
    r.dependents_waiting
FROM r

-- name: carried_events
-- The events the statement appended (CTE `e`) for the render `{render}`, for its NOTIFY to carry: a
-- newline and a JSON array of [seq, type, at, payload] in base64, or nothing when that would not
-- fit in a notification (8,000 bytes): the listeners then read them from the log. Base64 has no
-- colon, so a listener that splits the payload at its last colon (as hubs did before the events
-- were carried) still finds `<render_id>:<seq>...` and reads the log: the two mix during a rollout.
coalesce((
    SELECT E'\n' || translate(encode(convert_to(x.events, 'UTF8'), 'base64'), E'\n', '') FROM (
        SELECT json_agg(json_build_array(e.seq, e.type, e.at, e.payload) ORDER BY e.seq)::text AS events
        FROM e WHERE e.render_id = {render}
    ) x WHERE octet_length(x.events) < 5500
), '')

-- name: fence_none
-- Fence of a write that may always go ahead.
SELECT %(id)s::text AS render_id

-- name: fence_held
-- The worker still holds the job: lock it so the rescuer cannot requeue it under our feet.
SELECT render_id FROM jobs WHERE render_id = %(id)s AND state = 'running'
    AND lease_token = %(token)s::uuid FOR UPDATE

-- name: fence_end
-- The worker ends the job: it leaves the claim table in the same statement.
DELETE FROM jobs WHERE render_id = %(id)s AND state = 'running'
    AND lease_token = %(token)s::uuid RETURNING render_id

-- name: fence_requeue
-- The worker gives the job back to the queue (retry after a delay, or hand back on shutdown;
-- a hand-back refunds the attempt it did not get to finish).
UPDATE jobs SET state = 'queued', lease_token = NULL, lease_expires_at = NULL, worker_id = NULL,
    run_after = now() + make_interval(secs => %(delay_s)s::float8), attempts = attempts - %(refund)s::int
WHERE render_id = %(id)s AND state = 'running' AND lease_token = %(token)s::uuid RETURNING render_id

-- name: fence_release_waiting
-- A waiting chain render becomes claimable, continuing from `predecessor` (None: from nothing).
UPDATE jobs SET state = 'queued', depends_on = %(predecessor)s, run_after = now()
WHERE render_id = %(id)s AND state = 'waiting' RETURNING render_id

-- name: fence_abandon_waiting
-- A waiting chain render cannot run: its job leaves the claim table.
DELETE FROM jobs WHERE render_id = %(id)s AND state = 'waiting' RETURNING render_id

-- Chains ------------------------------------------------------------------------------------

-- name: continues_from
-- The nearest earlier render of the chain that succeeded: by the time a chain render runs, the one
-- it was released after (if any).
SELECT id, status FROM renders
WHERE user_id = %s AND chain_id = %s AND position < %s AND status = 'succeeded'
ORDER BY position DESC, created_at DESC LIMIT 1

-- name: waiting_dependents
-- Waiting jobs with, as they stand now, `nearest`: the render at position - 1 (any earlier one
-- once the job is overdue), and `predecessor`: the nearest render at or before it that has not
-- failed or been cancelled (none while `nearest` is not known). `{which}` is
-- dependents_of_given or dependents_needing_work.
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
        AND p.status NOT IN ('failed', 'cancelled', 'expired')
    ORDER BY p.position DESC, p.created_at DESC LIMIT 1
) p ON true
WHERE j.state = 'waiting' AND {which}
ORDER BY j.created_at
LIMIT 1000

-- name: dependents_of_given
-- The waiting jobs that depend on (or may depend on) the renders `ids`.
(j.depends_on = ANY(%(ids)s) OR (j.depends_on IS NULL AND (n.id = ANY(%(ids)s) OR p.id = ANY(%(ids)s))))

-- name: dependents_needing_work
-- Every waiting job that needs something done (the rescuer's sweep).
(p.status = 'succeeded' OR j.depends_on IS DISTINCT FROM p.id
 OR (p.id IS NULL AND (n.id IS NOT NULL OR o.overdue)))

-- name: link_predecessor
-- Names the render a waiting job waits for, and marks it, so that its end settles the job.
WITH j AS (
    UPDATE jobs SET depends_on = %(predecessor)s WHERE render_id = %(id)s AND state = 'waiting'
    RETURNING depends_on
)
UPDATE renders SET dependents_waiting = true
WHERE id = (SELECT depends_on FROM j) AND status NOT IN ('succeeded', 'failed', 'cancelled', 'expired')

-- The worker's queue ------------------------------------------------------------------------

-- name: claim_jobs
-- Up to `limit` jobs, taken from the tenants in turn, stamped with the backend this worker runs
-- each kind with (`backends`: {kind: backend}; `projects`: {project id: {kind: backend}} for the
-- projects with backends of their own, looked up only when `by_project`), and started: each claimed render is `running`
-- with its `started` event and the event of its first phase (image_fetch with a reference, else
-- generation), and comes back whole with its job, so that a claim is the only round trip before
-- the work. A job whose cancel was requested is claimed only to be cancelled: it is not started.
-- 1. candidates: tenants with a runnable job and room under the cap, least recently served first
--    (an index scan of `tenants_ready`, one probe of `jobs_tenant_queue` each, stopping at `limit`).
-- 2. locked: those tenant rows, locked in name order (claimers never deadlock on each other, and
--    everything else that locks several tenant rows locks them in that order too). The lock
--    serializes claims per tenant, and a row locked after a wait is re-read at its newest: its
--    `claimed` count then includes the claims committed since this statement's snapshot, and
--    `running` (the running jobs of that snapshot, plus those claims) is never below the truth, so
--    the cap holds however many workers claim at once (an end it did not see holds one back).
-- 3. picked: each tenant's next jobs, up to its room (index scan of `jobs_tenant_queue` in the
--    tenant's order; SKIP LOCKED passes over rows another claimer or a cancel holds).
-- 4. chosen: round-robin — every tenant's 1st job, then every tenant's 2nd, ... up to `limit`.
-- A job past its deadline is never claimed: the deadline sweep ends it (`due_deadlines`).
-- The cap is the lesser of `cap` (the configured most per tenant) and the live workers' slots less
-- `reserved`: however long its renders, one tenant never holds the last `reserved` slots, which
-- stay free for the next tenant to submit (`workers`: rows refreshed within `live_s`; with no
-- more slots than `reserved`, nothing is held back).
-- The trigger on `jobs` moves the tenant's counts (`claimed` among them) and stamps
-- `last_claimed_at` in this statement.
-- Planned cost: O(limit) index probes, whatever the number of queued jobs (EXPLAIN ANALYZE with
-- 20,000 queued, over 50 tenants or nearly all of one: 0.4-0.7 ms of server time).
WITH live AS (
    SELECT coalesce(sum(slots), 0) AS slots FROM workers
    WHERE seen_at > now() - make_interval(secs => %(live_s)s)
),
cap AS (
    SELECT CASE WHEN live.slots > %(reserved)s THEN least(%(cap)s, live.slots - %(reserved)s)
                ELSE %(cap)s END AS n
    FROM live
),
candidates AS (
    SELECT t.tenant FROM tenants t
    WHERE t.queued > 0
      AND (SELECT count(*) FROM jobs r WHERE r.tenant = t.tenant AND r.state = 'running') < (SELECT n FROM cap)
      AND EXISTS (SELECT FROM jobs q
                  WHERE q.tenant = t.tenant AND q.state = 'queued' AND q.run_after <= now()
                    AND (q.deadline_at IS NULL OR q.deadline_at > now()))
    ORDER BY t.last_claimed_at NULLS FIRST, t.tenant
    LIMIT %(limit)s
),
locked AS (
    SELECT t.tenant, t.last_claimed_at,
        (SELECT count(*) FROM jobs r WHERE r.tenant = t.tenant AND r.state = 'running')
            + t.claimed - coalesce((SELECT s.claimed FROM tenants s WHERE s.tenant = t.tenant), 0)
            AS running
    FROM tenants t
    WHERE t.tenant IN (SELECT tenant FROM candidates)
    ORDER BY t.tenant
    FOR UPDATE
),
picked AS (
    SELECT j.render_id, l.tenant, l.last_claimed_at,
        row_number() OVER (PARTITION BY l.tenant ORDER BY j.priority DESC, j.created_at, j.render_id) AS turn
    FROM locked l CROSS JOIN LATERAL (
        SELECT render_id, priority, created_at FROM jobs
        WHERE jobs.tenant = l.tenant AND jobs.state = 'queued' AND jobs.run_after <= now()
          AND (jobs.deadline_at IS NULL OR jobs.deadline_at > now())
        ORDER BY jobs.priority DESC, jobs.created_at, jobs.render_id
        LIMIT greatest(0, least((SELECT n FROM cap) - l.running, %(limit)s))
        FOR UPDATE SKIP LOCKED
    ) j
),
chosen AS (
    SELECT render_id FROM picked ORDER BY turn, last_claimed_at NULLS FIRST, tenant LIMIT %(limit)s
),
claimed AS (
    UPDATE jobs SET state = 'running', attempts = attempts + 1, worker_id = %(worker)s,
        lease_token = gen_random_uuid(), lease_expires_at = now() + make_interval(secs => %(lease_s)s),
        claimed_at = clock_timestamp(),
        backend = CASE WHEN %(by_project)s THEN coalesce(
                           %(projects)s::jsonb -> (SELECT r.project_id FROM renders r WHERE r.id = jobs.render_id) ->> kind,
                           %(backends)s::jsonb ->> kind)
                       ELSE %(backends)s::jsonb ->> kind END
    WHERE render_id IN (SELECT render_id FROM chosen)
    RETURNING render_id, lease_token::text, worker_id, attempts,
        coalesce(max_attempts, %(max_attempts)s) AS max_attempts, tenant, kind, backend, created_at,
        claimed_at, cancel_requested
),
started AS (
    UPDATE renders r SET status = 'running', attempts = c.attempts, progress = 0, backend = c.backend,
        last_progress_at = clock_timestamp(), started_at = clock_timestamp(), last_seq = r.last_seq + 2,
        timings = r.timings || jsonb_build_object(
            'queue_wait_ms', round(extract(epoch FROM c.claimed_at - c.created_at)::numeric * 1000, 3))
    FROM claimed c WHERE r.id = c.render_id AND NOT c.cancel_requested
    RETURNING r.*
),
e AS (
    INSERT INTO events (render_id, seq, type, payload)
    SELECT s.id, s.last_seq - 2 + x.n, x.type, x.payload
    FROM started s JOIN claimed c ON c.render_id = s.id CROSS JOIN LATERAL (VALUES
        (1, 'started', jsonb_build_object(
            'message', format('attempt %%s of %%s on %%s', c.attempts, c.max_attempts, c.worker_id))),
        (2, 'phase', jsonb_build_object(
            'phase', CASE WHEN s.reference IS NULL THEN 'generation' ELSE 'image_fetch' END))
    ) AS x(n, type, payload)
    RETURNING render_id, seq, type, at, payload
)
SELECT s.*, NULL AS waiting_on, c.*,
    CASE WHEN s.id IS NOT NULL
         THEN pg_notify('generation_events', s.id || ':' || s.last_seq || {carried}) END AS _events
FROM claimed c LEFT JOIN started s ON s.id = c.render_id

-- name: worker_seen
-- A worker's slots, counted by the claim until the row is older than a lease, and the limits per
-- tenant its claims apply (0: no cap), for the start estimates.
INSERT INTO workers (worker_id, slots, tenant_cap, reserved, seen_at) VALUES (%s, %s, %s, %s, now())
ON CONFLICT (worker_id) DO UPDATE SET slots = excluded.slots, tenant_cap = excluded.tenant_cap,
    reserved = excluded.reserved, seen_at = excluded.seen_at

-- name: worker_gone
DELETE FROM workers WHERE worker_id = %s

-- name: heartbeat
-- Renews the leases of the given jobs still held; says, for each, whether its cancel was requested.
UPDATE jobs j SET lease_expires_at = now() + make_interval(secs => %s)
FROM unnest(%s::text[], %s::uuid[]) AS h(render_id, token)
WHERE j.render_id = h.render_id AND j.lease_token = h.token AND j.state = 'running'
RETURNING j.render_id, j.cancel_requested

-- name: expired_leases
-- Running jobs whose lease expired (their worker died or hung), locked for the rescuer.
SELECT render_id, attempts, coalesce(max_attempts, %s) AS max_attempts, cancel_requested, worker_id
FROM jobs WHERE state = 'running' AND lease_expires_at < now()
ORDER BY tenant, lease_expires_at LIMIT 100
FOR UPDATE SKIP LOCKED

-- name: due_deadlines
-- Jobs not running whose render's deadline has passed, locked for the sweep that ends them (SKIP
-- LOCKED: a cancel holding one ends it first). `attempts` > 0: it ran before (a retry or a hand-back
-- waits in the queue).
SELECT render_id, attempts FROM jobs
WHERE deadline_at <= now() AND state <> 'running'
ORDER BY deadline_at LIMIT 100
FOR UPDATE SKIP LOCKED

-- name: requeue_expired
-- An expired job goes back to the queue, runnable at once.
UPDATE jobs SET state = 'queued', lease_token = NULL, lease_expires_at = NULL,
    worker_id = NULL, run_after = now() WHERE render_id = %s

-- name: reserve_backend_turn
-- Per-backend pacing: reserves the slot at max(next_at, now) and moves next_at one interval past
-- it; returns the seconds to wait for the reserved slot.
INSERT INTO backend_pacing AS p (backend, next_at)
VALUES (%(backend)s, clock_timestamp() + make_interval(secs => %(interval_s)s))
ON CONFLICT (backend) DO UPDATE
    SET next_at = greatest(p.next_at, clock_timestamp()) + make_interval(secs => %(interval_s)s)
RETURNING greatest(0, extract(epoch FROM p.next_at - clock_timestamp()) - %(interval_s)s)::float8

-- Housekeeping ------------------------------------------------------------------------------

-- name: due_outputs
-- Outputs past their retention, locked until the caller has deleted their files and commits.
SELECT id FROM renders
WHERE output_expires_at <= now() AND output_deleted_at IS NULL
ORDER BY output_expires_at LIMIT 100
FOR UPDATE SKIP LOCKED

-- name: outputs_deleted
-- Stamps the renders whose output files are gone.
UPDATE renders SET output_deleted_at = clock_timestamp() WHERE id = ANY(%s) AND output_deleted_at IS NULL

-- name: due_records
-- Renders that ended before the record retention, deleted with their events; returns those whose
-- output file is still there, for the caller to delete before it commits.
DELETE FROM renders WHERE id IN (
    SELECT id FROM renders WHERE finished_at < now() - make_interval(secs => %s)
    ORDER BY finished_at LIMIT 100
    FOR UPDATE SKIP LOCKED
)
RETURNING id, output IS NOT NULL AND output_deleted_at IS NULL AS has_output

-- name: lock_user_render
-- The user's render, locked (its status and whether its output is there).
SELECT status, output IS NOT NULL AND output_deleted_at IS NULL AS has_output FROM renders
WHERE id = %s AND user_id = %s
FOR UPDATE

-- name: prune_events
-- Events of renders that ended before the retention: found through their terminal event, deleted
-- a batch of renders at a time, with their webhook deliveries that are settled (and their logs).
WITH ended AS (
    SELECT render_id FROM events
    WHERE type IN ('succeeded', 'failed', 'cancelled', 'expired') AND at < now() - make_interval(secs => %s)
    ORDER BY at LIMIT %s
),
gone AS (DELETE FROM events e USING ended WHERE e.render_id = ended.render_id RETURNING 1),
settled AS (
    DELETE FROM webhook_deliveries d USING ended WHERE d.render_id = ended.render_id AND d.state <> 'pending'
)
SELECT (SELECT count(*) FROM ended), (SELECT count(*) FROM gone)

-- name: drifted_tenants
-- Tenant rows whose counts differ from the jobs (read without locks: a hint, checked again).
SELECT t.tenant FROM tenants t
LEFT JOIN (
    SELECT tenant, count(*) FILTER (WHERE state = 'queued') AS queued,
        count(*) FILTER (WHERE state = 'waiting') AS waiting
    FROM jobs GROUP BY tenant
) c USING (tenant)
WHERE (t.queued, t.waiting) IS DISTINCT FROM (coalesce(c.queued, 0), coalesce(c.waiting, 0))

-- name: lock_tenants
-- Every change of the counts needs the tenant row's lock: with it held, a fresh count is exact.
SELECT FROM tenants WHERE tenant = ANY(%s) ORDER BY tenant FOR UPDATE

-- name: recount_tenants
-- The tenants' counts, counted again from the jobs.
UPDATE tenants t SET
    queued = (SELECT count(*) FROM jobs WHERE tenant = t.tenant AND state = 'queued'),
    waiting = (SELECT count(*) FROM jobs WHERE tenant = t.tenant AND state = 'waiting')
WHERE t.tenant = ANY(%s)

-- name: forget_idle_tenants
-- Tenants idle for a day leave the table (a later job brings them back); rows in use are skipped.
DELETE FROM tenants WHERE tenant IN (
    SELECT tenant FROM tenants
    WHERE queued = 0 AND waiting = 0
      AND NOT EXISTS (SELECT FROM jobs r WHERE r.tenant = tenants.tenant AND r.state = 'running')
      AND coalesce(last_claimed_at, '-infinity') < now() - interval '1 day'
    LIMIT 1000 FOR UPDATE SKIP LOCKED
)

-- Listening ---------------------------------------------------------------------------------

-- name: listen
-- Subscribes the listening connection to `{channel}`.
LISTEN {channel}

-- name: ping
-- Proves a quiet connection is alive.
SELECT 1
