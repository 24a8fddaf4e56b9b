-- Batched admission and batched finishes (issue #9).
--
-- Under load one worker has dozens of calls to the same provider waiting for admission. One
-- `fallback_admit` per call pays a round trip, the provider row's lock and a WAL flush each, one
-- after the other. `fallback_admit_batch` admits all the asks that waited together in one
-- transaction: it takes the same locks as one admission did (the provider row, then every window
-- in the canonical order), decides the asks in order as if they had come one after another, and
-- commits once. `fallback_finish_batch` does the same for answers: one transaction for many calls.
--
-- `fallback_admit` and `fallback_finish` (0007) stay for workers not yet upgraded: both kinds of
-- admission take the same locks in the same order, so they exclude each other exactly.

-- Lock waits. A worker sends one batch at a time with the default pool, so a batch waiting on
-- a lock (another session holding the provider's row or a window for long) would hold every
-- other provider's admissions and every finish of that worker back, past their callers' 2 s.
-- Both functions give up a lock wait after 1 s (`lock_timeout`, SQLSTATE 55P03): the asks are
-- told to come back shortly, the finishes leave their slots to expire. The locks they wait on
-- are otherwise held for milliseconds (one batch of another worker).

-- Admits a batch of asks to `p_provider`, in order, as `fallback_admit` would have admitted them
-- one after another. The windows (`p_kinds` .. `p_next_resets`, one entry per window, in the
-- canonical order) are the provider's, the same for every ask. Per ask: `p_tokens[a]` and
-- `p_flight_ms[a]`; per ask and window, `p_leaves[(a - 1) * windows + i]` (the calendar window's
-- reset after the ask's deadline, NULL for sliding ones).
--
-- Returns one row per ask (`ask`, 1-based): its call id when granted, else `blocked_until_ms` and
-- `blocked_by` as `fallback_admit` answers them. Each grant raises the running use of every
-- window it counts in before the next ask is decided; a refused ask takes nothing. The windows
-- are updated once and the grants inserted once; the refused asks' waits are computed after that,
-- each distinct (window, excess) once. Counting the batch's own grants there, also those granted
-- after a refused ask, changes no wait: `fallback_room_at` answers no later than its cap (now +
-- the window, or the first reset), and every grant of the batch leaves at or after that cap.
CREATE FUNCTION fallback_admit_batch(
    p_provider text,
    p_kinds text[], p_scopes text[], p_measures text[], p_windows_ms bigint[], p_calendars text[],
    p_limits bigint[], p_first_resets timestamptz[], p_next_resets timestamptz[],
    p_tokens bigint[], p_flight_ms bigint[], p_leaves timestamptz[])
RETURNS TABLE (ask int, usage_id bigint, blocked_until_ms bigint, blocked_by text)
LANGUAGE plpgsql SET lock_timeout = '1s' AS $$
DECLARE
    v_now      timestamptz := clock_timestamp();
    v_n        int := coalesce(array_length(p_limits, 1), 0);
    v_asks     int := coalesce(array_length(p_tokens, 1), 0);
    v_cooldown timestamptz;
    v_stale    int;
    v_used     bigint[];
    v_added    bigint[];
    v_next     timestamptz[];
    v_first    timestamptz[];
    v_min_left timestamptz[];
    v_found    int;
    v_retired  bigint;
    v_expires  timestamptz;
    v_amount   bigint;
    v_fits     boolean;
    v_ids      bigint[];      -- per ask: its call id when granted
    v_answered boolean[];     -- per ask: refused before the windows were looked at
    -- The grants' quota_use rows.
    g_ids      bigint[] := '{}';
    g_windows  int[] := '{}';
    g_amounts  bigint[] := '{}';
    g_leaves   timestamptz[] := '{}';
    -- The refused asks' excess in each window that has no room for them.
    r_asks     int[] := '{}';
    r_windows  int[] := '{}';
    r_excess   bigint[] := '{}';
    r          record;
    a          int;
    i          int;
BEGIN
    IF v_asks = 0 THEN
        RETURN;
    END IF;
    IF coalesce(array_length(p_flight_ms, 1), 0) <> v_asks
       OR coalesce(array_length(p_leaves, 1), 0) <> v_asks * v_n THEN
        RAISE EXCEPTION 'fallback_admit_batch: % asks, % flights, % leaves for % windows',
            v_asks, array_length(p_flight_ms, 1), array_length(p_leaves, 1), v_n;
    END IF;

    SELECT cooldown_until INTO v_cooldown FROM provider_state WHERE provider = p_provider FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO provider_state (provider) VALUES (p_provider) ON CONFLICT (provider) DO NOTHING;
        SELECT cooldown_until INTO v_cooldown FROM provider_state WHERE provider = p_provider FOR UPDATE;
    END IF;
    IF v_cooldown > v_now THEN
        RETURN QUERY SELECT g::int, NULL::bigint, ceil(extract(epoch FROM v_cooldown) * 1000)::bigint, 'cooldown'::text
                       FROM generate_series(1, v_asks) g;
        RETURN;
    END IF;

    FOR i IN 1 .. v_n LOOP
        -- As in fallback_admit: the first reset after this clock, the worker's or the next one.
        v_first[i] := CASE WHEN p_first_resets[i] > v_now THEN p_first_resets[i] ELSE p_next_resets[i] END;
        IF v_stale IS NULL AND v_first[i] <= v_now THEN
            v_stale := i;
        END IF;
        v_added[i] := 0;
    END LOOP;

    -- What fallback_admit answers before it looks at the windows: a token limit the ask alone
    -- exceeds, or a calendar a whole day stale, whichever window comes first.
    FOR a IN 1 .. v_asks LOOP
        v_answered[a] := false;
        FOR i IN 1 .. v_n LOOP
            IF p_measures[i] = 'tokens' AND p_tokens[a] > p_limits[i] THEN
                RETURN QUERY SELECT a, NULL::bigint, NULL::bigint, 'tokens_exceed_limit'::text;
                v_answered[a] := true;
                EXIT;
            END IF;
            IF i = v_stale THEN
                RETURN QUERY SELECT a, NULL::bigint, ceil(extract(epoch FROM v_now) * 1000)::bigint, p_measures[i];
                v_answered[a] := true;
                EXIT;
            END IF;
        END LOOP;
    END LOOP;
    IF v_stale IS NOT NULL THEN
        RETURN;
    END IF;

    -- Lock the windows in the given (canonical) order, creating the missing ones (as fallback_admit).
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
            -- Another admission is creating one of them right now: every ask asks again at once.
            RETURN QUERY SELECT g::int, NULL::bigint, ceil(extract(epoch FROM v_now) * 1000)::bigint, 'requests'::text
                           FROM generate_series(1, v_asks) g WHERE NOT v_answered[g];
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
        v_min_left[i] := 'infinity';
    END LOOP;

    -- The asks in order: a grant counts before the next ask is decided.
    FOR a IN 1 .. v_asks LOOP
        CONTINUE WHEN v_answered[a];
        v_fits := true;
        FOR i IN 1 .. v_n LOOP
            v_amount := CASE WHEN p_measures[i] = 'requests' THEN 1 ELSE p_tokens[a] END;
            IF v_used[i] + v_amount > p_limits[i] THEN
                v_fits := false;
                r_asks := r_asks || a;
                r_windows := r_windows || i;
                r_excess := r_excess || (v_used[i] + v_amount - p_limits[i]);
            END IF;
        END LOOP;
        CONTINUE WHEN NOT v_fits;
        v_ids[a] := nextval('quota_call_id');
        v_expires := v_now + p_flight_ms[a] * interval '1 millisecond';
        FOR i IN 1 .. v_n LOOP
            v_amount := CASE WHEN p_measures[i] = 'requests' THEN 1 ELSE p_tokens[a] END;
            v_used[i] := v_used[i] + v_amount;
            v_added[i] := v_added[i] + v_amount;
            g_ids := g_ids || v_ids[a];
            g_windows := g_windows || i;
            g_amounts := g_amounts || v_amount;
            -- A calendar call leaves no earlier than the first reset (greatest ignores NULLs).
            g_leaves := g_leaves || coalesce(greatest(p_leaves[(a - 1) * v_n + i], v_first[i]),
                                             v_expires + p_windows_ms[i] * interval '1 millisecond');
            v_min_left[i] := least(v_min_left[i], g_leaves[array_length(g_leaves, 1)]);
        END LOOP;
    END LOOP;

    IF array_length(g_ids, 1) > 0 THEN
        UPDATE quota_window w SET used = w.used + t.a, next_leave = least(w.next_leave, t.l)
          FROM unnest(p_kinds, p_scopes, p_measures, p_windows_ms, p_calendars, v_added, v_min_left)
               AS t(k, s, m, wm, c, a, l)
         WHERE w.kind = t.k AND w.scope = t.s AND w.measure = t.m AND w.window_ms = t.wm AND w.calendar = t.c
           AND t.a > 0;
        INSERT INTO quota_use (call_id, kind, scope, measure, window_ms, calendar, amount, leaves_at, first_reset)
        SELECT g.id, p_kinds[g.w], p_scopes[g.w], p_measures[g.w], p_windows_ms[g.w], p_calendars[g.w],
               g.amount, g.leaves, v_first[g.w]
          FROM unnest(g_ids, g_windows, g_amounts, g_leaves) AS g(id, w, amount, leaves);
    END IF;
    -- Every grant answered, also with no window at all (a provider whose only pool has no
    -- limits: nothing to count, the cooldown alone decides).
    RETURN QUERY SELECT o::int, v_ids[o], NULL::bigint, NULL::text
                   FROM generate_subscripts(v_ids, 1) o WHERE v_ids[o] IS NOT NULL;

    -- Each refused ask waits for its latest window (the first in order on a tie, as in
    -- fallback_admit); each distinct (window, excess) is looked up once.
    RETURN QUERY
    WITH need AS (
        SELECT t.a, t.w, t.e, t.o FROM unnest(r_asks, r_windows, r_excess) WITH ORDINALITY AS t(a, w, e, o)),
    room AS (
        SELECT d.w, d.e,
               fallback_room_at(p_kinds[d.w], p_scopes[d.w], p_measures[d.w], p_windows_ms[d.w], p_calendars[d.w],
                                d.e, coalesce(v_first[d.w], v_now + p_windows_ms[d.w] * interval '1 millisecond')) AS free_at
          FROM (SELECT DISTINCT w, e FROM need) d),
    waits AS (
        SELECT DISTINCT ON (n.a) n.a, rm.free_at, p_measures[n.w] AS measure
          FROM need n JOIN room rm ON rm.w = n.w AND rm.e = n.e
         ORDER BY n.a, rm.free_at DESC, n.o)
    SELECT waits.a::int, NULL::bigint, ceil(extract(epoch FROM waits.free_at) * 1000)::bigint, waits.measure FROM waits;
END
$$;

-- The answers to calls `p_calls` arrived (`p_tokens[i]` the provider's count for `p_calls[i]`,
-- NULL when unknown): as `fallback_finish` for each, in one transaction. Every window involved is
-- locked once, in the canonical order; the calls' rows are updated in one statement and the
-- windows' totals in another. A call id given twice counts once (its first entry).
--
-- As in fallback_finish: when no token count is raised, the transaction commits without waiting
-- for its WAL flush (a lost finish only makes calls count longer, never less).
--
-- Planned for each call's arrays (`plan_cache_mode`): a generic plan cached while the table was
-- small hash-joins the whole of quota_use (every call in every window) per batch, and its cost
-- then grows with the window (measured: 1.5 ms per 32 finishes at first, 44 ms after 96,000).
CREATE FUNCTION fallback_finish_batch(p_calls bigint[], p_tokens bigint[])
RETURNS void LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan SET lock_timeout = '1s' AS $$
DECLARE
    v_now    timestamptz := clock_timestamp();
    v_raised bigint;
    v_locked bigint;
BEGIN
    -- The calls' windows first, through the call index (as a semi-join the planner may instead
    -- walk each window's every row to find the calls).
    WITH involved AS MATERIALIZED (
        SELECT DISTINCT kind, scope, measure, window_ms, calendar FROM quota_use WHERE call_id = ANY (p_calls))
    SELECT count(*) INTO v_locked FROM (
        SELECT 1 FROM quota_window w
          JOIN involved i ON w.kind = i.kind AND w.scope = i.scope AND w.measure = i.measure
                         AND w.window_ms = i.window_ms AND w.calendar = i.calendar
         ORDER BY w.kind COLLATE "C", w.scope COLLATE "C", w.measure COLLATE "C", w.window_ms, w.calendar COLLATE "C"
           FOR UPDATE OF w) locked;
    WITH calls AS (
        SELECT DISTINCT ON (c) c, tok FROM unnest(p_calls, p_tokens) WITH ORDINALITY AS t(c, tok, o)
         WHERE c IS NOT NULL ORDER BY c, o)
    , changed AS (
        UPDATE quota_use u
           SET leaves_at = CASE
                   WHEN u.calendar = '' THEN least(u.leaves_at, v_now + u.window_ms * interval '1 millisecond')
                   WHEN u.first_reset IS NOT NULL AND v_now < u.first_reset THEN least(u.leaves_at, u.first_reset)
                   ELSE u.leaves_at END,
               amount = CASE WHEN u.measure = 'tokens' AND o.tok IS NOT NULL THEN o.tok ELSE u.amount END
          FROM (SELECT q.id, q.amount AS old_amount, calls.tok FROM quota_use q JOIN calls ON q.call_id = calls.c
                 WHERE q.call_id = ANY (p_calls) AND NOT q.learnt) o
         -- `call_id = ANY` on both sides: the planner reads the batch's rows through the call
         -- index, never the whole table (its size is the calls in every window).
         WHERE u.id = o.id AND u.call_id = ANY (p_calls)
        RETURNING u.kind, u.scope, u.measure, u.window_ms, u.calendar, u.leaves_at, u.amount - o.old_amount AS delta)
    , per_window AS (
        SELECT kind, scope, measure, window_ms, calendar, sum(delta) AS delta, min(leaves_at) AS leaves_at,
               max(delta) AS raised
          FROM changed GROUP BY kind, scope, measure, window_ms, calendar)
    , applied AS (
        UPDATE quota_window w SET used = greatest(w.used + c.delta, 0), next_leave = least(w.next_leave, c.leaves_at)
          FROM per_window c
         WHERE w.kind = c.kind AND w.scope = c.scope AND w.measure = c.measure AND w.window_ms = c.window_ms
           AND w.calendar = c.calendar
        RETURNING c.raised)
    SELECT coalesce(max(raised), 0) INTO v_raised FROM applied;
    IF v_raised <= 0 THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
END
$$;
