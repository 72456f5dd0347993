-- Fair claims across tenants, per-backend pacing, chain dependencies, and what keeps the hot
-- tables small. The search_path is schema `generation`.

-- A chain render waits in the claim table as `waiting` until its predecessor has ended; it is
-- not claimable then. `depends_on` names that predecessor (NULL while it has not been submitted).
ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_state_check CHECK (state IN ('waiting', 'queued', 'running'));

-- Per-tenant state: how many of its jobs are in each state, and when one last started. The
-- claim takes tenants least recently served first and reads `running` for the per-tenant cap;
-- Submit reads the sum for the per-user quota. The counts are kept by the trigger below, in the
-- very statements that change the jobs, so they are exactly as durable as the jobs themselves.
CREATE TABLE tenants (
    tenant text PRIMARY KEY,
    queued integer NOT NULL DEFAULT 0,
    running integer NOT NULL DEFAULT 0,
    waiting integer NOT NULL DEFAULT 0,
    last_claimed_at timestamptz
) WITH (
    -- A few rows updated on every submit, claim and finish: keep room for new versions on the
    -- page and vacuum early.
    fillfactor = 50,
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 200,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 200,
    autovacuum_vacuum_cost_delay = 0
);
-- The claim's first step: tenants with queued work, least recently served first.
CREATE INDEX tenants_ready ON tenants (last_claimed_at NULLS FIRST, tenant) WHERE queued > 0;

INSERT INTO tenants (tenant, queued, running, waiting)
SELECT tenant, count(*) FILTER (WHERE state = 'queued'), count(*) FILTER (WHERE state = 'running'),
       count(*) FILTER (WHERE state = 'waiting')
FROM jobs GROUP BY tenant;

CREATE FUNCTION jobs_tally() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO tenants AS t (tenant, queued, running, waiting)
        VALUES (NEW.tenant, (NEW.state = 'queued')::int, (NEW.state = 'running')::int,
                (NEW.state = 'waiting')::int)
        ON CONFLICT (tenant) DO UPDATE SET queued = t.queued + excluded.queued,
            running = t.running + excluded.running, waiting = t.waiting + excluded.waiting;
    ELSIF TG_OP = 'DELETE' THEN
        UPDATE tenants SET queued = queued - (OLD.state = 'queued')::int,
            running = running - (OLD.state = 'running')::int,
            waiting = waiting - (OLD.state = 'waiting')::int
        WHERE tenant = OLD.tenant;
    ELSE
        UPDATE tenants SET
            queued = queued + (NEW.state = 'queued')::int - (OLD.state = 'queued')::int,
            running = running + (NEW.state = 'running')::int - (OLD.state = 'running')::int,
            waiting = waiting + (NEW.state = 'waiting')::int - (OLD.state = 'waiting')::int,
            last_claimed_at = CASE WHEN NEW.state = 'running' THEN clock_timestamp() ELSE last_claimed_at END
        WHERE tenant = NEW.tenant;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_tally_insert AFTER INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION jobs_tally();
CREATE TRIGGER jobs_tally_delete AFTER DELETE ON jobs FOR EACH ROW EXECUTE FUNCTION jobs_tally();
-- Heartbeats and cancel flags do not change the state: they do not touch the tenant row.
CREATE TRIGGER jobs_tally_state AFTER UPDATE OF state ON jobs FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION jobs_tally();

-- The claim walks one tenant's runnable jobs in its order (priority, then age): fair claims
-- replace the one global order.
DROP INDEX jobs_claim;
CREATE INDEX jobs_tenant_queue ON jobs (tenant, priority DESC, created_at, render_id) WHERE state = 'queued';
-- Dependents of a render that ended (and those whose predecessor is not known yet: NULL).
CREATE INDEX jobs_waiting ON jobs (depends_on) WHERE state = 'waiting';

-- Pacing of each backend shared by all workers: the earliest moment the next call may start.
CREATE TABLE backend_pacing (
    backend text PRIMARY KEY,
    next_at timestamptz NOT NULL
);

-- Pruning finds renders whose log ended long ago through their terminal event.
CREATE INDEX events_ended ON events (at) WHERE type IN ('succeeded', 'failed', 'cancelled');
