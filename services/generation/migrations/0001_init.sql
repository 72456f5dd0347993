-- Renders, their claim table, their event log and batches. The search_path is schema `generation`.

CREATE TABLE batches (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id text NOT NULL,
    idempotency_key text,
    request_hash text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX batches_idempotency ON batches (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- The system of record: one row per render, kept after it ends.
CREATE TABLE renders (
    id text PRIMARY KEY,
    user_id text NOT NULL,
    project_id text NOT NULL DEFAULT '',
    project text NOT NULL DEFAULT '',
    chain_id text NOT NULL DEFAULT '',
    position bigint NOT NULL DEFAULT 0,
    kind text NOT NULL CHECK (kind IN ('image', 'video')),
    status text NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    progress double precision NOT NULL DEFAULT 0,
    prompt text NOT NULL,
    negative_prompt text NOT NULL DEFAULT '',
    params jsonb NOT NULL,
    rules jsonb NOT NULL DEFAULT '[]',
    reference jsonb,
    batch_id uuid REFERENCES batches (id),
    output jsonb,
    error jsonb,
    timings jsonb NOT NULL DEFAULT '{}',
    attempts integer NOT NULL DEFAULT 0,
    trace_id text NOT NULL DEFAULT '',
    traceparent text NOT NULL DEFAULT '',
    idempotency_key text,
    request_hash text,
    priority integer NOT NULL DEFAULT 0,
    -- The seq of the newest event; bumped in the statement that appends events, so the row lock
    -- orders a render's events without gaps.
    last_seq integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz,
    last_progress_at timestamptz
);
CREATE UNIQUE INDEX renders_idempotency ON renders (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX renders_newest ON renders (user_id, created_at DESC, id DESC);
CREATE INDEX renders_chain ON renders (chain_id, position, id) WHERE chain_id <> '';
CREATE INDEX renders_batch ON renders (batch_id) WHERE batch_id IS NOT NULL;
-- Recent run times, for eta_s.
CREATE INDEX renders_recent_success ON renders (finished_at DESC) WHERE status = 'succeeded';

-- The claim table: a row per render while it is queued or running, deleted when it ends, so
-- that it stays small. Columns for later rounds (fairness by tenant, chains, per-kind backends)
-- are here already.
CREATE TABLE jobs (
    render_id text PRIMARY KEY REFERENCES renders (id) ON DELETE CASCADE,
    tenant text NOT NULL,
    state text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running')),
    priority integer NOT NULL DEFAULT 0,
    kind text NOT NULL,
    backend text NOT NULL DEFAULT 'procedural',
    created_at timestamptz NOT NULL DEFAULT now(),
    run_after timestamptz NOT NULL DEFAULT now(),
    depends_on text,
    attempts integer NOT NULL DEFAULT 0,
    -- NULL: the worker's RENDERFLOW_MAX_ATTEMPTS.
    max_attempts integer,
    lease_token uuid,
    lease_expires_at timestamptz,
    worker_id text,
    claimed_at timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false
) WITH (
    -- Every job row is inserted, updated a few times and deleted within seconds: vacuum early
    -- and often so dead tuples never pile up in the claim index.
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 500,
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 500,
    autovacuum_vacuum_cost_delay = 0
);
CREATE INDEX jobs_claim ON jobs (priority DESC, created_at, render_id) WHERE state = 'queued';
CREATE INDEX jobs_lease ON jobs (lease_expires_at) WHERE state = 'running';

CREATE TABLE events (
    render_id text NOT NULL REFERENCES renders (id) ON DELETE CASCADE,
    seq integer NOT NULL,
    type text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    payload jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (render_id, seq)
);
