-- The seed app's tables, in a schema of their own (`baseline`), as production kept them.
CREATE SCHEMA IF NOT EXISTS baseline;
CREATE TABLE IF NOT EXISTS baseline.projects (
    id bigserial PRIMARY KEY,
    slug text NOT NULL UNIQUE,
    name text NOT NULL
);
CREATE TABLE IF NOT EXISTS baseline.chains (
    id bigserial PRIMARY KEY,
    project_id bigint NOT NULL REFERENCES baseline.projects (id),
    name text NOT NULL,
    is_default boolean NOT NULL DEFAULT false,
    length bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS baseline.rules (
    id bigserial PRIMARY KEY,
    project_id bigint NOT NULL REFERENCES baseline.projects (id),
    text text NOT NULL,
    active boolean NOT NULL DEFAULT true
);
CREATE TABLE IF NOT EXISTS baseline.renders (
    id bigserial PRIMARY KEY,
    chain_id bigint NOT NULL REFERENCES baseline.chains (id),
    position bigint NOT NULL,
    prompt text NOT NULL,
    output_path text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
