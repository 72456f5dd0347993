-- Chain positions are allocated here, in the statement that queues a render, instead of by the
-- metadata service (which still owns what a chain is). `last` is the chain's last allocated
-- position: its length. Existing chains continue after their highest render.
CREATE TABLE chain_positions (
    chain_id text PRIMARY KEY,
    user_id text NOT NULL,
    last bigint NOT NULL
);
INSERT INTO chain_positions (chain_id, user_id, last)
SELECT chain_id, min(user_id), max(position) FROM renders WHERE chain_id <> '' GROUP BY chain_id;
CREATE INDEX chain_positions_user ON chain_positions (user_id);
