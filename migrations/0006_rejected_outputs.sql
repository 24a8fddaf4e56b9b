-- Answers that failed a job's checks (contract §7), per provider and reason, for `status`
-- (`/metrics` counts them per worker in `fallback_rejected_outputs_total`). A table of its own
-- rather than a column of `provider_state`: that row is the hot, LISTEN-announced cooldown
-- record, and a rejection is not a cooldown.
CREATE TABLE rejected_outputs (
    provider text NOT NULL,
    -- A stable label: empty, cut_off, content_filter, not_json, schema, too_short.
    reason   text NOT NULL,
    count    bigint NOT NULL DEFAULT 1,
    last_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, reason)
);
