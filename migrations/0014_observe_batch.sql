-- Every window an answer's rate-limit headers speak of, corrected in one statement.
--
-- Providers that send rate-limit headers (Groq, OpenRouter, Cerebras, Anthropic, OpenAI) send
-- them with every answer, usually for two or more budgets (requests per day, tokens per
-- minute), and a pool's windows match them too. A worker called `fallback_observe` once per
-- window, each its own round trip and transaction, one after the other before the job went on.
-- `fallback_observe_batch` takes the windows of one answer as arrays (when each learnt use
-- leaves, in milliseconds since the epoch) and observes each in turn,
-- in the canonical order of windows (the order admissions and answers lock them in, so this
-- transaction, which holds each window's row until it commits, never deadlocks with them), in
-- one transaction. What each window learns or gives back is what `fallback_observe` (0013)
-- decides for it alone.

CREATE FUNCTION fallback_observe_batch(p_kinds text[], p_scopes text[], p_measures text[], p_window_ms bigint[],
                                       p_calendars text[], p_declared bigint[], p_remaining bigint[],
                                       p_leaves_ms bigint[], p_call bigint, p_sent bigint[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT t.k, t.s, t.m, t.wm, t.c, t.d, t.rem, to_timestamp(t.l / 1000.0) AS l, t.sent
               FROM unnest(p_kinds, p_scopes, p_measures, p_window_ms, p_calendars, p_declared, p_remaining,
                           p_leaves_ms, p_sent) AS t(k, s, m, wm, c, d, rem, l, sent)
              WHERE t.k IS NOT NULL AND t.s IS NOT NULL AND t.m IS NOT NULL AND t.wm IS NOT NULL
                AND t.c IS NOT NULL AND t.d IS NOT NULL AND t.rem IS NOT NULL AND t.l IS NOT NULL
              ORDER BY t.k COLLATE "C", t.s COLLATE "C", t.m COLLATE "C", t.wm, t.c COLLATE "C" LOOP
        PERFORM fallback_observe(r.k, r.s, r.m, r.wm, r.c, r.d, r.rem, r.l, p_call, r.sent);
    END LOOP;
END
$$;
