-- The circuit's half-open probe (contract §6): when the one call probing an expired circuit was
-- taken, NULL while none is in flight. Once a run of 5xx has opened the circuit only the probe's
-- 5xx lengthens the run (the others are late answers of calls sent before it opened), so the
-- open time doubles per failed probe rather than per call that happened to be in flight.
ALTER TABLE provider_state ADD COLUMN circuit_probe_at timestamptz;
