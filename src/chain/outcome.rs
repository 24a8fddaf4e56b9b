//! Attempt outcomes (contract §3) and how each one moves the chain and the shared state (§6).

use std::time::{Duration, SystemTime};

use super::clock::later;
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
/// How long a circuit is open at first, the shortest it ever is.
pub const CIRCUIT_BASE: Duration = Duration::from_secs(5);
const CIRCUIT_MAX: Duration = Duration::from_secs(300);
/// The shortest cooldown a provider can ask for: a `retry-after: 0` (or a reset already past)
/// would otherwise invite an immediate herd of retries.
pub const SHORTEST_ASKED_COOLDOWN: Duration = Duration::from_secs(1);
/// The longest: a garbled header or a far-away reset must not take a provider out for days.
pub const LONGEST_ASKED_COOLDOWN: Duration = Duration::from_secs(24 * 3600);

/// The shared cooldown a failure calls for (contract §6), if any. Server errors are handled by
/// [`circuit_cooldown`], client errors never cool a provider down.
pub fn cooldown_for(provider: &str, failure: &Failure, now: SystemTime) -> Option<(SystemTime, CooldownReason)> {
    let asked_or = |default: Duration| match failure.retry_at {
        Some(asked) => clamp_asked(provider, asked, now),
        None => later(now, default),
    };
    match failure.kind {
        FailureKind::RateLimited => {
            let reason = match (failure.retry_at, failure.daily, failure.retry_guessed) {
                (None, _, _) => CooldownReason::RateLimitedEstimate,
                (Some(_), true, true) => CooldownReason::QuotaDayEstimate,
                (Some(_), true, false) => CooldownReason::QuotaDay,
                (Some(_), false, _) => CooldownReason::RateLimited,
            };
            Some((asked_or(DEFAULT_RATE_LIMIT_COOLDOWN), reason))
        }
        FailureKind::Timeout | FailureKind::Connect => {
            Some((later(now, UNREACHABLE_COOLDOWN), CooldownReason::Unreachable))
        }
        FailureKind::Auth => Some((later(now, AUTH_COOLDOWN), CooldownReason::Auth)),
        FailureKind::Credits => Some((asked_or(AUTH_COOLDOWN), CooldownReason::Credits)),
        FailureKind::ModelUnavailable => {
            Some((later(now, MODEL_UNAVAILABLE_COOLDOWN), CooldownReason::ModelUnavailable))
        }
        FailureKind::Server | FailureKind::Client => None,
    }
}

/// A time a provider asked for (retry-after, a reset header, `RetryInfo`, a daily reset), held
/// to [1 s, 24 h] from `now`. Every such time passes through here; a clamp is logged because it
/// means the provider (or our reading of it) said something odd.
pub fn clamp_asked(provider: &str, asked: SystemTime, now: SystemTime) -> SystemTime {
    let earliest = later(now, SHORTEST_ASKED_COOLDOWN);
    let latest = later(now, LONGEST_ASKED_COOLDOWN);
    let clamped = asked.clamp(earliest, latest);
    if clamped != asked {
        let from_now = |t: SystemTime| match t.duration_since(now) {
            Ok(ahead) => ahead.as_secs_f64(),
            Err(behind) => -behind.duration().as_secs_f64(),
        };
        tracing::warn!(
            provider,
            asked_secs = from_now(asked),
            clamped_secs = from_now(clamped),
            "clamped the cooldown a provider asked for to [1 s, 24 h]"
        );
    }
    clamped
}

/// After `consecutive` 5xx answers in a row: the circuit's open time, doubling with each further
/// failure (5 s, 10 s, 20 s, … up to 5 min). When it ends one call across all workers is the
/// half-open probe: its success closes the circuit, its failure reopens it for longer.
pub fn circuit_cooldown(consecutive: u32) -> Option<Duration> {
    let over = consecutive.checked_sub(CIRCUIT_THRESHOLD)?;
    Some(CIRCUIT_BASE.saturating_mul(1 << over.min(8)).min(CIRCUIT_MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(kind: FailureKind, retry_at: Option<SystemTime>, daily: bool) -> Failure {
        Failure {
            kind,
            status: Some(429),
            retry_at,
            daily,
            retry_guessed: false,
            scope: crate::routing::LimitScope::Model,
            message: String::new(),
        }
    }

    #[test]
    fn cooldowns_follow_the_contract() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let given = now + Duration::from_secs(7);
        assert_eq!(
            cooldown_for("p", &failure(FailureKind::RateLimited, Some(given), false), now),
            Some((given, CooldownReason::RateLimited))
        );
        assert_eq!(
            cooldown_for("p", &failure(FailureKind::RateLimited, None, false), now),
            Some((now + Duration::from_secs(60), CooldownReason::RateLimitedEstimate))
        );
        assert_eq!(
            cooldown_for("p", &failure(FailureKind::RateLimited, None, true), now),
            Some((now + Duration::from_secs(60), CooldownReason::RateLimitedEstimate)),
            "a daily quota's 429 with no time to go by: an estimate too"
        );
        let guessed_midnight = Failure { retry_guessed: true, ..failure(FailureKind::RateLimited, Some(given), true) };
        assert_eq!(
            cooldown_for("p", &guessed_midnight, now),
            Some((given, CooldownReason::QuotaDayEstimate)),
            "a daily reset we guessed is our estimate, not the provider's word"
        );
        assert_eq!(
            cooldown_for("p", &failure(FailureKind::RateLimited, Some(given), true), now).unwrap().1,
            CooldownReason::QuotaDay
        );
        assert_eq!(
            cooldown_for("p", &failure(FailureKind::Timeout, None, false), now),
            Some((now + Duration::from_secs(30), CooldownReason::Unreachable))
        );
        assert_eq!(
            cooldown_for("p", &failure(FailureKind::Connect, None, false), now).unwrap().0,
            now + Duration::from_secs(30)
        );
        assert_eq!(
            cooldown_for("p", &failure(FailureKind::Auth, None, false), now),
            Some((now + Duration::from_secs(3600), CooldownReason::Auth))
        );
        assert_eq!(cooldown_for("p", &failure(FailureKind::Client, None, false), now), None);
        assert_eq!(cooldown_for("p", &failure(FailureKind::Server, None, false), now), None);
    }

    #[test]
    fn circuit_opens_after_a_run_and_grows() {
        assert_eq!(circuit_cooldown(2), None);
        let opens: Vec<u64> = (3..=10).map(|n| circuit_cooldown(n).unwrap().as_secs()).collect();
        assert_eq!(opens, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(circuit_cooldown(u32::MAX), Some(Duration::from_secs(300)));
    }

    #[test]
    fn model_unavailable_cools_down_an_hour() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let gone = failure(FailureKind::ModelUnavailable, None, false);
        assert_eq!(
            cooldown_for("p", &gone, now),
            Some((now + Duration::from_secs(3600), CooldownReason::ModelUnavailable))
        );
    }

    /// Log lines written while `f` runs.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        tracing::subscriber::with_default(subscriber, f);
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn asked_cooldowns_are_clamped_to_one_second_and_one_day_and_the_clamp_is_logged() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let hour = now + Duration::from_secs(3600);
        let log = logged(|| assert_eq!(clamp_asked("groq", hour, now), hour));
        assert!(log.is_empty(), "no clamp, no log: {log}");

        let cases = [
            (now, now + Duration::from_secs(1)),
            (now - Duration::from_secs(3600), now + Duration::from_secs(1)),
            (now + Duration::from_millis(200), now + Duration::from_secs(1)),
            (now + Duration::from_secs(3 * 86400), now + Duration::from_secs(86400)),
            (SystemTime::UNIX_EPOCH, now + Duration::from_secs(1)),
            (crate::chain::clock::far_future(), now + Duration::from_secs(86400)),
        ];
        for (asked, expected) in cases {
            let log = logged(|| assert_eq!(clamp_asked("groq", asked, now), expected));
            assert!(log.contains("WARN") && log.contains("provider=\"groq\""), "{log}");
            assert!(log.contains("asked_secs=") && log.contains("clamped_secs="), "{log}");
        }
    }

    #[test]
    fn every_time_a_provider_gives_goes_through_the_clamp() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = now + Duration::from_secs(86400);
        // A daily quota resetting in 30 h, a credit reset in a week, a retry-after of 0 s.
        let daily = failure(FailureKind::RateLimited, Some(now + Duration::from_secs(30 * 3600)), true);
        assert_eq!(cooldown_for("p", &daily, now), Some((day, CooldownReason::QuotaDay)));
        let credits = failure(FailureKind::Credits, Some(now + Duration::from_secs(7 * 86400)), false);
        assert_eq!(cooldown_for("p", &credits, now), Some((day, CooldownReason::Credits)));
        let at_once = failure(FailureKind::RateLimited, Some(now), false);
        assert_eq!(cooldown_for("p", &at_once, now).unwrap().0, now + Duration::from_secs(1));
    }

    #[test]
    fn only_rate_limits_are_the_providers_word() {
        assert!(CooldownReason::RateLimited.is_providers_word() && CooldownReason::QuotaDay.is_providers_word());
        for estimate in [
            CooldownReason::RateLimitedEstimate,
            CooldownReason::QuotaDayEstimate,
            CooldownReason::Circuit,
            CooldownReason::Unreachable,
            CooldownReason::Auth,
            CooldownReason::Unrecognized,
        ] {
            assert!(!estimate.is_providers_word(), "{estimate:?}");
        }
    }

    #[test]
    fn outcome_names_match_the_contract() {
        let json = serde_json::to_string(&AttemptOutcome::SkippedPaid).unwrap();
        assert_eq!(json, "\"skipped_paid\"");
        assert_eq!(AttemptOutcome::RateLimited.as_str(), "rate_limited");
        assert_eq!(serde_json::to_string(&AttemptOutcome::RejectedOutput).unwrap(), "\"rejected_output\"");
        assert_eq!(AttemptOutcome::RejectedOutput.as_str(), "rejected_output");
        assert!(AttemptOutcome::RejectedOutput.is_final_for_job(), "a rejected provider is dropped for the job");
        assert_eq!(CooldownReason::parse("quota_day"), Some(CooldownReason::QuotaDay));
        for reason in [CooldownReason::RateLimitedEstimate, CooldownReason::QuotaDayEstimate] {
            assert_eq!(CooldownReason::parse(reason.as_str()), Some(reason), "stored and read back the same");
        }
    }
}
