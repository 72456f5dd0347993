-- A render's deadline and execution timeout, the `expired` status, and retries linked to the
-- render they retry.
--
-- - `deadline_at`: a render not started by then ends `expired` (a status of its own: it never ran,
--   so no backend failed); one still running then is cancelled with reason `deadline`. The job
--   carries it too, indexed, so that the sweep finds the due ones without reading the renders.
-- - `timeout_s`: the most this render's generation may take (within the kind's configured maximum).
-- - `retry_of`: the render this one retries (POST /v1/renders/{id}:retry); a render lists its
--   retries through the index.
-- - `workers.tenant_cap` and `workers.reserved`: the claim's limits per tenant as each live worker
--   applies them, so that the API side's start estimates follow them too.
-- Rollout: processes of before this migration neither set nor read the new columns, and never
-- write `expired`; they run beside new ones.
ALTER TABLE renders DROP CONSTRAINT renders_status_check;
ALTER TABLE renders ADD CONSTRAINT renders_status_check
    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'expired'));
ALTER TABLE renders ADD COLUMN deadline_at timestamptz;
ALTER TABLE renders ADD COLUMN timeout_s double precision;
ALTER TABLE renders ADD COLUMN retry_of text;
CREATE INDEX renders_retries ON renders (retry_of, created_at) WHERE retry_of IS NOT NULL;

ALTER TABLE workers ADD COLUMN tenant_cap integer NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN reserved integer NOT NULL DEFAULT 0;

ALTER TABLE jobs ADD COLUMN deadline_at timestamptz;
CREATE INDEX jobs_deadline ON jobs (deadline_at) WHERE deadline_at IS NOT NULL;

-- The terminal events, which the pruning of old events starts from, include `expired`.
DROP INDEX events_ended;
CREATE INDEX events_ended ON events (at) WHERE type IN ('succeeded', 'failed', 'cancelled', 'expired');
