-- Admission credits (issue #9): a worker may take several calls' room in one ask and admit
-- its own calls from it without asking again.
--
-- Every call to a provider with large limits was one row per window on its ask, a new version
-- of each on its answer and a delete on its retirement: about 12 index insertions per call,
-- which made Postgres the cost of a limited job (0.24 ms of Postgres CPU per job against 0.06
-- for the result ledger). A credit is one ask that counts `p_requests` calls and their tokens
-- at once; the worker admits up to that many of its calls from it, then ends it with what its
-- calls used (`p_requests` and `p_tokens` of the answer), so the windows count what was sent
-- from then on, as for any call. The rule stays strict: a window counts the whole credit from
-- when it is taken until it ends, and its calls until one window after the last answer.
--
-- A credit's row says when it admitted calls (`admitted_at` to `credit_open_until`, the latter
-- moved to its close) and until when it lives (`credit_live` until its last call has answered,
-- and never past `credit_deadline`, when none of its calls can still be out: a killed worker's
-- credit stops living then). Every call's rows say when they were admitted (`admitted_at`).
-- The provider's rate-limit headers for call X do not count the calls of a credit that still
-- admitted after X was admitted, whatever its call id (`fallback_observe`); a refusal while a
-- credit is open in a requests window, or lives in a tokens window, says to ask again soon
-- rather than when the window's rows leave (what it does not use comes back when it closes;
-- its token count can fall when it ends).
-- Its writes carry a number (`credit_seq`): one is applied only over an older one, so writes
-- that cross in the batches, or come back with the write-back after an outage, never undo a
-- later count.
--
-- The functions of 0010 take the new arguments as overloads, and the old signatures call them
-- with none (one call each, no number), so workers of any version keep sharing the tables.

ALTER TABLE quota_use ADD COLUMN admitted_at timestamptz;
ALTER TABLE quota_use ADD COLUMN credit_seq bigint;
ALTER TABLE quota_use ADD COLUMN credit_live boolean NOT NULL DEFAULT false;
ALTER TABLE quota_use ADD COLUMN credit_open_until timestamptz;
ALTER TABLE quota_use ADD COLUMN credit_deadline timestamptz;
CREATE INDEX quota_use_credits ON quota_use (kind, scope, measure, window_ms, calendar, credit_open_until)
    WHERE credit_seq IS NOT NULL;

-- What the credits of one window hold that a figure taken at `p_seen` may not count: those
-- still admitting calls after it; with no such time, those living now.
CREATE FUNCTION fallback_unseen_credits(p_kind text, p_scope text, p_measure text, p_window_ms bigint,
                                        p_calendar text, p_now timestamptz, p_seen timestamptz)
RETURNS bigint LANGUAGE sql STABLE SET enable_seqscan = off AS $$
    SELECT coalesce(sum(amount), 0)::bigint FROM quota_use
     WHERE kind = p_kind AND scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
       AND calendar = p_calendar AND credit_seq IS NOT NULL AND NOT learnt AND leaves_at > p_now
       AND CASE WHEN p_seen IS NOT NULL THEN credit_open_until > p_seen
                ELSE credit_live AND credit_deadline > p_now END;
$$;

-- Whether a refusal in this window may find room within seconds: a credit still open in a
-- requests window (it gives back what it does not use when it closes), a credit living in a
-- tokens window (its count can fall when it ends).
CREATE FUNCTION fallback_credit_may_give_back(p_kind text, p_scope text, p_measure text, p_window_ms bigint,
                                              p_calendar text, p_now timestamptz)
RETURNS boolean LANGUAGE sql STABLE SET enable_seqscan = off AS $$
    SELECT EXISTS (
        SELECT 1 FROM quota_use
         WHERE kind = p_kind AND scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
           AND calendar = p_calendar AND credit_seq IS NOT NULL AND NOT learnt AND leaves_at > p_now
           AND CASE WHEN p_measure = 'requests'
                    THEN credit_seq = 0 AND credit_open_until > p_now - interval '1 second'
                    ELSE credit_live AND credit_deadline > p_now END);
$$;

-- As 0010, where an ask with `p_requests[a]` (not NULL) is a credit for that many requests that
-- admits calls for `p_open_ms[a]`, every row says when it was admitted, and a refusal in a
-- window where a credit may give back room soon is asked again within 2 s.
CREATE FUNCTION fallback_admit_batch(
    p_provider text,
    p_kinds text[], p_scopes text[], p_measures text[], p_windows_ms bigint[], p_calendars text[],
    p_limits bigint[], p_first_resets timestamptz[], p_next_resets timestamptz[],
    p_tokens bigint[], p_flight_ms bigint[], p_leaves timestamptz[], p_requests bigint[], p_open_ms bigint[])
RETURNS TABLE (ask int, usage_id bigint, blocked_until_ms bigint, blocked_by text)
LANGUAGE plpgsql SET lock_timeout = '1s' SET enable_seqscan = off AS $$
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
    g_credits  boolean[] := '{}';
    g_opens    timestamptz[] := '{}';
    g_ends     timestamptz[] := '{}';
    -- The refused asks' excess in each window that has no room for them.
    r_asks     int[] := '{}';
    r_windows  int[] := '{}';
    r_excess   bigint[] := '{}';
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
        SELECT o_used, o_next, o_found INTO v_used, v_next, v_found
          FROM fallback_lock_windows(p_kinds, p_scopes, p_measures, p_windows_ms, p_calendars);
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
            v_amount := CASE WHEN p_measures[i] = 'requests' THEN coalesce(p_requests[a], 1) ELSE p_tokens[a] END;
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
            v_amount := CASE WHEN p_measures[i] = 'requests' THEN coalesce(p_requests[a], 1) ELSE p_tokens[a] END;
            v_used[i] := v_used[i] + v_amount;
            v_added[i] := v_added[i] + v_amount;
            g_ids := g_ids || v_ids[a];
            g_credits := g_credits || (p_requests[a] IS NOT NULL);
            g_opens := g_opens || (v_now + coalesce(p_open_ms[a], 0) * interval '1 millisecond');
            g_ends := g_ends || v_expires;
            g_windows := g_windows || i;
            g_amounts := g_amounts || v_amount;
            -- A calendar call leaves no earlier than the first reset (greatest ignores NULLs).
            g_leaves := g_leaves || coalesce(greatest(p_leaves[(a - 1) * v_n + i], v_first[i]),
                                             v_expires + p_windows_ms[i] * interval '1 millisecond');
            v_min_left[i] := least(v_min_left[i], g_leaves[array_length(g_leaves, 1)]);
        END LOOP;
    END LOOP;

    IF array_length(g_ids, 1) > 0 THEN
        FOR i IN 1 .. v_n LOOP
            CONTINUE WHEN v_added[i] <= 0;
            UPDATE quota_window w SET used = w.used + v_added[i], next_leave = least(w.next_leave, v_min_left[i])
             WHERE w.kind = p_kinds[i] AND w.scope = p_scopes[i] AND w.measure = p_measures[i]
               AND w.window_ms = p_windows_ms[i] AND w.calendar = p_calendars[i];
        END LOOP;
        INSERT INTO quota_use (call_id, kind, scope, measure, window_ms, calendar, amount, leaves_at, first_reset,
                               admitted_at, credit_seq, credit_live, credit_open_until, credit_deadline)
        SELECT g.id, p_kinds[g.w], p_scopes[g.w], p_measures[g.w], p_windows_ms[g.w], p_calendars[g.w],
               g.amount, g.leaves, v_first[g.w],
               v_now, CASE WHEN g.credit THEN 0 END, g.credit, CASE WHEN g.credit THEN g.opens END,
               CASE WHEN g.credit THEN g.ends END
          FROM unnest(g_ids, g_windows, g_amounts, g_leaves, g_credits, g_opens, g_ends)
               AS g(id, w, amount, leaves, credit, opens, ends);
    END IF;
    -- Every grant answered, also with no window at all (a provider whose only pool has no
    -- limits: nothing to count, the cooldown alone decides).
    RETURN QUERY SELECT o::int, v_ids[o], NULL::bigint, NULL::text
                   FROM generate_subscripts(v_ids, 1) o WHERE v_ids[o] IS NOT NULL;

    -- Each refused ask waits for its latest window (the first in order on a tie, as in
    -- fallback_admit); each distinct (window, excess) is looked up once.
    IF array_length(r_asks, 1) > 0 THEN
        RETURN QUERY
        WITH need AS (
            SELECT t.a, t.w, t.e, t.o FROM unnest(r_asks, r_windows, r_excess) WITH ORDINALITY AS t(a, w, e, o)),
        room AS (
            SELECT d.w, d.e,
                   -- A credit may give back room within a second or two: ask again then, not
                   -- when the window's rows leave.
                   least(fallback_room_at(p_kinds[d.w], p_scopes[d.w], p_measures[d.w], p_windows_ms[d.w], p_calendars[d.w],
                                          d.e, coalesce(v_first[d.w], v_now + p_windows_ms[d.w] * interval '1 millisecond')),
                         CASE WHEN fallback_credit_may_give_back(p_kinds[d.w], p_scopes[d.w], p_measures[d.w],
                                                                 p_windows_ms[d.w], p_calendars[d.w], v_now)
                              THEN v_now + interval '2 seconds' END) AS free_at
              FROM (SELECT DISTINCT w, e FROM need) d),
        waits AS (
            SELECT DISTINCT ON (n.a) n.a, rm.free_at, p_measures[n.w] AS measure
              FROM need n JOIN room rm ON rm.w = n.w AND rm.e = n.e
             ORDER BY n.a, rm.free_at DESC, n.o)
        SELECT waits.a::int, NULL::bigint, ceil(extract(epoch FROM waits.free_at) * 1000)::bigint, waits.measure FROM waits;
    END IF;
END
$$;

-- As 0009: the answers to calls `p_calls` (`p_tokens` the provider's counts, NULL when unknown;
-- a call id given twice counts once, its first entry). Each call's rows are updated through the
-- call index by a statement planned once; each window's total once, in the canonical order.

-- The 0010 signature: every ask one request.
CREATE OR REPLACE FUNCTION fallback_admit_batch(
    p_provider text,
    p_kinds text[], p_scopes text[], p_measures text[], p_windows_ms bigint[], p_calendars text[],
    p_limits bigint[], p_first_resets timestamptz[], p_next_resets timestamptz[],
    p_tokens bigint[], p_flight_ms bigint[], p_leaves timestamptz[])
RETURNS TABLE (ask int, usage_id bigint, blocked_until_ms bigint, blocked_by text)
LANGUAGE sql AS $$
    SELECT * FROM fallback_admit_batch(p_provider, p_kinds, p_scopes, p_measures, p_windows_ms, p_calendars,
                                       p_limits, p_first_resets, p_next_resets, p_tokens, p_flight_ms, p_leaves,
                                       NULL::bigint[], NULL::bigint[]);
$$;

-- As 0010, where an answer may also set its call's request count (`p_requests`: a closed credit
-- counts the calls it admitted; NULL keeps the count), may leave its call in flight (`p_ended`
-- false: a closed credit with calls still out; NULL or true: the call has ended, as before), and
-- carries a credit's write number (`p_seqs`): a credit's row takes a write only over an older
-- one. A call id given twice counts once, its first entry, as in 0010 (the worker sends one
-- entry per call and batch: a credit's latest write).
CREATE FUNCTION fallback_apply_finishes(p_calls bigint[], p_tokens bigint[], p_requests bigint[], p_ended boolean[],
                                        p_seqs bigint[])
RETURNS bigint LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    v_now    timestamptz := clock_timestamp();
    v_raised bigint;
    v_done   bigint[] := '{}';
    v_call   record;
    -- One entry per row changed: its window, its change of amount and when it now leaves.
    c_kinds    text[] := '{}';
    c_scopes   text[] := '{}';
    c_measures text[] := '{}';
    c_ms       bigint[] := '{}';
    c_cals     text[] := '{}';
    c_delta    bigint[] := '{}';
    c_leaves   timestamptz[] := '{}';
    r          record;
BEGIN
    FOR v_call IN SELECT t.c, t.tok, t.req, coalesce(t.ended, true) AS ended, t.seq
                    FROM unnest(p_calls, p_tokens, p_requests, p_ended, p_seqs) WITH ORDINALITY AS t(c, tok, req, ended, seq, o)
                   ORDER BY t.o LOOP
        CONTINUE WHEN v_call.c IS NULL OR v_call.c = ANY (v_done);
        v_done := v_done || v_call.c;
        FOR r IN
            UPDATE quota_use u
               SET leaves_at = CASE
                       WHEN NOT v_call.ended THEN u.leaves_at
                       WHEN u.calendar = '' THEN least(u.leaves_at, v_now + u.window_ms * interval '1 millisecond')
                       WHEN u.first_reset IS NOT NULL AND v_now < u.first_reset THEN least(u.leaves_at, u.first_reset)
                       ELSE u.leaves_at END,
                   amount = CASE WHEN u.measure = 'tokens' AND v_call.tok IS NOT NULL THEN v_call.tok
                                 WHEN u.measure = 'requests' AND v_call.req IS NOT NULL THEN v_call.req
                                 ELSE u.amount END,
                   credit_seq = coalesce(v_call.seq, u.credit_seq),
                   credit_live = u.credit_live AND NOT v_call.ended,
                   -- A credit's first write is its close: it admits nothing after it.
                   credit_open_until = CASE WHEN u.credit_seq = 0 AND v_call.seq IS NOT NULL
                                            THEN least(u.credit_open_until, v_now) ELSE u.credit_open_until END
              FROM quota_use o
             WHERE o.call_id = v_call.c AND NOT o.learnt AND u.id = o.id
               AND (o.credit_seq IS NULL OR v_call.seq IS NULL OR v_call.seq > o.credit_seq)
            RETURNING u.kind, u.scope, u.measure, u.window_ms, u.calendar, u.leaves_at, u.amount - o.amount AS delta
        LOOP
            c_kinds := c_kinds || r.kind;
            c_scopes := c_scopes || r.scope;
            c_measures := c_measures || r.measure;
            c_ms := c_ms || r.window_ms;
            c_cals := c_cals || r.calendar;
            c_delta := c_delta || r.delta;
            c_leaves := c_leaves || r.leaves_at;
        END LOOP;
    END LOOP;
    -- Each window once, in the canonical order (a window the caller did not lock is locked here).
    FOR r IN
        SELECT k, s, m, wm, c, sum(d) AS delta, min(l) AS leaves_at, max(d) AS raised
          FROM unnest(c_kinds, c_scopes, c_measures, c_ms, c_cals, c_delta, c_leaves) AS t(k, s, m, wm, c, d, l)
         GROUP BY k, s, m, wm, c
         ORDER BY k COLLATE "C", s COLLATE "C", m COLLATE "C", wm, c COLLATE "C"
    LOOP
        UPDATE quota_window w SET used = greatest(w.used + r.delta, 0), next_leave = least(w.next_leave, r.leaves_at)
         WHERE w.kind = r.k AND w.scope = r.s AND w.measure = r.m AND w.window_ms = r.wm AND w.calendar = r.c;
        IF FOUND THEN
            v_raised := greatest(v_raised, r.raised);   -- greatest ignores the first NULL
        END IF;
    END LOOP;
    RETURN coalesce(v_raised, 0);
END
$$;

CREATE OR REPLACE FUNCTION fallback_apply_finishes(p_calls bigint[], p_tokens bigint[])
RETURNS bigint LANGUAGE sql AS $$
    SELECT fallback_apply_finishes(p_calls, p_tokens, NULL::bigint[], NULL::boolean[], NULL::bigint[]);
$$;

-- As 0010, with the answers' request counts and ends.
CREATE FUNCTION fallback_finish_batch(p_calls bigint[], p_tokens bigint[], p_requests bigint[], p_ended boolean[],
                                      p_seqs bigint[])
RETURNS void LANGUAGE plpgsql SET lock_timeout = '1s' SET enable_seqscan = off AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT * FROM (SELECT DISTINCT kind, scope, measure, window_ms, calendar
                              FROM quota_use WHERE call_id = ANY (p_calls)) involved
              ORDER BY kind COLLATE "C", scope COLLATE "C", measure COLLATE "C", window_ms, calendar COLLATE "C" LOOP
        PERFORM 1 FROM quota_window w
          WHERE w.kind = r.kind AND w.scope = r.scope AND w.measure = r.measure
            AND w.window_ms = r.window_ms AND w.calendar = r.calendar
            FOR UPDATE;
    END LOOP;
    -- As in 0008: when no count is raised, the commit does not wait for its WAL flush (a lost
    -- finish only makes calls count longer, never less).
    IF fallback_apply_finishes(p_calls, p_tokens, p_requests, p_ended, p_seqs) <= 0 THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION fallback_finish_batch(p_calls bigint[], p_tokens bigint[])
RETURNS void LANGUAGE sql AS $$
    SELECT fallback_finish_batch(p_calls, p_tokens, NULL::bigint[], NULL::boolean[], NULL::bigint[]);
$$;

-- As 0010, with the asks' request counts and the answers' request counts, ends and numbers.
CREATE FUNCTION fallback_finish_and_admit(
    p_provider text,
    p_kinds text[], p_scopes text[], p_measures text[], p_windows_ms bigint[], p_calendars text[],
    p_limits bigint[], p_first_resets timestamptz[], p_next_resets timestamptz[],
    p_tokens bigint[], p_flight_ms bigint[], p_leaves timestamptz[], p_requests bigint[], p_open_ms bigint[],
    p_calls bigint[], p_call_tokens bigint[], p_call_requests bigint[], p_call_ended boolean[], p_call_seqs bigint[])
RETURNS TABLE (ask int, usage_id bigint, blocked_until_ms bigint, blocked_by text)
LANGUAGE plpgsql SET lock_timeout = '1s' SET enable_seqscan = off AS $$
BEGIN
    BEGIN
        PERFORM set_config('lock_timeout', '500ms', true);
        PERFORM 1 FROM provider_state WHERE provider = p_provider FOR UPDATE;
    EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
        PERFORM fallback_finish_batch(p_calls, p_call_tokens, p_call_requests, p_call_ended, p_call_seqs);
        RETURN QUERY SELECT g::int, NULL::bigint, NULL::bigint, 'busy'::text
                       FROM generate_series(1, coalesce(array_length(p_tokens, 1), 0)) g;
        RETURN;
    END;
    PERFORM set_config('lock_timeout', '1s', true);
    PERFORM fallback_lock_windows(p_kinds, p_scopes, p_measures, p_windows_ms, p_calendars);
    PERFORM fallback_apply_finishes(p_calls, p_call_tokens, p_call_requests, p_call_ended, p_call_seqs);
    RETURN QUERY SELECT * FROM fallback_admit_batch(
        p_provider, p_kinds, p_scopes, p_measures, p_windows_ms, p_calendars, p_limits,
        p_first_resets, p_next_resets, p_tokens, p_flight_ms, p_leaves, p_requests, p_open_ms);
END
$$;

CREATE OR REPLACE FUNCTION fallback_finish_and_admit(
    p_provider text,
    p_kinds text[], p_scopes text[], p_measures text[], p_windows_ms bigint[], p_calendars text[],
    p_limits bigint[], p_first_resets timestamptz[], p_next_resets timestamptz[],
    p_tokens bigint[], p_flight_ms bigint[], p_leaves timestamptz[],
    p_calls bigint[], p_call_tokens bigint[])
RETURNS TABLE (ask int, usage_id bigint, blocked_until_ms bigint, blocked_by text)
LANGUAGE sql AS $$
    SELECT * FROM fallback_finish_and_admit(p_provider, p_kinds, p_scopes, p_measures, p_windows_ms, p_calendars,
                                            p_limits, p_first_resets, p_next_resets, p_tokens, p_flight_ms, p_leaves,
                                            NULL::bigint[], NULL::bigint[], p_calls, p_call_tokens, NULL::bigint[],
                                            NULL::boolean[], NULL::bigint[]);
$$;

-- As 0011, where a credit that still admitted calls after the observed call was admitted
-- counts as sent after it, whatever its call id (with the call unknown: a credit living now):
-- the figure is learnt beyond the other rows, and nothing such a credit holds is taken back.
CREATE OR REPLACE FUNCTION fallback_observe(p_kind text, p_scope text, p_measure text, p_window_ms bigint,
                                 p_calendar text, p_declared bigint, p_remaining bigint, p_leaves timestamptz,
                                 p_call bigint)
RETURNS bigint LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    v_now    timestamptz := clock_timestamp();
    v_target bigint := greatest(p_declared - p_remaining, 0);
    v_used   bigint;
    v_next   timestamptz;
    v_excess bigint;
    v_take   bigint;
    v_live   bigint;
    v_seen   timestamptz;
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
    -- The figure was taken when the provider received the call, after it was admitted: a
    -- credit admitting calls after that may have sent them after the figure was taken.
    SELECT min(admitted_at) INTO v_seen FROM quota_use WHERE call_id = p_call AND p_call IS NOT NULL;
    v_live := fallback_unseen_credits(p_kind, p_scope, p_measure, p_window_ms, p_calendar, v_now, v_seen);
    IF v_target > v_used - v_live THEN
        INSERT INTO quota_use (call_id, kind, scope, measure, window_ms, calendar, amount, leaves_at, learnt)
        VALUES (0, p_kind, p_scope, p_measure, p_window_ms, p_calendar, v_target - (v_used - v_live), p_leaves, true);
        UPDATE quota_window SET used = v_used + (v_target - (v_used - v_live)), next_leave = least(next_leave, p_leaves)
         WHERE kind = p_kind AND scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
           AND calendar = p_calendar;
        RETURN v_used + (v_target - (v_used - v_live));
    END IF;
    -- The provider counted when it received call `p_call`: calls admitted after it (larger
    -- ids) are not in its figure. Take back only what our count without them exceeds; with
    -- the call unknown (NULL), nothing.
    -- The calls admitted after it, found through the call index (a few: those admitted while
    -- it was in flight), then kept if in this window: through the window's index, a plan would
    -- read every call of the window to find them.
    WITH newer AS MATERIALIZED (
        SELECT kind, scope, measure, window_ms, calendar, amount, leaves_at, learnt, credit_seq
          FROM quota_use WHERE call_id > p_call)
    SELECT v_used - coalesce(sum(amount), 0) - v_target INTO v_excess FROM newer
     WHERE kind = p_kind AND scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
       AND calendar = p_calendar AND NOT learnt AND leaves_at > v_now AND (credit_seq IS NULL OR v_seen IS NULL);
    -- Credits count as newer by when they admitted calls, whatever their call id (a credit
    -- granted after the call admitted after it too; none was counted above). With no time for
    -- the observed call (a row of an earlier version), credits granted after it count by their
    -- id above, and those living now below too: less is taken back, never too much.
    v_excess := v_excess - v_live;
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

