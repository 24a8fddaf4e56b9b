//! The service's own message headers, encoded and decoded side by side.
//!
//! Two kinds:
//! - notes on copies the service publishes: why a message was dead-lettered
//!   ([`REASON`]), where an undeliverable result was meant to go ([`UNDELIVERABLE_REPLY_TO`]);
//! - the state a parked job carries back from its delay queue ([`ParkedState`]: when it was
//!   first seen, how often it was parked, its attempts). That state decides the job's
//!   `free_wait`, its deadline and its delivery limit, so a publisher must not be able to set
//!   it: it travels with an HMAC-SHA256 over the job's identity and the state, under a secret
//!   every worker shares through the database ([`HeaderKey`]). A fresh message carrying forged
//!   or copied state is served as the fresh job it is.
//!
//! Names do not start with `x-`: those belong to the broker (RabbitMQ 4.x ignores client-set
//! `x-death`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use lapin::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::routing::Attempt;

/// Why a message was dead-lettered.
pub const REASON: &str = "fallback-reason";
/// Where a result that could not reach its `reply_to` was meant to go.
pub const UNDELIVERABLE_REPLY_TO: &str = "fallback-undeliverable-reply-to";
/// A parked job's state (JSON of [`ParkedState`]).
pub const PARKED_STATE: &str = "fallback-parked";
/// The HMAC of [`PARKED_STATE`] (hex).
pub const PARKED_MAC: &str = "fallback-parked-mac";

/// The most attempts carried along a parked job (older ones are dropped).
pub const MAX_CARRIED_ATTEMPTS: usize = 50;

/// What the service remembers of a job across parking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParkedState {
    /// Epoch ms of the job's first receipt: `max_wait` and `free_wait` count from here.
    pub first_seen_ms: u64,
    /// How many times the job was parked (parks are not failed deliveries).
    pub parks: u32,
    /// The attempts so far, so the final result tells the whole story.
    pub attempts: Vec<Attempt>,
}

impl ParkedState {
    pub fn new(first_seen: SystemTime, parks: u32, mut attempts: Vec<Attempt>) -> ParkedState {
        if let Some(excess) = attempts.len().checked_sub(MAX_CARRIED_ATTEMPTS) {
            attempts.drain(..excess);
        }
        let first_seen_ms =
            first_seen.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        ParkedState { first_seen_ms, parks, attempts }
    }

    /// When the job was first seen; never later than `now` (the clock of the worker that
    /// parked it may run ahead of ours).
    pub fn first_seen(&self, now: SystemTime) -> SystemTime {
        UNIX_EPOCH.checked_add(Duration::from_millis(self.first_seen_ms)).map_or(now, |t| t.min(now))
    }
}

/// The shared secret that authenticates [`ParkedState`].
#[derive(Clone)]
pub struct HeaderKey(Vec<u8>);

impl std::fmt::Debug for HeaderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeaderKey(…)")
    }
}

impl HeaderKey {
    pub fn new(secret: Vec<u8>) -> HeaderKey {
        HeaderKey(secret)
    }

    fn mac(&self, identity: &str, state_json: &str) -> Hmac<Sha256> {
        // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(&(identity.len() as u64).to_be_bytes());
        mac.update(identity.as_bytes());
        mac.update(state_json.as_bytes());
        mac
    }
}

/// The headers that carry `state` for the job `identity` (its idempotency key and fingerprint).
pub fn encode_parked(key: &HeaderKey, identity: &str, state: &ParkedState) -> [(&'static str, AMQPValue); 2] {
    let json = serde_json::to_string(state).unwrap_or_default();
    let tag = crate::job::to_hex(&key.mac(identity, &json).finalize().into_bytes());
    [(PARKED_STATE, AMQPValue::LongString(json.into())), (PARKED_MAC, AMQPValue::LongString(tag.into()))]
}

/// What the headers say of a parked job.
#[derive(Debug, Clone, PartialEq)]
pub enum Parked {
    /// No parked state: a fresh job.
    Fresh,
    /// State the service wrote for this very job.
    Authentic(ParkedState),
    /// State that is not the service's own for this job (forged, altered, or copied from
    /// another job): ignored, the job is served as fresh.
    Forged,
}

/// Reads and checks a parked job's state from its headers.
pub fn decode_parked(key: &HeaderKey, identity: &str, headers: &FieldTable) -> Parked {
    let state = text(headers, PARKED_STATE);
    let tag = text(headers, PARKED_MAC);
    let (Some(json), Some(tag)) = (state, tag) else {
        let any_ours = headers.inner().keys().any(|k| k.as_str().starts_with("fallback-parked"));
        return if any_ours { Parked::Forged } else { Parked::Fresh };
    };
    let Some(tag) = hex_bytes(&tag) else { return Parked::Forged };
    if key.mac(identity, &json).verify_slice(&tag).is_err() {
        return Parked::Forged;
    }
    serde_json::from_str(&json).map_or(Parked::Forged, Parked::Authentic)
}

/// A text header's value; other types are not ours.
pub fn text(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn hex_bytes(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::AttemptOutcome;

    fn table(pairs: impl IntoIterator<Item = (&'static str, AMQPValue)>) -> FieldTable {
        let mut table = FieldTable::default();
        for (k, v) in pairs {
            table.insert(k.into(), v);
        }
        table
    }

    fn state() -> ParkedState {
        let attempt = Attempt {
            provider: "groq".into(),
            outcome: AttemptOutcome::RateLimited,
            status: Some(429),
            latency_ms: 3,
            until: None,
            message: None,
        };
        ParkedState::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000), 2, vec![attempt])
    }

    #[test]
    fn the_service_reads_back_what_it_wrote() {
        let key = HeaderKey::new(b"secret".to_vec());
        let headers = table(encode_parked(&key, "msg:1", &state()));
        assert_eq!(decode_parked(&key, "msg:1", &headers), Parked::Authentic(state()));
    }

    #[test]
    fn forged_altered_or_transplanted_state_is_ignored() {
        let key = HeaderKey::new(b"secret".to_vec());
        let written = encode_parked(&key, "msg:1", &state());
        // Another job (or another secret) cannot use it.
        assert_eq!(decode_parked(&key, "msg:2", &table(written.clone())), Parked::Forged);
        assert_eq!(decode_parked(&HeaderKey::new(b"other".to_vec()), "msg:1", &table(written.clone())), Parked::Forged);
        // Altered state with the old tag.
        let mut altered = state();
        altered.first_seen_ms = 0;
        let [_, tag] = written;
        let forged = [(PARKED_STATE, AMQPValue::LongString(serde_json::to_string(&altered).unwrap().into())), tag];
        assert_eq!(decode_parked(&key, "msg:1", &table(forged)), Parked::Forged);
        // State without a tag, a tag that is not hex, a number where text belongs.
        assert_eq!(
            decode_parked(&key, "msg:1", &table([(PARKED_STATE, AMQPValue::LongString("{}".into()))])),
            Parked::Forged
        );
        let bad_tag =
            [(PARKED_STATE, AMQPValue::LongString("{}".into())), (PARKED_MAC, AMQPValue::LongString("zz€".into()))];
        assert_eq!(decode_parked(&key, "msg:1", &table(bad_tag)), Parked::Forged);
        assert_eq!(decode_parked(&key, "msg:1", &table([(PARKED_MAC, AMQPValue::LongLongInt(7))])), Parked::Forged);
        assert_eq!(decode_parked(&key, "msg:1", &FieldTable::default()), Parked::Fresh);
    }

    #[test]
    fn first_seen_is_never_in_the_future_and_never_overflows() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let far = ParkedState { first_seen_ms: u64::MAX, parks: 0, attempts: vec![] };
        assert_eq!(far.first_seen(now), now);
        assert_eq!(state().first_seen(now), UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    }

    #[test]
    fn only_the_newest_attempts_are_carried() {
        let many = vec![state().attempts[0].clone(); MAX_CARRIED_ATTEMPTS + 7];
        assert_eq!(ParkedState::new(UNIX_EPOCH, 0, many).attempts.len(), MAX_CARRIED_ATTEMPTS);
    }
}
