-- The render records the backend that ran it (the job row, which said so, goes when the job ends)
-- and the provider's own id of its request (a prediction id, an API request id), for support cases
-- with the provider. Set by the claim and by the end of each attempt; NULL for renders of before.
ALTER TABLE renders ADD COLUMN backend text;
ALTER TABLE renders ADD COLUMN provider_request_id text;
