-- Every change of a provider's shared state reaches every worker, whoever made it.
--
-- Workers keep each provider's cooldown and 5xx run in memory, from NOTIFY on
-- `fallback_provider_state`, and read the table only when their LISTEN session (re)connects.
-- The service's own writes notify in their statements; a change made by hand (the documented
-- way to clear a cooldown: `UPDATE provider_state SET cooldown_until = now() WHERE provider =
-- 'groq'`), by a script or by a restore sent none, and running workers kept the old cooldown
-- until they restarted (a black-box run: `status` said usable, every job still skipped it).
--
-- A trigger now sends the row as committed after every insert, change of the columns workers
-- hold, and delete, marked `"table": true`: a worker sets its copy to it exactly (the table
-- is the truth), where the service's own notices only ever move a cooldown forward (a cooldown
-- only the worker holds, which the database refused or has not taken yet, is kept when it ends
-- later). Within a transaction the trigger's notice comes after the statement's own, and
-- notices arrive in commit order, so the last one a worker applies is the row as it stands. A
-- row renamed away or deleted is announced with no state.

-- Milliseconds since the epoch of a cooldown's end, for every value the column can hold: an
-- `infinity` typed by hand made `(extract(epoch FROM ...) * 1000)::bigint` fail, and with it the
-- change (in the trigger) and every worker's reload of the table.
CREATE FUNCTION fallback_epoch_ms(p_at timestamptz) RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_at = 'infinity' THEN 253402300799999
                WHEN p_at = '-infinity' THEN 0
                ELSE (extract(epoch FROM p_at) * 1000)::bigint END;
$$;

-- The notice of a provider's row: `NULL` state for a row gone (deleted, or renamed away).
-- NOTIFY refuses a payload of 8000 bytes or more, and a refused NOTIFY fails the change: a
-- notice that would be too long (a long reason or detail typed by hand, escaped as JSON) goes
-- without its detail and with its reason cut, and one still too long (a provider name of
-- thousands of characters) goes unsent: the row is still the truth, read at every reconnect.
CREATE FUNCTION fallback_provider_state_notify(p_provider text, p_until timestamptz, p_reason text,
                                               p_detail text, p_errors integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_payload text;
BEGIN
    v_payload := json_build_object('provider', p_provider, 'until_ms', fallback_epoch_ms(p_until),
        'reason', p_reason, 'detail', left(p_detail, 1000), 'server_errors', p_errors, 'table', true)::text;
    IF octet_length(v_payload) > 7900 THEN
        v_payload := json_build_object('provider', p_provider, 'until_ms', fallback_epoch_ms(p_until),
            'reason', left(p_reason, 100), 'detail', NULL, 'server_errors', p_errors, 'table', true)::text;
    END IF;
    IF octet_length(v_payload) <= 7900 THEN
        PERFORM pg_notify('fallback_provider_state', v_payload);
    END IF;
END
$$;

CREATE FUNCTION fallback_provider_state_notice() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM fallback_provider_state_notify(OLD.provider, NULL, NULL, NULL, 0);
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.provider IS DISTINCT FROM NEW.provider THEN
        PERFORM fallback_provider_state_notify(OLD.provider, NULL, NULL, NULL, 0);
    END IF;
    PERFORM fallback_provider_state_notify(NEW.provider, NEW.cooldown_until, NEW.cooldown_reason,
                                           NEW.cooldown_detail, NEW.consecutive_server_errors);
    RETURN NEW;
END
$$;

CREATE TRIGGER provider_state_inserted AFTER INSERT ON provider_state
    FOR EACH ROW EXECUTE FUNCTION fallback_provider_state_notice();
CREATE TRIGGER provider_state_changed AFTER UPDATE ON provider_state
    FOR EACH ROW
    WHEN (OLD.cooldown_until IS DISTINCT FROM NEW.cooldown_until
       OR OLD.cooldown_reason IS DISTINCT FROM NEW.cooldown_reason
       OR OLD.cooldown_detail IS DISTINCT FROM NEW.cooldown_detail
       OR OLD.consecutive_server_errors IS DISTINCT FROM NEW.consecutive_server_errors
       OR OLD.provider IS DISTINCT FROM NEW.provider)
    EXECUTE FUNCTION fallback_provider_state_notice();
CREATE TRIGGER provider_state_deleted AFTER DELETE ON provider_state
    FOR EACH ROW EXECUTE FUNCTION fallback_provider_state_notice();
