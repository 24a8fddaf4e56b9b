-- Admission whose cost does not grow with the calls in the window (issue #9).
--
-- The strict rule is unchanged: a call occupies every window from when it is sent until its answer
-- arrives, and never more than a limit's `requests` calls (or `tokens` tokens) occupy any window of
-- length `per`. Instead of counting the calls in the window at every admission, each limit keeps
-- a running total (`quota_window.used`) of the calls that have not yet left it, and each call
-- leaves a row per limit (`quota_use`) saying when it leaves (`leaves_at` = end of occupancy +
-- window; while in flight, its deadline + window). An admission first retires the rows that have
-- left (each row is retired once: amortized O(1)), then compares the total with the limit.

CREATE TABLE quota_window (
    scope     text   NOT NULL,          -- the provider whose limit this is
    measure   text   NOT NULL,          -- 'requests' | 'tokens'
    window_ms bigint NOT NULL,
    used      bigint NOT NULL DEFAULT 0, -- calls (or tokens) not yet retired from this window
    PRIMARY KEY (scope, measure, window_ms)
);

CREATE TABLE quota_use (
    id        bigserial PRIMARY KEY,
    call_id   bigint NOT NULL,
    scope     text   NOT NULL,
    measure   text   NOT NULL,
    window_ms bigint NOT NULL,
    amount    bigint NOT NULL,
    leaves_at timestamptz NOT NULL
);
CREATE INDEX quota_use_leaving ON quota_use (scope, measure, window_ms, leaves_at);
CREATE INDEX quota_use_call ON quota_use (call_id);

CREATE SEQUENCE quota_call_id;

-- Counts `p_amount` of a call in one window until `p_leaves_at`.
CREATE FUNCTION fallback_add_use(p_call bigint, p_scope text, p_measure text, p_window_ms bigint,
                                 p_amount bigint, p_leaves_at timestamptz)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO quota_window AS w (scope, measure, window_ms, used)
    VALUES (p_scope, p_measure, p_window_ms, p_amount)
    ON CONFLICT (scope, measure, window_ms) DO UPDATE SET used = w.used + EXCLUDED.used;
    INSERT INTO quota_use (call_id, scope, measure, window_ms, amount, leaves_at)
    VALUES (p_call, p_scope, p_measure, p_window_ms, p_amount, p_leaves_at);
$$;

-- Retires what has left one window and returns what is still in it.
CREATE FUNCTION fallback_window_used(p_scope text, p_measure text, p_window_ms bigint, p_now timestamptz)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_gone bigint;
    v_used bigint;
BEGIN
    WITH gone AS (
        DELETE FROM quota_use
         WHERE scope = p_scope AND measure = p_measure AND window_ms = p_window_ms AND leaves_at <= p_now
        RETURNING amount)
    SELECT coalesce(sum(amount), 0) INTO v_gone FROM gone;
    UPDATE quota_window SET used = greatest(used - v_gone, 0)
     WHERE scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
    RETURNING used INTO v_used;
    RETURN coalesce(v_used, 0);
END
$$;

-- When `p_excess` of a window's use will have left it: the leaving time of the row at which the
-- rows, in leaving order, add up to `p_excess` (read in index order, only as far as needed).
-- Rows still in flight (they leave after p_now + window) may answer at any moment: they count as
-- leaving one window from now.
CREATE FUNCTION fallback_room_at(p_scope text, p_measure text, p_window_ms bigint, p_now timestamptz,
                                 p_excess bigint)
RETURNS timestamptz LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_window interval := p_window_ms * interval '1 millisecond';
    v_freed  bigint := 0;
    r        record;
BEGIN
    FOR r IN SELECT leaves_at, amount FROM quota_use
              WHERE scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
              ORDER BY leaves_at LOOP
        v_freed := v_freed + r.amount;
        IF v_freed >= p_excess THEN
            RETURN least(r.leaves_at, p_now + v_window);
        END IF;
    END LOOP;
    RETURN p_now + v_window;
END
$$;

-- Admits one call to `p_provider` if its cooldown is over and every limit leaves room, in one
-- round trip and under the provider row's lock (so concurrent workers cannot both take the last
-- slot). Otherwise returns when the provider will have room (`blocked_until_ms`, epoch ms) and
-- what blocks it: 'cooldown', 'requests', 'tokens', or 'tokens_exceed_limit'. Times are rounded
-- up to the millisecond, so a job that waits for room never comes back a moment too early.
-- Windows are locked in the order given (the caller sorts them), as is the provider row first.
CREATE OR REPLACE FUNCTION fallback_acquire(
    p_provider text,
    p_request_limits bigint[], p_request_windows_ms bigint[],
    p_token_limits bigint[], p_token_windows_ms bigint[],
    p_tokens bigint, p_flight_ms bigint)
RETURNS TABLE (usage_id bigint, blocked_until_ms bigint, blocked_by text)
LANGUAGE plpgsql AS $$
DECLARE
    v_now      timestamptz := clock_timestamp();
    v_expires  timestamptz := v_now + p_flight_ms * interval '1 millisecond';
    v_cooldown timestamptz;
    v_used     bigint;
    v_free_at  timestamptz;
    v_wait     timestamptz;
    v_by       text;
    v_id       bigint;
    i          int;
BEGIN
    INSERT INTO provider_state (provider) VALUES (p_provider) ON CONFLICT (provider) DO NOTHING;
    SELECT cooldown_until INTO v_cooldown FROM provider_state WHERE provider = p_provider FOR UPDATE;
    IF v_cooldown > v_now THEN
        RETURN QUERY SELECT NULL::bigint, ceil(extract(epoch FROM v_cooldown) * 1000)::bigint, 'cooldown'::text;
        RETURN;
    END IF;

    FOR i IN 1 .. coalesce(array_length(p_token_limits, 1), 0) LOOP
        IF p_tokens > p_token_limits[i] THEN
            RETURN QUERY SELECT NULL::bigint, NULL::bigint, 'tokens_exceed_limit'::text;
            RETURN;
        END IF;
    END LOOP;

    FOR i IN 1 .. coalesce(array_length(p_request_limits, 1), 0) LOOP
        v_used := fallback_window_used(p_provider, 'requests', p_request_windows_ms[i], v_now);
        IF v_used + 1 > p_request_limits[i] THEN
            v_free_at := fallback_room_at(p_provider, 'requests', p_request_windows_ms[i], v_now,
                                          v_used + 1 - p_request_limits[i]);
            IF v_wait IS NULL OR v_free_at > v_wait THEN
                v_wait := v_free_at;
                v_by := 'requests';
            END IF;
        END IF;
    END LOOP;

    FOR i IN 1 .. coalesce(array_length(p_token_limits, 1), 0) LOOP
        v_used := fallback_window_used(p_provider, 'tokens', p_token_windows_ms[i], v_now);
        IF v_used + p_tokens > p_token_limits[i] THEN
            v_free_at := fallback_room_at(p_provider, 'tokens', p_token_windows_ms[i], v_now,
                                          v_used + p_tokens - p_token_limits[i]);
            IF v_wait IS NULL OR v_free_at > v_wait THEN
                v_wait := v_free_at;
                v_by := 'tokens';
            END IF;
        END IF;
    END LOOP;

    IF v_wait IS NOT NULL THEN
        RETURN QUERY SELECT NULL::bigint, ceil(extract(epoch FROM v_wait) * 1000)::bigint, v_by;
        RETURN;
    END IF;
    v_id := nextval('quota_call_id');
    FOR i IN 1 .. coalesce(array_length(p_request_limits, 1), 0) LOOP
        PERFORM fallback_add_use(v_id, p_provider, 'requests', p_request_windows_ms[i], 1,
                                 v_expires + p_request_windows_ms[i] * interval '1 millisecond');
    END LOOP;
    FOR i IN 1 .. coalesce(array_length(p_token_limits, 1), 0) LOOP
        PERFORM fallback_add_use(v_id, p_provider, 'tokens', p_token_windows_ms[i], p_tokens,
                                 v_expires + p_token_windows_ms[i] * interval '1 millisecond');
    END LOOP;
    RETURN QUERY SELECT v_id, NULL::bigint, NULL::text;
END
$$;

-- The answer to call `p_call` arrived: it leaves each window one window from now, and its token
-- estimate becomes the provider's count (`p_tokens`, when known).
CREATE FUNCTION fallback_finish(p_call bigint, p_tokens bigint)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
    r     record;
BEGIN
    FOR r IN SELECT id, scope, measure, window_ms, amount FROM quota_use WHERE call_id = p_call FOR UPDATE LOOP
        IF r.measure = 'tokens' AND p_tokens IS NOT NULL AND p_tokens <> r.amount THEN
            UPDATE quota_window SET used = greatest(used + p_tokens - r.amount, 0)
             WHERE scope = r.scope AND measure = r.measure AND window_ms = r.window_ms;
            UPDATE quota_use SET amount = p_tokens WHERE id = r.id;
        END IF;
        UPDATE quota_use SET leaves_at = least(leaves_at, v_now + r.window_ms * interval '1 millisecond')
         WHERE id = r.id;
    END LOOP;
END
$$;

-- The per-call table of migration 0002 is no longer written or read. Calls it counted are not
-- carried over (it did not record which limits they counted against): after this migration each
-- window starts empty, once.
DROP TABLE provider_usage;
