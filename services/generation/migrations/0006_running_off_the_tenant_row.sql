-- The end of a job no longer writes, nor locks, its tenant's row. That row is locked by every claim
-- of the tenant's jobs and every submit; when the end of each job changed it too, one tenant's
-- claims and ends ran one at a time, each holding the row through its commit's WAL flush.
--
-- - `running` leaves the row: the running jobs are counted from the jobs (an index of them), and a
--   claim or submit adds `claimed` (a count claims bump, under the row's lock) as it stands now less
--   as its snapshot saw it: claims committed while it waited for the row are counted, ends it did not
--   see are not subtracted, so a cap or quota may hold back a moment too long, never let one more.
-- - The end of a render learns whether a chain render waits for it from its own row: a submit (or a
--   settle) that leaves a render waiting on another sets `dependents_waiting` on that other's row
--   while it has not ended. The end's update of that row reads it at its newest, so a submit that
--   committed while the end ran is seen, and one that commits after it finds the render ended and
--   settles its own.
-- Rollout: processes of before this migration read `tenants.running`: stop them all, migrate, start.
ALTER TABLE renders ADD COLUMN dependents_waiting boolean NOT NULL DEFAULT false;
UPDATE renders SET dependents_waiting = true
WHERE id IN (SELECT depends_on FROM jobs WHERE state = 'waiting' AND depends_on IS NOT NULL);

ALTER TABLE tenants ADD COLUMN claimed bigint NOT NULL DEFAULT 0;
ALTER TABLE tenants DROP COLUMN running;
CREATE INDEX jobs_tenant_running ON jobs (tenant) WHERE state = 'running';

CREATE OR REPLACE FUNCTION jobs_tally() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO tenants AS t (tenant, queued, waiting)
        VALUES (NEW.tenant, (NEW.state = 'queued')::int, (NEW.state = 'waiting')::int)
        ON CONFLICT (tenant) DO UPDATE SET queued = t.queued + excluded.queued,
            waiting = t.waiting + excluded.waiting;
    ELSIF TG_OP = 'DELETE' THEN
        IF OLD.state <> 'running' THEN  -- the end of a running job: nothing to count
            UPDATE tenants SET queued = queued - (OLD.state = 'queued')::int,
                waiting = waiting - (OLD.state = 'waiting')::int
            WHERE tenant = OLD.tenant;
        END IF;
    ELSE
        UPDATE tenants SET
            queued = queued + (NEW.state = 'queued')::int - (OLD.state = 'queued')::int,
            waiting = waiting + (NEW.state = 'waiting')::int - (OLD.state = 'waiting')::int,
            claimed = claimed + (NEW.state = 'running')::int,
            last_claimed_at = CASE WHEN NEW.state = 'running' THEN clock_timestamp() ELSE last_claimed_at END
        WHERE tenant = NEW.tenant;
    END IF;
    RETURN NULL;
END
$$;
