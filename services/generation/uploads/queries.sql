-- The statements of uploads.

-- name: insert_upload
INSERT INTO uploads (id, user_id, content_type, bytes, width, height, sha256, expires_at)
VALUES (%(id)s, %(user_id)s, %(content_type)s, %(bytes)s, %(width)s, %(height)s, %(sha256)s,
        now() + make_interval(secs => %(ttl_s)s))
RETURNING *

-- name: get_upload
SELECT * FROM uploads WHERE id = %(id)s AND user_id = %(user_id)s AND expires_at > now()

-- name: delete_upload
DELETE FROM uploads WHERE id = %(id)s AND user_id = %(user_id)s AND expires_at > now() RETURNING *

-- name: live_uploads
-- Which of these ids are uploads of the user, not expired.
SELECT id FROM uploads WHERE user_id = %(user_id)s AND id = ANY(%(ids)s) AND expires_at > now()

-- name: due_uploads
-- A batch of uploads past their time, held by this sweep until its commit (another sweep skips them).
SELECT id FROM uploads WHERE expires_at <= now()
ORDER BY expires_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED

-- name: uploads_deleted
DELETE FROM uploads WHERE id = ANY(%(ids)s)
