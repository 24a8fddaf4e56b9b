-- Pools, calendar windows, use learnt from providers' headers, and admission in a constant number
-- of statements (issues #11 and #9).
--
-- Scopes. A window belongs to a scope: a provider's own limits (kind 'provider', scope = the
-- provider's name, as in 0005) or a shared pool's (kind 'pool', scope = the `[[quotas]]` name).
-- The kind is a column, not a prefix of the name, so no provider name can ever collide with a
-- pool's.
--
-- Windows. A sliding window (`calendar` = '') holds never more than the limit in any interval of
-- `window_ms`: a call leaves it `window_ms` after its occupancy (sent .. answered; in flight: its
-- deadline) ends. A calendar window (`calendar` = the reset as configured, "00:00 UTC") counts a
-- call in every calendar day its occupancy touches, and the call leaves it at the first reset
-- after its occupancy ends. The reset instants are computed by the worker (the bundled zone
-- database, DST as the zone does it) and passed in: `first_reset` (the first reset after the call
-- was sent) and `leaves_at` (the first reset after its deadline). A calendar window never shares
-- a key with the sliding 1d window of the same scope (the `calendar` column differs).
--
-- Running totals. `quota_window.used` is what the window's `quota_use` rows add up to; each row
-- says when it leaves (`leaves_at`). `next_leave` is the earliest `leaves_at` of the window's rows
-- ('infinity' when none): an admission retires rows only when `now >= next_leave`, so the common
-- admission is a lock, an update and an insert, whatever the number of calls in the window.
--
-- Learnt use (`learnt` rows, call_id 0): what a provider's rate-limit headers said it counts and
-- our calls do not explain. It counts in its one window until it leaves, and is the only use an
-- observation may take back (real calls are never forgotten).
--
-- Locks. Admission locks the provider's row, then every window it touches (its own and its
-- pools') in one canonical order: (kind, scope, measure, window_ms, calendar) in byte order (the
-- worker sorts them; SQL orders with COLLATE "C" where it locks several). Two providers sharing a
-- pool therefore never wait on each other in a cycle. Other writers take one window at a time,
-- or several in that same order.

ALTER TABLE quota_window
    ADD COLUMN kind       text        NOT NULL DEFAULT 'provider',
    ADD COLUMN calendar   text        NOT NULL DEFAULT '',
    ADD COLUMN next_leave timestamptz NOT NULL DEFAULT '-infinity';
ALTER TABLE quota_window DROP CONSTRAINT quota_window_pkey;
ALTER TABLE quota_window ADD PRIMARY KEY (kind, scope, measure, window_ms, calendar);

ALTER TABLE quota_use
    ADD COLUMN kind        text        NOT NULL DEFAULT 'provider',
    ADD COLUMN calendar    text        NOT NULL DEFAULT '',
    ADD COLUMN first_reset timestamptz,
    ADD COLUMN learnt      boolean     NOT NULL DEFAULT false;
DROP INDEX quota_use_leaving;
CREATE INDEX quota_use_leaving ON quota_use (kind, scope, measure, window_ms, calendar, leaves_at);

-- 0005's functions know only provider-scoped sliding windows.
DROP FUNCTION fallback_acquire(text, bigint[], bigint[], bigint[], bigint[], bigint, bigint);
DROP FUNCTION fallback_add_use(bigint, text, text, bigint, bigint, timestamptz);
DROP FUNCTION fallback_window_used(text, text, bigint, timestamptz);
DROP FUNCTION fallback_room_at(text, text, bigint, timestamptz, bigint);
DROP FUNCTION fallback_finish(bigint, bigint);

-- Retires what has left one window (only when something is due) and returns what is still in
-- it. The caller holds the window's row lock, or takes it here.
CREATE FUNCTION fallback_retire(p_kind text, p_scope text, p_measure text, p_window_ms bigint,
                                p_calendar text, p_now timestamptz)
RETURNS bigint LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM quota_use
         WHERE kind = p_kind AND scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
           AND calendar = p_calendar AND leaves_at <= p_now
        RETURNING amount)
    UPDATE quota_window
       SET used = greatest(used - (SELECT coalesce(sum(amount), 0) FROM gone), 0),
           -- The DELETE is not visible to this statement: skip the rows it removes.
           next_leave = coalesce((SELECT min(leaves_at) FROM quota_use
                                   WHERE kind = p_kind AND scope = p_scope AND measure = p_measure
                                     AND window_ms = p_window_ms AND calendar = p_calendar
                                     AND leaves_at > p_now), 'infinity')
     WHERE kind = p_kind AND scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
       AND calendar = p_calendar AND next_leave <= p_now
    RETURNING used;
$$;

-- When `p_excess` of a window's use will have left it: the leaving time of the row at which the
-- rows, in leaving order, add up to `p_excess` (read in index order, only as far as needed).
-- Rows still in flight may answer at any moment: they leave no later than `p_cap` (a call that
-- ends now leaves then: now + window, or the next reset).
CREATE FUNCTION fallback_room_at(p_kind text, p_scope text, p_measure text, p_window_ms bigint,
                                 p_calendar text, p_excess bigint, p_cap timestamptz)
RETURNS timestamptz LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_freed bigint := 0;
    r       record;
BEGIN
    FOR r IN SELECT leaves_at, amount FROM quota_use
              WHERE kind = p_kind AND scope = p_scope AND measure = p_measure
                AND window_ms = p_window_ms AND calendar = p_calendar
              ORDER BY leaves_at LOOP
        v_freed := v_freed + r.amount;
        IF v_freed >= p_excess THEN
            RETURN least(r.leaves_at, p_cap);
        END IF;
    END LOOP;
    RETURN p_cap;
END
$$;

-- Admits one call to `p_provider` if its cooldown is over and every window given leaves room
-- (its own limits' and its pools', the i-th entry of each array describing one window, sorted in
-- the canonical order), in one round trip, under the provider row's lock and the windows' locks.
-- Otherwise returns when there will be room (`blocked_until_ms`, epoch ms, rounded up so a job
-- that waits never comes back a moment too early) and what blocks it: 'cooldown', 'requests',
-- 'tokens', or 'tokens_exceed_limit'. For calendar windows the worker passes the next reset
-- after the worker's clock (`p_first_resets`), the reset after that (`p_next_resets`), and after the
-- call's deadline (`p_leaves`); NULL for sliding ones.
CREATE FUNCTION fallback_admit(
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

-- The answer to call `p_call` arrived: it leaves each sliding window one window from now, and
-- each calendar window at the first reset after now (`first_reset` when it came before that
-- reset, else the reset after its deadline, as recorded); its token estimate becomes the
-- provider's count (`p_tokens`, when known). Its windows are locked first, in canonical order.
--
-- A finish that only frees room (the call leaves earlier, fewer tokens than estimated) commits
-- without waiting for its WAL flush (`synchronous_commit = off` for this transaction): were it
-- lost in a database crash, the call would merely count longer than it needed to, never less,
-- and the flush it saves is most of what a finish costs. A finish that raises a token count
-- commits as durably as an admission.
CREATE FUNCTION fallback_finish(p_call bigint, p_tokens bigint)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz := clock_timestamp();
    v_raised bigint;
BEGIN
    PERFORM 1 FROM quota_window w
     WHERE (w.kind, w.scope, w.measure, w.window_ms, w.calendar) IN
           (SELECT kind, scope, measure, window_ms, calendar FROM quota_use WHERE call_id = p_call)
     ORDER BY w.kind COLLATE "C", w.scope COLLATE "C", w.measure COLLATE "C", w.window_ms, w.calendar COLLATE "C"
       FOR UPDATE OF w;
    WITH changed AS (
        UPDATE quota_use u
           SET leaves_at = CASE
                   WHEN u.calendar = '' THEN least(u.leaves_at, v_now + u.window_ms * interval '1 millisecond')
                   WHEN u.first_reset IS NOT NULL AND v_now < u.first_reset THEN least(u.leaves_at, u.first_reset)
                   ELSE u.leaves_at END,
               amount = CASE WHEN u.measure = 'tokens' AND p_tokens IS NOT NULL THEN p_tokens ELSE u.amount END
          FROM (SELECT id, amount AS old_amount FROM quota_use WHERE call_id = p_call AND NOT learnt) o
         WHERE u.id = o.id
        RETURNING u.kind, u.scope, u.measure, u.window_ms, u.calendar, u.leaves_at, u.amount - o.old_amount AS delta)
    , applied AS (
        UPDATE quota_window w SET used = greatest(w.used + c.delta, 0), next_leave = least(w.next_leave, c.leaves_at)
          FROM changed c
         WHERE w.kind = c.kind AND w.scope = c.scope AND w.measure = c.measure AND w.window_ms = c.window_ms
           AND w.calendar = c.calendar
        RETURNING c.delta)
    SELECT coalesce(max(delta), 0) INTO v_raised FROM applied;
    IF v_raised <= 0 THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
END
$$;

-- A provider's headers said `p_remaining` of a declared limit `p_declared` is left: our count of
-- that window becomes `p_declared - p_remaining` where that is more than we count (learnt use,
-- leaving at `p_leaves`), and where it is less, learnt use (only) is taken back. One window per
-- call, so it never holds two window locks.
-- The headers are the provider's count when it received call `p_call`; our window also holds the
-- calls admitted after it, so lowering compares with our count without those (never taking back
-- use that is still real).
CREATE FUNCTION fallback_observe(p_kind text, p_scope text, p_measure text, p_window_ms bigint,
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
