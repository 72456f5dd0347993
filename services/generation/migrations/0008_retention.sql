-- Retention: how long a render's output is kept after it ends, and when it was deleted (by its
-- expiry or by DELETE /v1/renders/{id}); the render's row outlives its output, as a record.
--
-- - `retention_s`: the output's lifetime after the render succeeds, fixed at submit (the service's
--   default, or what the request asked within the maximum); NULL: kept for ever.
-- - `output_expires_at`: set when the render succeeds; the sweep deletes the outputs due, found
--   through the partial index, and stamps `output_deleted_at`.
-- - Records past the record retention (a setting; none by default) are deleted by the same sweep,
--   found through `renders_finished`; their events go with them (ON DELETE CASCADE).
-- Rollout: processes of before this migration never set these columns: their renders' outputs are
-- kept for ever, as before.
ALTER TABLE renders ADD COLUMN retention_s double precision;
ALTER TABLE renders ADD COLUMN output_expires_at timestamptz;
ALTER TABLE renders ADD COLUMN output_deleted_at timestamptz;
CREATE INDEX renders_output_expiry ON renders (output_expires_at)
    WHERE output_expires_at IS NOT NULL AND output_deleted_at IS NULL;
CREATE INDEX renders_finished ON renders (finished_at) WHERE finished_at IS NOT NULL;
