-- Learnt use that says which figure taught it, and a credit's own calls counted once in its
-- figures (`fallback_observe`).
--
-- Figures observed out of order: call Y answers first and its (higher) figure is learnt; X's
-- figure, taken earlier, arrives next. 0007 to 0012 read "what we count minus the calls
-- admitted after X" as what the provider counted at X, but that count held the use learnt from
-- Y's later figure, and took it back as an excess: the window counted less than the provider
-- (152 taken, 102 counted in review 3's test). Each learnt row now says when it was learnt
-- (`learnt_at`; NULL for the learnt rows of earlier versions). A figure is taken when the
-- provider receives its call, after the call was admitted, and calls in flight together reach
-- it in any order (review 4: ranking figures by call id took back what a call admitted before X
-- but received after it taught). So only a row learnt before X was admitted is *older* than
-- X's figure, whatever call taught it: its figure was taken before X existed. Every other
-- learnt row is *newer*: like the calls admitted after X, it is left out of what the provider
-- counted at X, and it is never taken back; only older ones are (and rows of earlier
-- versions, as before). When X's admission time is unknown (a row of 0007's `fallback_admit`),
-- every learnt row of 0013 is newer: less is taken back, never more.
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
-- running during the upgrade (their learnt rows say when they were learnt too).

ALTER TABLE quota_use ADD COLUMN learnt_at timestamptz;

-- Whether a learnt row (learnt at `p_learnt_at`, NULL before 0013) was taught by a figure taken
-- before that of a call admitted at `p_seen` (NULL when unknown). Unsure: no (newer).
CREATE FUNCTION fallback_learnt_is_older(p_learnt_at timestamptz, p_seen timestamptz)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT p_learnt_at IS NULL OR (p_seen IS NOT NULL AND p_learnt_at <= p_seen);
$$;

-- As 0012, where learnt rows of figures not known to be older than the observed call's are
-- neither counted as seen by it nor taken back, each learnt row says when it was learnt, and
-- the observed credit counts as unseen only beyond what its call's figure surely holds
-- (`p_sent`).
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
