-- Fixes to 0007's admission and learning (review of issue #11). 0007's functions stay, for
-- workers not yet restarted; these overloads take what they lacked.
--
-- fallback_admit (+ p_next_resets): 0007 answered "stale calendar, ask again" (an over-quota
-- verdict) whenever the worker's next reset had passed by the database's clock: every admission
-- straddling a reset, and every one in the lag of a worker whose clock is behind, was refused
-- although the window was empty. The worker now also passes the reset after the first; this
-- function takes the first reset after its own clock.
--
-- fallback_observe (+ p_call): the provider's headers are its count when it received call
-- `p_call`; our window also holds the calls admitted after it. Lowering learnt use compares
-- with our count without those, so it never takes back use that is still real.

-- Admits one call to `p_provider` if its cooldown is over and every window given leaves room
-- (its own limits' and its pools', the i-th entry of each array describing one window, sorted in
-- the canonical order), in one round trip, under the provider row's lock and the windows' locks.
-- Otherwise returns when there will be room (`blocked_until_ms`, epoch ms, rounded up so a job
-- that waits never comes back a moment too early) and what blocks it: 'cooldown', 'requests',
-- 'tokens', or 'tokens_exceed_limit'. For calendar windows the worker passes the next reset
-- after the worker's clock (`p_first_resets`), the reset after that (`p_next_resets`), and after the
-- call's deadline (`p_leaves`); NULL for sliding ones.
CREATE OR REPLACE FUNCTION fallback_admit(
    p_provider text,
    p_kinds text[], p_scopes text[], p_measures text[], p_windows_ms bigint[], p_calendars text[],
    p_limits bigint[], p_first_resets timestamptz[], p_next_resets timestamptz[], p_leaves timestamptz[],
    p_tokens bigint, p_flight_ms bigint)
RETURNS TABLE (usage_id bigint, blocked_until_ms bigint, blocked_by text)
LANGUAGE plpgsql AS $$
DECLARE
    v_now      timestamptz := clock_timestamp();
    v_expires  timestamptz := v_now + p_flight_ms * interval '1 millisecond';
    v_n        int := coalesce(array_length(p_limits, 1), 0);
    v_cooldown timestamptz;
    v_used     bigint[];
    v_next     timestamptz[];
    v_amounts  bigint[];
    v_leaves   timestamptz[];
    v_first    timestamptz[];
    v_found    int;
    v_retired  bigint;
    v_free_at  timestamptz;
    v_cap      timestamptz;
    v_wait     timestamptz;
    v_by       text;
    v_id       bigint;
    r          record;
    i          int;
BEGIN
    SELECT cooldown_until INTO v_cooldown FROM provider_state WHERE provider = p_provider FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO provider_state (provider) VALUES (p_provider) ON CONFLICT (provider) DO NOTHING;
        SELECT cooldown_until INTO v_cooldown FROM provider_state WHERE provider = p_provider FOR UPDATE;
    END IF;
    IF v_cooldown > v_now THEN
        RETURN QUERY SELECT NULL::bigint, ceil(extract(epoch FROM v_cooldown) * 1000)::bigint, 'cooldown'::text;
        RETURN;
    END IF;

    FOR i IN 1 .. v_n LOOP
        IF p_measures[i] = 'tokens' AND p_tokens > p_limits[i] THEN
            RETURN QUERY SELECT NULL::bigint, NULL::bigint, 'tokens_exceed_limit'::text;
            RETURN;
        END IF;
        -- The first reset after this clock: the worker's first, or, when that has passed here
        -- (the worker's clock lags, or the admission waited), the one after it.
        v_first[i] := CASE WHEN p_first_resets[i] > v_now THEN p_first_resets[i] ELSE p_next_resets[i] END;
        -- A calendar a whole day stale (cannot happen with sane clocks): ask again at once.
        IF v_first[i] <= v_now THEN
            RETURN QUERY SELECT NULL::bigint, ceil(extract(epoch FROM v_now) * 1000)::bigint, p_measures[i];
            RETURN;
        END IF;
        v_amounts[i] := CASE WHEN p_measures[i] = 'requests' THEN 1 ELSE p_tokens END;
        -- A calendar call leaves no earlier than the first reset (greatest ignores NULLs).
        v_leaves[i] := coalesce(greatest(p_leaves[i], v_first[i]), v_expires + p_windows_ms[i] * interval '1 millisecond');
    END LOOP;

    -- Lock the windows in the given (canonical) order; create the missing ones first (in the same
    -- order) and look again.
    FOR attempt IN 1 .. 2 LOOP
        v_found := 0;
        FOR r IN SELECT t.ord, w.used, w.next_leave
                   FROM unnest(p_kinds, p_scopes, p_measures, p_windows_ms, p_calendars)
                        WITH ORDINALITY AS t(k, s, m, wm, c, ord)
                   JOIN quota_window w ON w.kind = t.k AND w.scope = t.s AND w.measure = t.m
                                      AND w.window_ms = t.wm AND w.calendar = t.c
                  ORDER BY t.ord FOR UPDATE OF w LOOP
            v_used[r.ord] := r.used;
            v_next[r.ord] := r.next_leave;
            v_found := v_found + 1;
        END LOOP;
        EXIT WHEN v_found = v_n;
        IF attempt = 2 THEN
            -- Another admission is creating one of them right now: ask again at once.
            RETURN QUERY SELECT NULL::bigint, ceil(extract(epoch FROM v_now) * 1000)::bigint, 'requests'::text;
            RETURN;
        END IF;
        INSERT INTO quota_window (kind, scope, measure, window_ms, calendar, used, next_leave)
        SELECT k, s, m, wm, c, 0, 'infinity'
          FROM unnest(p_kinds, p_scopes, p_measures, p_windows_ms, p_calendars) WITH ORDINALITY AS t(k, s, m, wm, c, ord)
         ORDER BY ord
        ON CONFLICT DO NOTHING;
    END LOOP;

    FOR i IN 1 .. v_n LOOP
        IF v_next[i] <= v_now THEN
            v_retired := fallback_retire(p_kinds[i], p_scopes[i], p_measures[i], p_windows_ms[i], p_calendars[i], v_now);
            v_used[i] := coalesce(v_retired, v_used[i]);
        END IF;
        IF v_used[i] + v_amounts[i] > p_limits[i] THEN
            v_cap := coalesce(v_first[i], v_now + p_windows_ms[i] * interval '1 millisecond');
            v_free_at := fallback_room_at(p_kinds[i], p_scopes[i], p_measures[i], p_windows_ms[i], p_calendars[i],
                                          v_used[i] + v_amounts[i] - p_limits[i], v_cap);
            IF v_wait IS NULL OR v_free_at > v_wait THEN
                v_wait := v_free_at;
                v_by := p_measures[i];
            END IF;
        END IF;
    END LOOP;
    IF v_wait IS NOT NULL THEN
        RETURN QUERY SELECT NULL::bigint, ceil(extract(epoch FROM v_wait) * 1000)::bigint, v_by;
        RETURN;
    END IF;

    v_id := nextval('quota_call_id');
    UPDATE quota_window w SET used = w.used + t.a, next_leave = least(w.next_leave, t.l)
      FROM unnest(p_kinds, p_scopes, p_measures, p_windows_ms, p_calendars, v_amounts, v_leaves)
           AS t(k, s, m, wm, c, a, l)
     WHERE w.kind = t.k AND w.scope = t.s AND w.measure = t.m AND w.window_ms = t.wm AND w.calendar = t.c;
    INSERT INTO quota_use (call_id, kind, scope, measure, window_ms, calendar, amount, leaves_at, first_reset)
    SELECT v_id, k, s, m, wm, c, a, l, f
      FROM unnest(p_kinds, p_scopes, p_measures, p_windows_ms, p_calendars, v_amounts, v_leaves, v_first)
           AS t(k, s, m, wm, c, a, l, f);
    RETURN QUERY SELECT v_id, NULL::bigint, NULL::text;
END
$$;

-- A provider's headers said `p_remaining` of a declared limit `p_declared` is left, in the
-- answer to call `p_call`: as 0007's, except that lowering discounts calls admitted after it.
CREATE OR REPLACE FUNCTION fallback_observe(p_kind text, p_scope text, p_measure text, p_window_ms bigint,
                                 p_calendar text, p_declared bigint, p_remaining bigint, p_leaves timestamptz,
                                            p_call bigint)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz := clock_timestamp();
    v_target bigint := greatest(p_declared - p_remaining, 0);
    v_used   bigint;
    v_next   timestamptz;
    v_excess bigint;
    v_take   bigint;
    r        record;
BEGIN
    INSERT INTO quota_window (kind, scope, measure, window_ms, calendar, used, next_leave)
    VALUES (p_kind, p_scope, p_measure, p_window_ms, p_calendar, 0, 'infinity') ON CONFLICT DO NOTHING;
    SELECT used, next_leave INTO v_used, v_next FROM quota_window
     WHERE kind = p_kind AND scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
       AND calendar = p_calendar FOR UPDATE;
    IF v_next <= v_now THEN
        v_used := coalesce(fallback_retire(p_kind, p_scope, p_measure, p_window_ms, p_calendar, v_now), v_used);
    END IF;
    IF v_target > v_used THEN
        INSERT INTO quota_use (call_id, kind, scope, measure, window_ms, calendar, amount, leaves_at, learnt)
        VALUES (0, p_kind, p_scope, p_measure, p_window_ms, p_calendar, v_target - v_used, p_leaves, true);
        UPDATE quota_window SET used = v_target, next_leave = least(next_leave, p_leaves)
         WHERE kind = p_kind AND scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
           AND calendar = p_calendar;
        RETURN v_target;
    END IF;
    -- The provider counted when it received call `p_call`: calls admitted after it (larger
    -- ids) are not in its figure. Take back only what our count without them exceeds; with
    -- the call unknown (NULL), nothing.
    SELECT v_used - coalesce(sum(amount), 0) - v_target INTO v_excess FROM quota_use
     WHERE kind = p_kind AND scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
       AND calendar = p_calendar AND NOT learnt AND call_id > p_call AND leaves_at > v_now;
    v_excess := coalesce(v_excess, 0);
    IF p_call IS NULL THEN
        v_excess := 0;
    END IF;
    FOR r IN SELECT id, amount FROM quota_use
              WHERE kind = p_kind AND scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
                AND calendar = p_calendar AND learnt AND leaves_at > v_now
              ORDER BY leaves_at DESC LOOP
        EXIT WHEN v_excess <= 0;
        v_take := least(r.amount, v_excess);
        IF v_take = r.amount THEN
            DELETE FROM quota_use WHERE id = r.id;
        ELSE
            UPDATE quota_use SET amount = amount - v_take WHERE id = r.id;
        END IF;
        v_excess := v_excess - v_take;
        v_used := v_used - v_take;
    END LOOP;
    UPDATE quota_window SET used = v_used
     WHERE kind = p_kind AND scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
       AND calendar = p_calendar;
    RETURN v_used;
END
$$;
