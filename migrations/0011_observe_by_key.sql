-- Observations of a provider's rate-limit headers that read only the rows they need (issue #9).
--
-- `fallback_observe` (0007) runs for every answer whose headers speak of a declared limit (Groq
-- and OpenRouter send them with every answer). Taking back learnt use, it looked for the
-- window's learnt rows through the retirement index, which holds every call of the window: with
-- no index for learnt rows the planner read the whole of quota_use (measured: a sequential scan
-- of 50,000 rows, 7 ms, for a window with no learnt row at all). Learnt rows are few: a partial
-- index holds only them and costs the calls' rows nothing. The function now runs, as those of
-- 0010, with `enable_seqscan = off`, so no cached plan can go on scanning a table as it grows.
--
-- Building the index locks writes to quota_use for as long as it reads the table once (well
-- under a second for a few hundred thousand rows); workers of earlier versions keep working.

CREATE INDEX quota_use_learnt ON quota_use (kind, scope, measure, window_ms, calendar, leaves_at) WHERE learnt;

ALTER FUNCTION fallback_observe(text, text, text, bigint, text, bigint, bigint, timestamptz, bigint)
    SET enable_seqscan = off;
