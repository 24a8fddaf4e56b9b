-- A call admitted but never sent (its job lost a provider's half-open probe to another worker)
-- is released: its flight ends as an answer's does, and its rows become learnt use, learnt at
-- the release.
--
-- Zeroing the rows would be wrong whenever a rate-limit figure was observed between the call's
-- admission and its release: `fallback_observe` reads every real row older than the observed
-- call as counted by the provider, and so learnt less use, or took learnt use back, for it;
-- removing the row as well would leave the window below the provider's count (review of the
-- release, finding 2). As learnt use the row still counts (never less than before) and stands
-- for what such a figure did not learn. Learnt at the release, it is what 0013 makes of any
-- learnt use: older than the figures of calls admitted after the release, which never held the
-- call and may take it back when they show the room, and newer than the figures of calls
-- admitted before it, which never take it back. Older than every figure ('-infinity', round 2)
-- let a figure of an earlier call that arrived late take it back although the use it stood for
-- was newer than that figure: the window again one below the provider (round 3). So the slot
-- comes back with the figure of the next call admitted after the release.
--
-- Its window locks are waited for 1 s at most, as every admission's: a release behind a window
-- held elsewhere fails as busy (the worker then answers the call instead) rather than run into
-- the worker's state-call timeout, which counts towards taking the database for down.
CREATE FUNCTION fallback_release_calls(p_calls bigint[])
RETURNS void LANGUAGE plpgsql SET lock_timeout = '1s' SET enable_seqscan = off AS $$
DECLARE
    v_none bigint[] := array_fill(NULL::bigint, ARRAY[coalesce(cardinality(p_calls), 0)]);
BEGIN
    IF coalesce(cardinality(p_calls), 0) = 0 THEN
        RETURN;
    END IF;
    -- Their flights end now, as answers that report no count (windows locked in the canonical
    -- order there); credits are never released this way.
    PERFORM fallback_apply_finishes(p_calls, v_none, v_none,
                                    array_fill(true, ARRAY[cardinality(p_calls)]), v_none);
    UPDATE quota_use SET learnt = true, learnt_at = clock_timestamp()
     WHERE call_id = ANY (p_calls) AND NOT learnt AND credit_seq IS NULL;
END
$$;
