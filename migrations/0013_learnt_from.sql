-- Learnt use that says which figure taught it, and a credit's own calls counted once in its
-- figures (`fallback_observe`).
--
-- Figures observed out of order: call Y, admitted after X, answers first and its (higher)
-- figure is learnt; X's older figure arrives next. 0007 to 0012 read "what we count minus the
-- calls admitted after X" as what the provider counted at X, but that count held the use learnt
-- from Y's later figure, and took it back as an excess: the window counted less than the
-- provider (152 taken, 102 counted in review 3's test). Each learnt row now says which call's
-- figure taught it (`learnt_from`; NULL: a figure of an unknown call, and every learnt row of
-- an earlier version) and, when that call was a credit, until when it admitted calls
-- (`learnt_until`: its figures may have been taken until then; 'infinity' when the call's rows
-- were not found, so its figure's time is unknown). Observing call X, a learnt row is *older*
-- than X's figure when its figure is known to have been taken no later:
--   * NULL `learnt_from` (as before 0013);
--   * a call that was not a credit (`learnt_until` NULL) admitted no later than X
--     (`learnt_from <= X`: call ids are the admission order, the rule of the calls' own rows;
--     X being a credit, a call admitted before the credit was granted);
--   * a credit other than X that admitted nothing after X was admitted
--     (`learnt_until <= X's admitted_at`; with no admitted_at for X, never).
-- Every other learnt row is *newer*: like the calls admitted after X, it is left out of what
-- the provider counted at X, and it is never taken back; only older ones are. When unsure, a
-- row is newer: less is taken back, never more (a credit's own learnt rows are newer than any
-- of its figures, whose order among them is not known).
--
-- A credit's own figures: every answer of a credit's call is observed as the credit, which
-- counted whole as unseen (it admitted calls after its own admission), although the figure of
-- its k-th call holds its first k calls: each figure learnt them again beside the credit. A
-- worker now sends, with the observation of a credit's call, how much of the credit had been
-- taken when that call was admitted, inclusive of it, in the window's measure (`p_sent`:
-- requests, or tokens): only the rest of the observed credit is unseen (other credits as in
-- 0012). NULL (a worker of 0012, a call not from a credit): the whole credit, as in 0012.
--
-- The 9-argument `fallback_observe` calls the new one with no count: workers of 0012 keep
-- running during the upgrade (their learnt rows say which figure taught them too).

ALTER TABLE quota_use ADD COLUMN learnt_from bigint;
ALTER TABLE quota_use ADD COLUMN learnt_until timestamptz;

-- Whether a learnt row (taught by the figure of call `p_from`, a credit admitting calls until
-- `p_until` when not NULL) was taught by a figure taken no later than that of call `p_call`
-- (admitted at `p_seen`, NULL when unknown). Unsure: no (newer).
CREATE FUNCTION fallback_learnt_is_older(p_from bigint, p_until timestamptz, p_call bigint, p_seen timestamptz)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_from IS NULL THEN true
                WHEN p_until IS NULL THEN p_from <= p_call
                ELSE p_from <> p_call AND p_seen IS NOT NULL AND p_until <= p_seen END;
$$;

-- As 0012, where learnt rows of figures newer than the observed call's are neither counted as
-- seen by it nor taken back, each learnt row says which figure taught it, and the observed
-- credit counts as unseen only beyond what it had sent at the observed call (`p_sent`).
CREATE FUNCTION fallback_observe(p_kind text, p_scope text, p_measure text, p_window_ms bigint,
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
    v_found    boolean;
    v_until    timestamptz;   -- the observed call is a credit: until when it admitted calls
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
    SELECT min(admitted_at), count(*) > 0, max(credit_open_until) FILTER (WHERE credit_seq IS NOT NULL)
      INTO v_seen, v_found, v_until
      FROM quota_use WHERE call_id = p_call AND p_call IS NOT NULL AND NOT learnt;
    v_live := fallback_unseen_credits(p_kind, p_scope, p_measure, p_window_ms, p_calendar, v_now, v_seen);
    -- The observed credit's own calls up to the observed one are in its figure: only the rest
    -- of it is unseen (its row is among the unseen ones when it admitted after its admission).
    IF p_sent IS NOT NULL AND p_sent > 0 AND v_until IS NOT NULL THEN
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
                               learnt_from, learnt_until)
        VALUES (0, p_kind, p_scope, p_measure, p_window_ms, p_calendar, v_target - (v_used - v_live), p_leaves, true,
                p_call, CASE WHEN p_call IS NULL THEN NULL WHEN NOT v_found THEN 'infinity' ELSE v_until END);
        UPDATE quota_window SET used = v_used + (v_target - (v_used - v_live)), next_leave = least(next_leave, p_leaves)
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
       AND NOT fallback_learnt_is_older(learnt_from, learnt_until, p_call, v_seen);
    v_excess := v_excess - v_later;
    -- With the call unknown (NULL), nothing is taken back.
    IF p_call IS NULL THEN
        v_excess := 0;
    END IF;
    FOR r IN SELECT id, amount FROM quota_use
              WHERE kind = p_kind AND scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
                AND calendar = p_calendar AND learnt AND leaves_at > v_now
                AND fallback_learnt_is_older(learnt_from, learnt_until, p_call, v_seen)
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

-- The 0012 signature: no count of the observed credit's calls (the whole credit is unseen).
CREATE OR REPLACE FUNCTION fallback_observe(p_kind text, p_scope text, p_measure text, p_window_ms bigint,
                                 p_calendar text, p_declared bigint, p_remaining bigint, p_leaves timestamptz,
                                 p_call bigint)
RETURNS bigint LANGUAGE sql AS $$
    SELECT fallback_observe(p_kind, p_scope, p_measure, p_window_ms, p_calendar, p_declared, p_remaining, p_leaves,
                            p_call, NULL::bigint);
$$;
