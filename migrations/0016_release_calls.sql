-- A call admitted but never sent (its job lost a provider's half-open probe to another worker)
-- is released: its flight ends as an answer's does, and its rows become learnt use, learnt when
-- the call was admitted.
--
-- Zeroing the rows would be wrong whenever a rate-limit figure was observed between the call's
-- admission and its release: `fallback_observe` reads every real row older than the observed
-- call as counted by the provider and takes learnt use back for it, so removing the row as well
-- would leave the window below the provider's count (review of the release, finding 2). As
-- learnt use the row still counts (never less than before), and it is what the next figure of
-- a call admitted after it may take back: the provider never counted it, so that figure shows
-- the room and the slot comes back. A figure of a call admitted before it counts it as newer,
-- as any learnt row of a later figure: never taken back by that one.
CREATE FUNCTION fallback_release_calls(p_calls bigint[])
RETURNS void LANGUAGE plpgsql SET enable_seqscan = off AS $$
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
    UPDATE quota_use SET learnt = true, learnt_at = coalesce(admitted_at, clock_timestamp())
     WHERE call_id = ANY (p_calls) AND NOT learnt AND credit_seq IS NULL;
END
$$;
