//! Attempt outcomes (contract §3) and how each one moves the chain and the shared state (§6).

use std::time::{Duration, SystemTime};

use crate::providers::{Failure, FailureKind};
use crate::routing::{AttemptOutcome, CooldownReason};

impl From<FailureKind> for AttemptOutcome {
    fn from(kind: FailureKind) -> Self {
        match kind {
            FailureKind::RateLimited => Self::RateLimited,
            FailureKind::Timeout => Self::Timeout,
            FailureKind::Connect => Self::ConnectError,
            FailureKind::Server => Self::ServerError,
            FailureKind::Auth | FailureKind::Credits => Self::AuthError,
            FailureKind::Client => Self::ClientError,
            FailureKind::ModelUnavailable => Self::ModelUnavailable,
        }
    }
}

pub const DEFAULT_RATE_LIMIT_COOLDOWN: Duration = Duration::from_secs(60);
pub const UNREACHABLE_COOLDOWN: Duration = Duration::from_secs(30);
pub const AUTH_COOLDOWN: Duration = Duration::from_secs(3600);
pub const MODEL_UNAVAILABLE_COOLDOWN: Duration = Duration::from_secs(3600);
/// Consecutive 5xx answers (across all workers) that open the circuit.
pub const CIRCUIT_THRESHOLD: u32 = 3;
const CIRCUIT_BASE: Duration = Duration::from_secs(30);
const CIRCUIT_MAX: Duration = Duration::from_secs(300);

/// The shared cooldown a failure calls for (contract §6), if any. Server errors are handled by
/// [`circuit_cooldown`], client errors never cool a provider down.
pub fn cooldown_for(failure: &Failure, now: SystemTime) -> Option<(SystemTime, CooldownReason)> {
    match failure.kind {
        FailureKind::RateLimited => {
            let reason = if failure.daily { CooldownReason::QuotaDay } else { CooldownReason::RateLimited };
            Some((failure.retry_at.unwrap_or(now + DEFAULT_RATE_LIMIT_COOLDOWN), reason))
        }
        FailureKind::Timeout | FailureKind::Connect => Some((now + UNREACHABLE_COOLDOWN, CooldownReason::Unreachable)),
        FailureKind::Auth => Some((now + AUTH_COOLDOWN, CooldownReason::Auth)),
        FailureKind::Credits => Some((failure.retry_at.unwrap_or(now + AUTH_COOLDOWN), CooldownReason::Credits)),
        FailureKind::ModelUnavailable => Some((now + MODEL_UNAVAILABLE_COOLDOWN, CooldownReason::ModelUnavailable)),
        FailureKind::Server | FailureKind::Client => None,
    }
}

/// After `consecutive` 5xx answers in a row: the circuit's open time, growing with each further
/// failure (30 s, 60 s, … up to 5 min). When it ends the next call is the half-open probe: its
/// success closes the circuit, its failure reopens it for longer.
pub fn circuit_cooldown(consecutive: u32) -> Option<Duration> {
    let over = consecutive.checked_sub(CIRCUIT_THRESHOLD)?;
    Some(CIRCUIT_BASE.saturating_mul(1 << over.min(8)).min(CIRCUIT_MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(kind: FailureKind, retry_at: Option<SystemTime>, daily: bool) -> Failure {
        Failure { kind, status: Some(429), retry_at, daily, message: String::new() }
    }

    #[test]
    fn cooldowns_follow_the_contract() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let given = now + Duration::from_secs(7);
        assert_eq!(
            cooldown_for(&failure(FailureKind::RateLimited, Some(given), false), now),
            Some((given, CooldownReason::RateLimited))
        );
        assert_eq!(
            cooldown_for(&failure(FailureKind::RateLimited, None, false), now),
            Some((now + Duration::from_secs(60), CooldownReason::RateLimited))
        );
        assert_eq!(
            cooldown_for(&failure(FailureKind::RateLimited, Some(given), true), now).unwrap().1,
            CooldownReason::QuotaDay
        );
        assert_eq!(
            cooldown_for(&failure(FailureKind::Timeout, None, false), now),
            Some((now + Duration::from_secs(30), CooldownReason::Unreachable))
        );
        assert_eq!(
            cooldown_for(&failure(FailureKind::Connect, None, false), now).unwrap().0,
            now + Duration::from_secs(30)
        );
        assert_eq!(
            cooldown_for(&failure(FailureKind::Auth, None, false), now),
            Some((now + Duration::from_secs(3600), CooldownReason::Auth))
        );
        assert_eq!(cooldown_for(&failure(FailureKind::Client, None, false), now), None);
        assert_eq!(cooldown_for(&failure(FailureKind::Server, None, false), now), None);
    }

    #[test]
    fn circuit_opens_after_a_run_and_grows() {
        assert_eq!(circuit_cooldown(2), None);
        assert_eq!(circuit_cooldown(3), Some(Duration::from_secs(30)));
        assert_eq!(circuit_cooldown(4), Some(Duration::from_secs(60)));
        assert_eq!(circuit_cooldown(40), Some(Duration::from_secs(300)));
    }

    #[test]
    fn outcome_names_match_the_contract() {
        let json = serde_json::to_string(&AttemptOutcome::SkippedPaid).unwrap();
        assert_eq!(json, "\"skipped_paid\"");
        assert_eq!(AttemptOutcome::RateLimited.as_str(), "rate_limited");
        assert_eq!(CooldownReason::parse("quota_day"), Some(CooldownReason::QuotaDay));
    }
}
