-- Webhooks: who receives which renders' events, signed with whose secret, and the deliveries to
-- make, recorded with the event that causes them (docs/webhooks.md).

-- A render's own receiver, as submitted: {url, events}; `hooked`: whether its events may have
-- receivers (its own, or its project's endpoints): the outbox looks at no other render.
ALTER TABLE renders ADD COLUMN webhook jsonb;
ALTER TABLE renders ADD COLUMN hooked boolean NOT NULL DEFAULT false;

-- A user's signing secret for the deliveries of render webhooks; the previous one signs beside it
-- until `previous_expires_at` (a rotation's overlap).
CREATE TABLE webhook_secrets (
    user_id text PRIMARY KEY,
    secret text NOT NULL,
    previous_secret text,
    previous_expires_at timestamptz
);

-- A project's standing receivers.
CREATE TABLE webhook_endpoints (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id text NOT NULL,
    project_id text NOT NULL,
    project text NOT NULL,
    url text NOT NULL,
    events text[] NOT NULL,
    description text NOT NULL DEFAULT '',
    secret text NOT NULL,
    previous_secret text,
    previous_expires_at timestamptz,
    enabled boolean NOT NULL DEFAULT true,
    disabled_reason text NOT NULL DEFAULT '',
    failing_since timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_of_project ON webhook_endpoints (project_id, user_id) WHERE enabled;
CREATE INDEX webhook_endpoints_of_user ON webhook_endpoints (user_id, project_id, created_at);

-- One event to deliver to one receiver; its id is the `webhook-id` of every attempt.
-- `subscription`: the endpoint's id, or 'render' for the render's own webhook: deliveries of one
-- subscription and render go out in `seq` order. `body`: the payload, fixed at the first attempt
-- (retries send the same bytes).
CREATE TABLE webhook_deliveries (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id text NOT NULL,
    render_id text NOT NULL,
    endpoint_id uuid,
    subscription text NOT NULL,
    url text NOT NULL,
    event text NOT NULL,
    seq integer NOT NULL,
    event_at timestamptz NOT NULL,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    leased_until timestamptz,
    body text,
    trace_id text NOT NULL DEFAULT '',
    traceparent text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    last_outcome text NOT NULL DEFAULT ''
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_of_render ON webhook_deliveries (render_id, created_at);
CREATE INDEX webhook_deliveries_of_endpoint ON webhook_deliveries (endpoint_id, created_at)
    WHERE endpoint_id IS NOT NULL;
CREATE INDEX webhook_deliveries_in_order ON webhook_deliveries (subscription, render_id, seq)
    WHERE state = 'pending';
-- Deliveries in flight (leased), by receiver: how many one URL has at once is capped.
CREATE INDEX webhook_deliveries_in_flight ON webhook_deliveries (url) WHERE leased_until IS NOT NULL;
-- Progress is coalesced: one unsent progress delivery per subscription and render, carrying the
-- newest event.
CREATE UNIQUE INDEX webhook_deliveries_unsent_progress ON webhook_deliveries (subscription, render_id)
    WHERE event = 'progress' AND state = 'pending' AND attempts = 0;

CREATE TABLE webhook_attempts (
    delivery_id uuid NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    number integer NOT NULL,
    at timestamptz NOT NULL,
    outcome text NOT NULL,
    status integer NOT NULL,
    latency_ms double precision NOT NULL,
    message text NOT NULL,
    response_excerpt text NOT NULL,
    next_attempt_at timestamptz,
    PRIMARY KEY (delivery_id, number)
);

-- The outbox: deliveries are made by the statement that writes their events, so an event is
-- never written without its deliveries nor the other way round. Every statement that appends a
-- render's events moves its `last_seq` (or inserts it, at 1) in the same statement: a row trigger
-- on renders, fired at the statement's end, finds the new events. Its WHEN is checked without a
-- call: a render with no receiver costs nothing.
CREATE FUNCTION webhook_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries AS d
        (user_id, render_id, endpoint_id, subscription, url, event, seq, event_at, trace_id, traceparent)
    SELECT DISTINCT ON (s.subscription, x.event, CASE WHEN x.event = 'progress' THEN 0 ELSE e.seq END)
        NEW.user_id, NEW.id, s.endpoint_id, s.subscription, s.url, x.event, e.seq, e.at, NEW.trace_id,
        NEW.traceparent
    FROM events e
    CROSS JOIN LATERAL (SELECT CASE
        WHEN e.type IN ('succeeded', 'failed', 'cancelled', 'expired') THEN 'completed'
        WHEN e.type IN ('queued', 'started', 'progress') THEN e.type
    END AS event) x
    CROSS JOIN LATERAL (
        SELECT w.id AS endpoint_id, w.id::text AS subscription, w.url, w.events
        FROM webhook_endpoints w
        WHERE w.project_id = NEW.project_id AND w.user_id = NEW.user_id AND w.enabled
        UNION ALL
        SELECT NULL, 'render', NEW.webhook ->> 'url', ARRAY(SELECT jsonb_array_elements_text(NEW.webhook -> 'events'))
        WHERE NEW.webhook IS NOT NULL
    ) s
    WHERE e.render_id = NEW.id
      AND e.seq > CASE WHEN TG_OP = 'UPDATE' THEN OLD.last_seq ELSE 0 END AND e.seq <= NEW.last_seq
      AND x.event = ANY (s.events)
    ORDER BY s.subscription, x.event, CASE WHEN x.event = 'progress' THEN 0 ELSE e.seq END, e.seq DESC
    ON CONFLICT (subscription, render_id) WHERE event = 'progress' AND state = 'pending' AND attempts = 0
    DO UPDATE SET seq = greatest(d.seq, EXCLUDED.seq), event_at = greatest(d.event_at, EXCLUDED.event_at);
    RETURN NULL;
END $$;

CREATE TRIGGER renders_webhook_outbox_insert AFTER INSERT ON renders
    FOR EACH ROW WHEN (NEW.hooked) EXECUTE FUNCTION webhook_outbox();
CREATE TRIGGER renders_webhook_outbox_update AFTER UPDATE OF last_seq ON renders
    FOR EACH ROW WHEN (NEW.hooked AND NEW.last_seq > OLD.last_seq) EXECUTE FUNCTION webhook_outbox();
