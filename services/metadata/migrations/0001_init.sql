-- The metadata schema: users and their API keys, projects, chains, rules, and the change feed.
-- Applied by shared.db.migrate with search_path set to the `metadata` schema.

CREATE TABLE users (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL CONSTRAINT users_name_key UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Only a SHA-256 of each key is kept; `prefix` lets a person recognise a key in a list.
CREATE TABLE api_keys (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key_hash    bytea NOT NULL CONSTRAINT api_keys_key_hash_key UNIQUE,
    prefix      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_user_idx ON api_keys (user_id, created_at, id);

CREATE TABLE projects (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id           uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    slug              text NOT NULL CHECK (slug ~ '^[a-z0-9][a-z0-9-]{1,62}$'),
    name              text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    default_chain_id  uuid NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT projects_user_slug_key UNIQUE (user_id, slug)
);
-- Keyset pagination of a user's projects.
CREATE INDEX projects_user_page_idx ON projects (user_id, created_at, id);

-- `length` is the last allocated position: PrepareRender bumps it with one UPDATE, whose row
-- lock serializes concurrent allocations on the same chain.
CREATE TABLE chains (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id  uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name        text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    is_default  boolean NOT NULL DEFAULT false,
    length      bigint NOT NULL DEFAULT 0 CHECK (length >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX chains_project_page_idx ON chains (project_id, created_at, id);
CREATE UNIQUE INDEX chains_one_default_idx ON chains (project_id) WHERE is_default;

-- A project and its default chain point at each other; both rows are inserted by one statement.
ALTER TABLE projects ADD CONSTRAINT projects_default_chain_fkey
    FOREIGN KEY (default_chain_id) REFERENCES chains (id) DEFERRABLE INITIALLY DEFERRED;

CREATE TABLE rules (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id  uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    chain_id    uuid REFERENCES chains (id) ON DELETE CASCADE,
    text        text NOT NULL CHECK (char_length(text) BETWEEN 1 AND 2000),
    active      boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rules_project_page_idx ON rules (project_id, created_at, id);

-- The change feed. Writers take a transaction-scoped advisory lock before allocating `seq`,
-- so seq order is commit order (see storage.py: record_changes).
CREATE TABLE changes (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entity     text NOT NULL,
    action     text NOT NULL,
    entity_id  uuid NOT NULL,
    user_id    uuid NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX changes_at_idx ON changes (at);
