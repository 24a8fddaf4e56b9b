-- A call admitted but never sent (its job lost a provider's half-open probe to another worker)
-- is released: its flight ends as an answer's does, and its rows become learnt use that every
-- figure counts as older than itself (`learnt_at` '-infinity').
--
-- Zeroing the rows would be wrong whenever a rate-limit figure was observed between the call's
-- admission and its release: `fallback_observe` reads every real row older than the observed
-- call as counted by the provider and takes learnt use back for it, so removing the row as well
-- would leave the window below the provider's count (review of the release, finding 2). As
-- learnt use the row still counts (never less than before), and it is what the next figure
-- may take back: the provider never counted the call, so no figure of any call holds it, and
-- taking it back for any figure leaves the window at or above the provider's count. Learnt
-- "when the call was admitted" instead, the figure of a call admitted before it (usually the
-- probe's own: the job that wins the probe is the one admitted first) read it as newer and
-- never took it back (review of the release, round 2). A figure works out its excess from the
-- rows as they stand, so no use is taken back twice.
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
    UPDATE quota_use SET learnt = true, learnt_at = '-infinity'
     WHERE call_id = ANY (p_calls) AND NOT learnt AND credit_seq IS NULL;
END
$$;
