-- Shared quota accounting (contract §6 `limits`): one row per request sent to a provider with
-- limits. A request occupies every window from when it is sent until its answer arrives
-- (`done_at`), so latency can never squeeze two windows' worth of calls together.
CREATE TABLE provider_usage (
    id         bigserial PRIMARY KEY,
    provider   text NOT NULL,
    sent_at    timestamptz NOT NULL,
    -- NULL while the request is in flight.
    done_at    timestamptz,
    -- Upper bound for a request whose worker died before recording the answer.
    expires_at timestamptz NOT NULL,
    -- Estimated before the call (prompt + max_tokens), corrected from `usage` after it.
    tokens     bigint NOT NULL DEFAULT 0
);

CREATE INDEX provider_usage_window ON provider_usage (provider, (coalesce(done_at, expires_at)));

-- Admits one request to `p_provider` if its cooldown is over and every limit leaves room, in one
-- round trip and under the provider row's lock (so concurrent workers cannot both take the last
-- slot). Otherwise returns when the provider will have room (`blocked_until_ms`, epoch ms) and
-- what blocks it: 'cooldown', 'requests', 'tokens', or 'tokens_exceed_limit' (the request alone
-- is larger than a token limit: it can never be sent).
CREATE FUNCTION fallback_acquire(
    p_provider text,
    p_request_limits bigint[], p_request_windows_ms bigint[],
    p_token_limits bigint[], p_token_windows_ms bigint[],
    p_tokens bigint, p_flight_ms bigint)
RETURNS TABLE (usage_id bigint, blocked_until_ms bigint, blocked_by text)
LANGUAGE plpgsql AS $$
DECLARE
    v_now      timestamptz := clock_timestamp();
    v_cooldown timestamptz;
    v_window   interval;
    v_count    bigint;
    v_sum      bigint;
    v_free_at  timestamptz;
    v_wait     timestamptz;
    v_by       text;
    v_id       bigint;
    i          int;
BEGIN
    INSERT INTO provider_state (provider) VALUES (p_provider) ON CONFLICT (provider) DO NOTHING;
    SELECT cooldown_until INTO v_cooldown FROM provider_state WHERE provider = p_provider FOR UPDATE;
    IF v_cooldown > v_now THEN
        RETURN QUERY SELECT NULL::bigint, (extract(epoch FROM v_cooldown) * 1000)::bigint, 'cooldown'::text;
        RETURN;
    END IF;

    FOR i IN 1 .. coalesce(array_length(p_request_limits, 1), 0) LOOP
        v_window := p_request_windows_ms[i] * interval '1 millisecond';
        SELECT count(*) INTO v_count FROM provider_usage
         WHERE provider = p_provider AND coalesce(done_at, expires_at) > v_now - v_window;
        IF v_count >= p_request_limits[i] THEN
            -- Room comes when enough of the occupying requests have left the window; a request
            -- still in flight leaves it no earlier than one window from now.
            SELECT least(coalesce(done_at, expires_at), v_now) + v_window INTO v_free_at
              FROM provider_usage
             WHERE provider = p_provider AND coalesce(done_at, expires_at) > v_now - v_window
             ORDER BY least(coalesce(done_at, expires_at), v_now), id
            OFFSET v_count - p_request_limits[i] LIMIT 1;
            IF v_wait IS NULL OR v_free_at > v_wait THEN
                v_wait := v_free_at;
                v_by := 'requests';
            END IF;
        END IF;
    END LOOP;

    FOR i IN 1 .. coalesce(array_length(p_token_limits, 1), 0) LOOP
        IF p_tokens > p_token_limits[i] THEN
            RETURN QUERY SELECT NULL::bigint, NULL::bigint, 'tokens_exceed_limit'::text;
            RETURN;
        END IF;
        v_window := p_token_windows_ms[i] * interval '1 millisecond';
        SELECT coalesce(sum(tokens), 0) INTO v_sum FROM provider_usage
         WHERE provider = p_provider AND coalesce(done_at, expires_at) > v_now - v_window;
        IF v_sum + p_tokens > p_token_limits[i] THEN
            SELECT t.free_at INTO v_free_at FROM (
                SELECT least(coalesce(done_at, expires_at), v_now) + v_window AS free_at,
                       sum(tokens) OVER (ORDER BY least(coalesce(done_at, expires_at), v_now), id) AS freed
                  FROM provider_usage
                 WHERE provider = p_provider AND coalesce(done_at, expires_at) > v_now - v_window) t
             WHERE t.freed >= v_sum + p_tokens - p_token_limits[i]
             ORDER BY t.free_at
             LIMIT 1;
            IF v_wait IS NULL OR v_free_at > v_wait THEN
                v_wait := v_free_at;
                v_by := 'tokens';
            END IF;
        END IF;
    END LOOP;

    IF v_wait IS NOT NULL THEN
        RETURN QUERY SELECT NULL::bigint, (extract(epoch FROM v_wait) * 1000)::bigint, v_by;
        RETURN;
    END IF;
    INSERT INTO provider_usage (provider, sent_at, expires_at, tokens)
    VALUES (p_provider, v_now, v_now + p_flight_ms * interval '1 millisecond', p_tokens)
    RETURNING id INTO v_id;
    RETURN QUERY SELECT v_id, NULL::bigint, NULL::text;
END
$$;
