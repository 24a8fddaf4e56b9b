-- The ledger binds each idempotency key to the job it was first used for (contract §4): a
-- `message_id` reused on another job must never be given that job's result.
ALTER TABLE job_results ADD COLUMN fingerprint text;

-- Results are stored as the exact text that was published: jsonb refuses valid JSON such as
-- "\u0000" inside a string, and one such completion must not make a result unstorable.
ALTER TABLE job_results ALTER COLUMN result TYPE text USING result::text;

-- Internal failures (a panic, an error the code did not foresee) per delivery key: a message
-- that keeps failing is answered `internal_error` and dead-lettered after `max_deliveries`.
CREATE TABLE delivery_failures (
    delivery_key text PRIMARY KEY,
    failures     integer NOT NULL DEFAULT 1,
    last_reason  text,
    last_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX delivery_failures_last_at ON delivery_failures (last_at);

-- A secret every worker shares through the database: it authenticates the state a parked job
-- carries in its headers, so a publisher cannot forge it. Created once by the first worker.
CREATE TABLE service_secret (
    id     integer PRIMARY KEY CHECK (id = 1),
    secret bytea NOT NULL
);

-- Workers seen alive recently: while the database is unreachable each worker enforces every
-- limit locally at limit / (workers last seen alive).
CREATE TABLE worker_heartbeat (
    worker  text PRIMARY KEY,
    seen_at timestamptz NOT NULL DEFAULT now()
);
