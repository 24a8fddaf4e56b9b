-- Observations of a provider's rate-limit headers that read only the rows they need (issue #9).
--
-- `fallback_observe` (0007) runs for every answer whose headers speak of a declared limit (Groq
-- and OpenRouter send them with every answer). Taking back learnt use, it looked for the
-- window's learnt rows through the retirement index, which holds every call of the window: with
-- no index for learnt rows the planner read the whole of quota_use (measured: a sequential scan
-- of 50,000 rows, 7 ms, for a window with no learnt row at all). Learnt rows are few: a partial
-- index holds only them and costs the calls' rows nothing. The calls admitted after the
-- observed one (which its figure does not count) were found through the same index of all the
-- window's calls, filtered by id: they are now found through the call index (a review measured
-- 23,200 rows read to keep 2 under a generic plan). The function runs, as those of 0010, with
-- `enable_seqscan = off`, so no cached plan can go on scanning a table as it grows.
--
-- Building the index locks writes to quota_use for as long as it reads the table once (well
-- under a second for a few hundred thousand rows); workers of earlier versions keep working.

CREATE INDEX quota_use_learnt ON quota_use (kind, scope, measure, window_ms, calendar, leaves_at) WHERE learnt;

-- As 0007, with the calls admitted after the observed one found through the call index.
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
    -- The calls admitted after it, found through the call index (a few: those admitted while
    -- it was in flight), then kept if in this window: through the window's index, a plan would
    -- read every call of the window to find them.
    WITH newer AS MATERIALIZED (
        SELECT kind, scope, measure, window_ms, calendar, amount, leaves_at, learnt
          FROM quota_use WHERE call_id > p_call)
    SELECT v_used - coalesce(sum(amount), 0) - v_target INTO v_excess FROM newer
     WHERE kind = p_kind AND scope = p_scope AND measure = p_measure AND window_ms = p_window_ms
       AND calendar = p_calendar AND NOT learnt AND leaves_at > v_now;
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

