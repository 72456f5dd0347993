-- A job's backend is the one its worker runs it with, stamped when the job is claimed (the worker's
-- settings choose one per kind); until then it has none.
ALTER TABLE jobs ALTER COLUMN backend DROP DEFAULT, ALTER COLUMN backend DROP NOT NULL;
