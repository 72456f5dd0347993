-- The statements of webhooks: receivers and secrets (the API side), deliveries (the dispatcher).

-- Receivers and secrets ---------------------------------------------------------------------

-- name: create_endpoint
-- The project's renders not yet ended are hooked: their next events reach the endpoint too.
WITH made AS (
    INSERT INTO webhook_endpoints (user_id, project_id, project, url, events, description, secret)
    VALUES (%(user_id)s, %(project_id)s, %(project)s, %(url)s, %(events)s, %(description)s, %(secret)s)
    RETURNING *
),
hooked AS (
    UPDATE renders SET hooked = true
    WHERE project_id = %(project_id)s AND user_id = %(user_id)s AND NOT hooked
      AND status NOT IN ('succeeded', 'failed', 'cancelled', 'expired')
)
SELECT * FROM made

-- name: endpoints_of_project
SELECT * FROM webhook_endpoints WHERE user_id = %(user_id)s AND project_id = %(project_id)s
ORDER BY created_at, id

-- name: endpoint
SELECT * FROM webhook_endpoints
WHERE id = %(id)s::uuid AND user_id = %(user_id)s AND project_id = %(project_id)s

-- name: update_endpoint
-- Changes what is given (NULL: unchanged); enabling clears why it was disabled and its failures.
WITH hooked AS (
    -- Enabled again: the project's renders not yet ended are hooked (as when it was made).
    UPDATE renders SET hooked = true
    WHERE %(enabled)s AND project_id = %(project_id)s AND user_id = %(user_id)s AND NOT hooked
      AND status NOT IN ('succeeded', 'failed', 'cancelled', 'expired')
)
UPDATE webhook_endpoints SET
    url = coalesce(%(url)s, url),
    events = coalesce(%(events)s, events),
    description = coalesce(%(description)s, description),
    enabled = coalesce(%(enabled)s, enabled),
    disabled_reason = CASE WHEN %(enabled)s IS NULL THEN disabled_reason
                           WHEN %(enabled)s THEN '' ELSE 'disabled by its owner' END,
    failing_since = CASE WHEN %(enabled)s THEN NULL ELSE failing_since END
WHERE id = %(id)s::uuid AND user_id = %(user_id)s AND project_id = %(project_id)s
RETURNING *

-- name: delete_endpoint
-- Its deliveries not yet made are given up (`endpoint_deleted`); its log stays.
WITH gone AS (
    DELETE FROM webhook_endpoints
    WHERE id = %(id)s::uuid AND user_id = %(user_id)s AND project_id = %(project_id)s
    RETURNING *
),
dropped AS (
    UPDATE webhook_deliveries SET state = 'failed', last_outcome = 'endpoint_deleted', leased_until = NULL
    WHERE endpoint_id = (SELECT id FROM gone) AND state = 'pending'
)
SELECT * FROM gone

-- name: rotate_endpoint_secret
UPDATE webhook_endpoints SET previous_secret = secret, secret = %(secret)s,
    previous_expires_at = now() + make_interval(secs => %(overlap_s)s)
WHERE id = %(id)s::uuid AND user_id = %(user_id)s AND project_id = %(project_id)s
RETURNING secret, previous_expires_at

-- name: user_secret
SELECT secret, previous_expires_at FROM webhook_secrets WHERE user_id = %(user_id)s

-- name: make_user_secret
-- The user's secret, `secret`, unless the user has one. Its own statement: a read in the same
-- statement would not see a secret made at the same moment by another (its snapshot is older).
INSERT INTO webhook_secrets (user_id, secret) VALUES (%(user_id)s, %(secret)s)
ON CONFLICT (user_id) DO NOTHING

-- name: rotate_user_secret
INSERT INTO webhook_secrets AS s (user_id, secret) VALUES (%(user_id)s, %(secret)s)
ON CONFLICT (user_id) DO UPDATE SET previous_secret = s.secret, secret = EXCLUDED.secret,
    previous_expires_at = now() + make_interval(secs => %(overlap_s)s)
RETURNING secret, previous_expires_at

-- Deliveries --------------------------------------------------------------------------------

-- name: deliveries_of_render
SELECT * FROM webhook_deliveries
WHERE render_id = %(render_id)s AND user_id = %(user_id)s
  AND (%(before)s::timestamptz IS NULL OR (created_at, id) < (%(before)s, %(before_id)s::uuid))
ORDER BY created_at DESC, id DESC LIMIT %(limit)s

-- name: deliveries_of_endpoint
SELECT * FROM webhook_deliveries
WHERE endpoint_id = %(endpoint_id)s::uuid AND user_id = %(user_id)s
  AND (%(before)s::timestamptz IS NULL OR (created_at, id) < (%(before)s, %(before_id)s::uuid))
ORDER BY created_at DESC, id DESC LIMIT %(limit)s

-- name: delivery
SELECT * FROM webhook_deliveries WHERE id = %(id)s::uuid

-- name: attempts_of
SELECT * FROM webhook_attempts WHERE delivery_id = ANY (%(ids)s::uuid[]) ORDER BY delivery_id, number

-- name: redeliver
-- Another attempt of the delivery, at once, whatever its state (its id stays: receivers dedupe);
-- not for one whose endpoint is deleted (`endpoint_deleted` says whether that is why nothing changed).
WITH delivery AS (
    SELECT id, endpoint_id FROM webhook_deliveries WHERE id = %(id)s::uuid AND user_id = %(user_id)s
),
again AS (
    UPDATE webhook_deliveries d SET state = 'pending', next_attempt_at = now(), leased_until = NULL
    FROM delivery
    WHERE d.id = delivery.id
      AND (delivery.endpoint_id IS NULL OR EXISTS (SELECT FROM webhook_endpoints w WHERE w.id = delivery.endpoint_id))
    RETURNING d.id
)
SELECT (SELECT count(*) FROM again) = 0 AS endpoint_deleted FROM delivery

-- The dispatcher ----------------------------------------------------------------------------

-- name: claim_deliveries
-- Up to `limit` due deliveries, leased for `lease_s`: each the first unsent one of its
-- subscription and render (deliveries of a render go out in order), none of a disabled endpoint,
-- and at most `per_receiver` in flight to one URL, so that a receiver that hangs holds that many
-- of the dispatchers' slots and every other receiver's deliveries go on. SKIP LOCKED: dispatchers
-- of several generation replicas share the work.
WITH in_flight AS MATERIALIZED (
    SELECT url, count(*) AS n FROM webhook_deliveries WHERE leased_until > now() GROUP BY url
),
candidates AS (
    -- In due order along the index, skipping receivers at their cap (a list computed once), so the
    -- scan stops as soon as it has enough.
    SELECT d.id, d.url, d.next_attempt_at
    FROM webhook_deliveries d
    WHERE d.state = 'pending' AND d.next_attempt_at <= now()
      AND (d.leased_until IS NULL OR d.leased_until < now())
      AND d.url <> ALL (ARRAY(SELECT url FROM in_flight WHERE n >= %(per_receiver)s))
      AND NOT EXISTS (
          SELECT FROM webhook_deliveries e
          WHERE e.state = 'pending' AND e.subscription = d.subscription AND e.render_id = d.render_id
            AND e.seq < d.seq)
      AND (d.endpoint_id IS NULL OR EXISTS (
          SELECT FROM webhook_endpoints w WHERE w.id = d.endpoint_id AND w.enabled))
    ORDER BY d.next_attempt_at
    LIMIT %(limit)s * 4
),
ranked AS (
    SELECT c.id, c.next_attempt_at,
        coalesce((SELECT f.n FROM in_flight f WHERE f.url = c.url), 0)
            + row_number() OVER (PARTITION BY c.url ORDER BY c.next_attempt_at) AS nth
    FROM candidates c
),
due AS (
    SELECT d.id FROM webhook_deliveries d JOIN ranked r ON r.id = d.id
    WHERE r.nth <= %(per_receiver)s
    ORDER BY r.next_attempt_at
    LIMIT %(limit)s
    FOR UPDATE OF d SKIP LOCKED
)
UPDATE webhook_deliveries d SET leased_until = now() + make_interval(secs => %(lease_s)s),
    attempts = d.attempts + 1
FROM due WHERE d.id = due.id
RETURNING d.*

-- name: endpoint_signing_secrets
-- The secrets that sign an endpoint's deliveries: its own, and the previous one while its overlap
-- lasts.
SELECT secret, CASE WHEN previous_expires_at > now() THEN previous_secret END AS previous_secret
FROM webhook_endpoints WHERE id = %(endpoint_id)s::uuid

-- name: user_signing_secrets
-- The secrets that sign a user's render webhooks, and the previous one while its overlap lasts.
SELECT secret, CASE WHEN previous_expires_at > now() THEN previous_secret END AS previous_secret
FROM webhook_secrets WHERE user_id = %(user_id)s

-- name: record_attempt
-- One attempt's outcome: the log entry, and the delivery delivered, failed for good, or due again
-- at `next_attempt_at`; the endpoint's run of failures started, ended, or long enough to disable it.
WITH attempt AS (
    INSERT INTO webhook_attempts (delivery_id, number, at, outcome, status, latency_ms, message,
        response_excerpt, next_attempt_at)
    VALUES (%(id)s::uuid, %(number)s, %(at)s, %(outcome)s, %(status)s, %(latency_ms)s, %(message)s,
        %(excerpt)s, %(next_attempt_at)s)
),
delivery AS (
    UPDATE webhook_deliveries SET
        state = CASE WHEN %(delivered)s THEN 'delivered' WHEN %(next_attempt_at)s::timestamptz IS NULL
                     THEN 'failed' ELSE 'pending' END,
        delivered_at = CASE WHEN %(delivered)s THEN %(at)s ELSE delivered_at END,
        next_attempt_at = coalesce(%(next_attempt_at)s, next_attempt_at),
        leased_until = NULL, last_outcome = %(outcome)s, body = coalesce(body, %(body)s)
    WHERE id = %(id)s::uuid
    RETURNING endpoint_id
)
UPDATE webhook_endpoints w SET
    failing_since = CASE WHEN %(delivered)s THEN NULL ELSE coalesce(w.failing_since, %(at)s) END,
    enabled = w.enabled AND (%(delivered)s OR coalesce(w.failing_since, %(at)s) > %(at)s::timestamptz
                                                - make_interval(secs => %(disable_after_s)s)),
    disabled_reason = CASE
        WHEN NOT %(delivered)s AND w.enabled AND coalesce(w.failing_since, %(at)s) <= %(at)s::timestamptz
                                                - make_interval(secs => %(disable_after_s)s)
        THEN 'its deliveries failed without a break since ' || to_char(w.failing_since AT TIME ZONE 'UTC',
                                                                        'YYYY-MM-DD"T"HH24:MI:SS"Z"')
        ELSE w.disabled_reason END
FROM delivery WHERE w.id = delivery.endpoint_id
RETURNING w.enabled, w.disabled_reason

-- name: oldest_due
-- How long the oldest due delivery has waited (the backlog's age), in seconds; 0 when none.
SELECT coalesce(extract(epoch FROM now() - min(next_attempt_at)), 0)::float8 AS age_s
FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= now()
