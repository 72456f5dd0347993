-- The metadata service's SQL, one named block per query (loaded by store.py).
-- Tables are schema-qualified: pooled connections keep the default search_path.

-- name: insert_user
INSERT INTO metadata.users (name) VALUES (%(name)s)
RETURNING id, name, created_at;

-- name: insert_user_if_absent
INSERT INTO metadata.users (name) VALUES (%(name)s)
ON CONFLICT (name) DO NOTHING
RETURNING id, name, created_at;

-- name: user_by_name
SELECT id, name, created_at FROM metadata.users WHERE name = %(name)s;

-- name: insert_api_key
INSERT INTO metadata.api_keys (user_id, key_hash, prefix)
VALUES (%(user_id)s, %(key_hash)s, %(prefix)s)
RETURNING id, user_id, prefix, created_at, revoked_at;

-- name: api_keys_of_user
SELECT id, user_id, prefix, created_at, revoked_at
FROM metadata.api_keys WHERE user_id = %(user_id)s
ORDER BY created_at, id;

-- name: api_key_by_id
SELECT id, user_id, prefix, created_at, revoked_at FROM metadata.api_keys WHERE id = %(id)s;

-- name: api_key_by_hash
SELECT id, user_id, prefix, created_at, revoked_at FROM metadata.api_keys WHERE key_hash = %(key_hash)s;

-- name: revoke_api_key
UPDATE metadata.api_keys SET revoked_at = now()
WHERE id = %(id)s AND revoked_at IS NULL
RETURNING id, user_id, prefix, created_at, revoked_at;

-- name: reinstate_api_key
UPDATE metadata.api_keys SET revoked_at = NULL
WHERE id = %(id)s
RETURNING id, user_id, prefix, created_at, revoked_at;

-- name: authenticate
SELECT u.id, u.name, u.created_at, k.id AS key_id
FROM metadata.api_keys k JOIN metadata.users u ON u.id = k.user_id
WHERE k.key_hash = %(key_hash)s AND k.revoked_at IS NULL;

-- name: insert_project
-- The project and its default chain reference each other; the deferred foreign key on
-- default_chain_id lets one statement insert both.
WITH project AS (
    INSERT INTO metadata.projects (user_id, slug, name, default_chain_id)
    VALUES (%(user_id)s, %(slug)s, %(name)s, gen_random_uuid())
    RETURNING id, user_id, slug, name, default_chain_id, created_at
), chain AS (
    INSERT INTO metadata.chains (id, project_id, name, is_default)
    SELECT default_chain_id, id, 'default', true FROM project
)
SELECT id, user_id, slug, name, default_chain_id, created_at FROM project;

-- name: project_by_slug
SELECT id, user_id, slug, name, default_chain_id, created_at
FROM metadata.projects WHERE user_id = %(user_id)s AND slug = %(slug)s;

-- name: list_projects
SELECT id, user_id, slug, name, default_chain_id, created_at
FROM metadata.projects
WHERE user_id = %(user_id)s AND (created_at, id) > (%(after_at)s, %(after_id)s)
ORDER BY created_at, id
LIMIT %(limit)s;

-- name: insert_chain
INSERT INTO metadata.chains (project_id, name)
SELECT id, %(name)s FROM metadata.projects WHERE user_id = %(user_id)s AND slug = %(slug)s
RETURNING id, project_id, %(slug)s::text AS project, name, is_default, length, created_at;

-- name: chain_by_id
SELECT c.id, c.project_id, p.slug AS project, c.name, c.is_default, c.length, c.created_at
FROM metadata.chains c JOIN metadata.projects p ON p.id = c.project_id
WHERE p.user_id = %(user_id)s AND p.slug = %(slug)s AND c.id = %(id)s;

-- name: list_chains
SELECT c.id, c.project_id, p.slug AS project, c.name, c.is_default, c.length, c.created_at
FROM metadata.projects p JOIN metadata.chains c ON c.project_id = p.id
WHERE p.user_id = %(user_id)s AND p.slug = %(slug)s AND (c.created_at, c.id) > (%(after_at)s, %(after_id)s)
ORDER BY c.created_at, c.id
LIMIT %(limit)s;

-- name: insert_rule
INSERT INTO metadata.rules (project_id, chain_id, text, active)
SELECT p.id, %(chain_id)s::uuid, %(text)s, %(active)s
FROM metadata.projects p
WHERE p.user_id = %(user_id)s AND p.slug = %(slug)s
  AND (%(chain_id)s::uuid IS NULL OR EXISTS (
      SELECT 1 FROM metadata.chains c WHERE c.id = %(chain_id)s::uuid AND c.project_id = p.id))
RETURNING id, project_id, %(slug)s::text AS project, chain_id, text, active, created_at;

-- name: list_rules
SELECT r.id, r.project_id, p.slug AS project, r.chain_id, r.text, r.active, r.created_at
FROM metadata.projects p JOIN metadata.rules r ON r.project_id = p.id
WHERE p.user_id = %(user_id)s AND p.slug = %(slug)s AND (r.created_at, r.id) > (%(after_at)s, %(after_id)s)
ORDER BY r.created_at, r.id
LIMIT %(limit)s;

-- name: update_rule
UPDATE metadata.rules r
SET text = coalesce(%(text)s::text, r.text), active = coalesce(%(active)s::boolean, r.active)
FROM metadata.projects p
WHERE p.id = r.project_id AND p.user_id = %(user_id)s AND p.slug = %(slug)s AND r.id = %(id)s
RETURNING r.id, r.project_id, p.slug AS project, r.chain_id, r.text, r.active, r.created_at;

-- name: delete_rule
DELETE FROM metadata.rules r
USING metadata.projects p
WHERE p.id = r.project_id AND p.user_id = %(user_id)s AND p.slug = %(slug)s AND r.id = %(id)s
RETURNING r.id;

-- name: resolve_render
-- What a render of the project (slug or id) and chain (the default one when none is named) is
-- made with, in one statement and so one snapshot: the project, the chain, its active rules, and
-- the change feed's last seq, every change up to which the answer reflects (writers of the feed
-- commit in seq order). No project row: unknown project. A project row without chain columns:
-- unknown chain.
WITH project AS (
    SELECT id, user_id, slug, name, default_chain_id, created_at
    FROM metadata.projects
    WHERE user_id = %(user_id)s AND (slug = %(project)s OR id = %(project_id)s)
    LIMIT 1
), chain AS (
    SELECT c.id, c.name, c.is_default, c.length, c.created_at
    FROM metadata.chains c JOIN project p ON c.project_id = p.id
    WHERE c.id = coalesce(%(chain_id)s::uuid, p.default_chain_id)
)
SELECT p.id, p.user_id, p.slug, p.name, p.default_chain_id, p.created_at,
       c.id AS chain_id, c.name AS chain_name, c.is_default, c.length,
       c.created_at AS chain_created_at, r.rule_ids, r.rule_texts,
       (SELECT coalesce(max(seq), 0) FROM metadata.changes) AS change_seq
FROM project p
LEFT JOIN chain c ON true
LEFT JOIN LATERAL (
    SELECT array_agg(id ORDER BY created_at, id) AS rule_ids,
           array_agg(text ORDER BY created_at, id) AS rule_texts
    FROM metadata.rules
    WHERE project_id = p.id AND active AND (chain_id IS NULL OR chain_id = c.id)
) r ON c.id IS NOT NULL;

-- name: lock_changes
SELECT pg_advisory_xact_lock(%(key)s);

-- name: insert_changes
WITH inserted AS (
    INSERT INTO metadata.changes (entity, action, entity_id, user_id)
    SELECT * FROM unnest(%(entities)s::text[], %(actions)s::text[], %(entity_ids)s::uuid[], %(user_ids)s::uuid[])
    RETURNING seq
)
SELECT max(seq), pg_notify('metadata_changes', max(seq)::text) FROM inserted;

-- name: changes_after
SELECT seq, entity, action, entity_id, user_id, at
FROM metadata.changes WHERE seq > %(after)s
ORDER BY seq
LIMIT %(limit)s;

-- name: last_change_seq
SELECT coalesce(max(seq), 0) FROM metadata.changes;

-- name: prune_changes
DELETE FROM metadata.changes WHERE at < now() - %(retention)s::interval;

-- name: listen
LISTEN metadata_changes;

-- name: ping
SELECT 1;
