-- The workers alive and their slots (concurrency), so that the claim knows the capacity it shares
-- out: a worker writes its row when it starts and at every heartbeat, and deletes it when it stops;
-- a row not refreshed within a lease is a dead worker's and no longer counts.
CREATE TABLE workers (
    worker_id text PRIMARY KEY,
    slots integer NOT NULL CHECK (slots > 0),
    seen_at timestamptz NOT NULL DEFAULT now()
);
