-- Uploads: images users send to serve as references (POST /v1/uploads), kept until `expires_at`.
-- Their bytes are objects of the artifact store under `uploads/`, written before the row: a row
-- always has its object. The sweep deletes the objects past their time, then their rows.
CREATE TABLE uploads (
    id text PRIMARY KEY,
    user_id text NOT NULL,
    content_type text NOT NULL,
    bytes bigint NOT NULL,
    width integer NOT NULL,
    height integer NOT NULL,
    sha256 text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX uploads_expiry ON uploads (expires_at);
