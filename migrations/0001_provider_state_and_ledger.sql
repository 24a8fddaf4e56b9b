-- Shared provider state (contract §6): one row per provider, the truth every worker reads.
CREATE TABLE provider_state (
    provider                  text PRIMARY KEY,
    -- No call before this instant; only ever moved forward.
    cooldown_until            timestamptz NOT NULL DEFAULT 'epoch',
    cooldown_reason           text,
    cooldown_detail           text,
    -- 5xx answers in a row, across all workers; a run opens the circuit.
    consecutive_server_errors integer NOT NULL DEFAULT 0,
    last_error                text,
    last_error_at             timestamptz,
    updated_at                timestamptz NOT NULL DEFAULT now()
);

-- The idempotency ledger (contract §4): a redelivered job whose result is stored is answered
-- from here with no provider call.
CREATE TABLE job_results (
    job_key     text PRIMARY KEY,
    -- Receipts of this job; a job that keeps crashing workers becomes poison.
    deliveries  integer NOT NULL DEFAULT 1,
    result      jsonb,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    answered_at timestamptz
);

CREATE INDEX job_results_first_seen ON job_results (first_seen);
