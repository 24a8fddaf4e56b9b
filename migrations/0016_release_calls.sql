-- A call admitted but never sent (its job lost a provider's half-open probe to another worker)
-- is released: it stops counting at once, unless a rate-limit figure may have counted it.
--
-- A figure observed after the call's admission read the call's row as sent: `fallback_observe`
-- takes every real row older than the observed call for the provider's, and so learnt less use,
-- or took learnt use back, for it. Removing the row then would leave the window below the
-- provider's count (review of the release, finding 2). Turning it into learnt use instead
-- (rounds 2 to 4) is not sound either: learnt use is use the provider has, which later figures
-- hold and count as seen, and the released call is in none of them; whenever the row was later
-- taken back, or left before the use it stood for, the window again counted less than the
-- provider. So a window remembers when a figure was last counted in it (`observed_at`, written
-- by `fallback_observe` under the window's lock), and a release looks at it under the same
-- lock: no figure since the call was admitted, the call's rows count nothing from now on (the
-- slot is back at once); otherwise the call ends as an answer that reported no count does, and
-- keeps its slot for a window, as before. A release comes moments after its admission (its job
-- lost the probe's claim), so the first case is the usual one.
--
-- The windows are locked first, in the canonical order, then the call's rows, as every writer
-- of them does; a lock is waited for 1 s at most, as every admission's: a release behind a
-- window held elsewhere fails as busy (the worker then answers the call instead) rather than
-- run into the worker's state-call timeout, which counts towards taking the database for down.
ALTER TABLE quota_window ADD COLUMN observed_at timestamptz;

CREATE FUNCTION fallback_release_calls(p_calls bigint[])
RETURNS boolean LANGUAGE plpgsql SET lock_timeout = '1s' SET enable_seqscan = off AS $$
DECLARE
    v_n        int := coalesce(cardinality(p_calls), 0);
    v_nulls    bigint[] := array_fill(NULL::bigint, ARRAY[coalesce(cardinality(p_calls), 0)]);
    v_zeros    bigint[] := array_fill(0::bigint, ARRAY[coalesce(cardinality(p_calls), 0)]);
    v_observed boolean;
    r          record;
BEGIN
    IF v_n = 0 THEN
        RETURN false;
    END IF;
    FOR r IN SELECT * FROM (SELECT DISTINCT u.kind, u.scope, u.measure, u.window_ms, u.calendar FROM quota_use u
                             WHERE u.call_id = ANY (p_calls) AND NOT u.learnt AND u.credit_seq IS NULL) d
              ORDER BY d.kind COLLATE "C", d.scope COLLATE "C", d.measure COLLATE "C", d.window_ms,
                       d.calendar COLLATE "C" LOOP
        PERFORM 1 FROM quota_window w
         WHERE w.kind = r.kind AND w.scope = r.scope AND w.measure = r.measure AND w.window_ms = r.window_ms
           AND w.calendar = r.calendar FOR UPDATE;
    END LOOP;
    -- A figure counted in one of the calls' windows since the call was admitted (or a row that
    -- does not say when it was admitted): the call may have been counted as sent.
    SELECT bool_or(u.admitted_at IS NULL OR w.observed_at >= u.admitted_at) INTO v_observed
      FROM quota_use u
      JOIN quota_window w ON w.kind = u.kind AND w.scope = u.scope AND w.measure = u.measure
                         AND w.window_ms = u.window_ms AND w.calendar = u.calendar
     WHERE u.call_id = ANY (p_calls) AND NOT u.learnt AND u.credit_seq IS NULL;
    v_observed := coalesce(v_observed, false);
    PERFORM fallback_apply_finishes(p_calls,
                                    CASE WHEN v_observed THEN v_nulls ELSE v_zeros END,
                                    CASE WHEN v_observed THEN v_nulls ELSE v_zeros END,
                                    array_fill(true, ARRAY[v_n]), v_nulls);
    RETURN NOT v_observed;
END
$$;

-- As 0013, where every figure counted in a window marks it observed (after the window's lock).
CREATE OR REPLACE FUNCTION fallback_observe(p_kind text, p_scope text, p_measure text, p_window_ms bigint,
                                 p_calendar text, p_declared bigint, p_remaining bigint, p_leaves timestamptz,
                                 p_call bigint, p_sent bigint)
RETURNS bigint LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    v_now      timestamptz := clock_timestamp();
    v_target   bigint := greatest(p_declared - p_remaining, 0);
    v_used     bigint;
    v_next     timestamptz;
    v_excess   bigint;
    v_take     bigint;
    v_live     bigint;
    v_seen     timestamptz;
    v_credit   boolean;       -- the observed call is a credit
    v_own      bigint;        -- the observed credit's row in this window, when unseen
    v_later    bigint;        -- learnt use taught by newer figures
    r          record;
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
    SELECT min(admitted_at), bool_or(credit_seq IS NOT NULL)
      INTO v_seen, v_credit
      FROM quota_use WHERE call_id = p_call AND p_call IS NOT NULL AND NOT learnt;
    v_live := fallback_unseen_credits(p_kind, p_scope, p_measure, p_window_ms, p_calendar, v_now, v_seen);
    -- The observed credit's own calls up to the observed one are in its figure: only the rest
    -- of it is unseen (its row is among the unseen ones when it admitted after its admission).
    IF p_sent IS NOT NULL AND p_sent > 0 AND v_credit THEN
        SELECT coalesce(sum(amount), 0)::bigint INTO v_own FROM quota_use
         WHERE call_id = p_call AND kind = p_kind AND scope = p_scope AND measure = p_measure
           AND window_ms = p_window_ms AND calendar = p_calendar AND credit_seq IS NOT NULL AND NOT learnt
           AND leaves_at > v_now
           AND CASE WHEN v_seen IS NOT NULL THEN credit_open_until > v_seen
                    ELSE credit_live AND credit_deadline > v_now END;
        v_live := greatest(v_live - least(v_own, p_sent), 0);
    END IF;
    IF v_target > v_used - v_live THEN
        INSERT INTO quota_use (call_id, kind, scope, measure, window_ms, calendar, amount, leaves_at, learnt,
                               learnt_at)
        VALUES (0, p_kind, p_scope, p_measure, p_window_ms, p_calendar, v_target - (v_used - v_live), p_leaves, true,
                v_now);
        UPDATE quota_window SET used = v_used + (v_target - (v_used - v_live)), next_leave = least(next_leave, p_leaves),
                                observed_at = clock_timestamp()
         WHERE kind = p_kind AND scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
           AND calendar = p_calendar;
        RETURN v_used + (v_target - (v_used - v_live));
    END IF;
    -- The provider counted when it received call `p_call`: calls admitted after it (larger
    -- ids) are not in its figure. Take back only what our count without them exceeds.
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
    v_excess := coalesce(v_excess, 0) - v_live;
    -- Learnt use taught by figures newer than this one is not in it either (the learnt rows
    -- are few: their partial index).
    SELECT coalesce(sum(amount), 0)::bigint INTO v_later FROM quota_use
     WHERE kind = p_kind AND scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
       AND calendar = p_calendar AND learnt AND leaves_at > v_now
       AND NOT fallback_learnt_is_older(learnt_at, v_seen);
    v_excess := v_excess - v_later;
    -- With the call unknown (NULL), nothing is taken back.
    IF p_call IS NULL THEN
        v_excess := 0;
    END IF;
    FOR r IN SELECT id, amount FROM quota_use
              WHERE kind = p_kind AND scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
                AND calendar = p_calendar AND learnt AND leaves_at > v_now
                AND fallback_learnt_is_older(learnt_at, v_seen)
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
    UPDATE quota_window SET used = v_used, observed_at = clock_timestamp()
     WHERE kind = p_kind AND scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
       AND calendar = p_calendar;
    RETURN v_used;
END
$$;
