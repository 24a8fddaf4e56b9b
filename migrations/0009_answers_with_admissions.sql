-- Answers recorded with their provider's next admissions (issue #9).
--
-- Under load a worker sent, for a provider with limits, batches of asks (`fallback_admit_batch`)
-- and batches of answers (`fallback_finish_batch`), one after the other: two transactions, each
-- with its round trip, its locks and its commit, for every few calls. Measured, the answers'
-- transactions were half of Postgres' work per call. A provider's answers now go out in the same
-- transaction as its next asks, and are applied before them: an answer is never overtaken by an
-- ask that follows it from the same worker (a lowered token count frees its room for them, a
-- raised one counts before them), exactly as when it was its own transaction before the ask.
--
-- Locks: the provider's row, then the asks' windows in the canonical order (what every admission
-- takes, 0007). A call's rows are in the windows of the ask that admitted it, which are the asks'
-- windows of the same worker for the same provider: the answers need no lock of their own and no
-- new lock order appears. (Should a call's rows lie in a window the asks do not name, the update
-- locks it where it stands; the 1 s lock timeout bounds any wait that could cause.)

-- What `fallback_finish_batch` does once the calls' windows are locked: the calls' rows and their
-- windows' totals. Returns the largest raise of a token count (0 when none was raised).
-- Planned for each call's arrays, as `fallback_finish_batch` (0008) explains.
CREATE FUNCTION fallback_apply_finishes(p_calls bigint[], p_tokens bigint[])
RETURNS bigint LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
DECLARE
    v_now    timestamptz := clock_timestamp();
    v_raised bigint;
BEGIN
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
    RETURN v_raised;
END
$$;

-- As in 0008, with its locks taken window by window in the canonical order, each through the
-- window's key: joined as a set, the planner could read every row of quota_window (the dead
-- versions its frequent updates leave included) under the lock of every answer.
CREATE OR REPLACE FUNCTION fallback_finish_batch(p_calls bigint[], p_tokens bigint[])
RETURNS void LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan SET lock_timeout = '1s' AS $$
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
    -- As in 0008: when no token count is raised, the commit does not wait for its WAL flush (a
    -- lost finish only makes calls count longer, never less).
    IF fallback_apply_finishes(p_calls, p_tokens) <= 0 THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
END
$$;

-- Records the answers to calls `p_calls` of `p_provider` (as `fallback_finish_batch`), then
-- admits the asks (as `fallback_admit_batch`, the same arguments), in one transaction.
--
-- Answers alone never wait on the provider's row; here they would, and would fail with the asks
-- when that row is held elsewhere past the lock timeout, losing a raised count. So the row is
-- waited for 0.5 s at most, in a block of its own: when it is held past that, the answers are
-- recorded as `fallback_finish_batch` records answers alone and every ask is told 'busy' (come
-- back shortly: the windows were not looked at). Only the row is locked inside the block (a
-- subtransaction): the windows, which the transaction updates, are locked by the transaction
-- itself (a window locked by the block and updated outside it would carry a MultiXact), with
-- the 1 s answers alone wait, so an answer is lost only where answers alone lose it (a window
-- held past 1 s).
CREATE FUNCTION fallback_finish_and_admit(
    p_provider text,
    p_kinds text[], p_scopes text[], p_measures text[], p_windows_ms bigint[], p_calendars text[],
    p_limits bigint[], p_first_resets timestamptz[], p_next_resets timestamptz[],
    p_tokens bigint[], p_flight_ms bigint[], p_leaves timestamptz[],
    p_calls bigint[], p_call_tokens bigint[])
RETURNS TABLE (ask int, usage_id bigint, blocked_until_ms bigint, blocked_by text)
LANGUAGE plpgsql SET lock_timeout = '1s' AS $$
BEGIN
    BEGIN
        PERFORM set_config('lock_timeout', '500ms', true);
        PERFORM 1 FROM provider_state WHERE provider = p_provider FOR UPDATE;
    EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
        PERFORM fallback_finish_batch(p_calls, p_call_tokens);
        RETURN QUERY SELECT g::int, NULL::bigint, NULL::bigint, 'busy'::text
                       FROM generate_series(1, coalesce(array_length(p_tokens, 1), 0)) g;
        RETURN;
    END;
    PERFORM set_config('lock_timeout', '1s', true);
    PERFORM 1
       FROM unnest(p_kinds, p_scopes, p_measures, p_windows_ms, p_calendars) WITH ORDINALITY AS t(k, s, m, wm, c, ord)
       JOIN quota_window w ON w.kind = t.k AND w.scope = t.s AND w.measure = t.m
                          AND w.window_ms = t.wm AND w.calendar = t.c
      ORDER BY t.ord FOR UPDATE OF w;
    PERFORM fallback_apply_finishes(p_calls, p_call_tokens);
    RETURN QUERY SELECT * FROM fallback_admit_batch(
        p_provider, p_kinds, p_scopes, p_measures, p_windows_ms, p_calendars, p_limits,
        p_first_resets, p_next_resets, p_tokens, p_flight_ms, p_leaves);
END
$$;
