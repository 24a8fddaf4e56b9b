//! Strict sliding-window accounting, for the embedded store (Postgres runs the same rules in
//! `fallback_acquire`, migrations/0002).
//!
//! A request occupies every window from when it is sent until its answer arrives; never more
//! than `requests` calls (or `tokens` tokens) may occupy any window of length `per`.

use std::time::{Duration, SystemTime};

use super::QuotaMeasure;
use crate::config::LimitConfig;

/// One request counted against a provider's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub id: i64,
    /// When the answer arrived; `None` while in flight.
    pub done: Option<SystemTime>,
    /// When an unanswered request stops counting (its worker died).
    pub expires: SystemTime,
    pub tokens: u64,
}

impl Usage {
    /// The end of the request's occupancy.
    fn end(&self) -> SystemTime {
        self.done.unwrap_or(self.expires)
    }
}

/// Why a request cannot be admitted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    Until(SystemTime, QuotaMeasure),
    /// The request alone exceeds a token limit.
    TooLarge,
}

/// Checks a new request of `tokens` against `limits`, given the provider's recorded usage.
pub fn check(usage: &[Usage], limits: &[LimitConfig], tokens: u64, now: SystemTime) -> Result<(), Blocked> {
    let mut wait: Option<(SystemTime, QuotaMeasure)> = None;
    for limit in limits {
        let since = now.checked_sub(limit.per).unwrap_or(SystemTime::UNIX_EPOCH);
        // Occupying requests, by when they leave the window (in-flight ones: not before now).
        let mut occupying: Vec<(SystemTime, u64)> =
            usage.iter().filter(|u| u.end() > since).map(|u| (u.end().min(now), u.tokens)).collect();
        occupying.sort();
        let free_at = match (limit.requests, limit.tokens) {
            (Some(max), _) if occupying.len() as u64 >= max => {
                // The request that must leave the window before one more fits; with a limit of
                // 0 (a local share rounded down) nothing ever fits: retry after a window.
                let leaving = usize::try_from(max).ok().and_then(|max| occupying.len().checked_sub(max));
                let left_at = leaving.and_then(|i| occupying.get(i)).map_or(now, |(end, _)| *end);
                Some((later(left_at, limit.per), QuotaMeasure::Requests))
            }
            (_, Some(max)) => {
                if tokens > max {
                    return Err(Blocked::TooLarge);
                }
                let used = occupying.iter().fold(0u64, |sum, (_, t)| sum.saturating_add(*t));
                let excess = used.saturating_add(tokens).saturating_sub(max);
                (excess > 0).then(|| {
                    let mut freed = 0u64;
                    let leaving = occupying.iter().find(|(_, t)| {
                        freed = freed.saturating_add(*t);
                        freed >= excess
                    });
                    (later(leaving.map_or(now, |(end, _)| *end), limit.per), QuotaMeasure::Tokens)
                })
            }
            _ => None,
        };
        if let Some(candidate) = free_at
            && wait.is_none_or(|(w, _)| candidate.0 > w)
        {
            wait = Some(candidate);
        }
    }
    match wait {
        Some((until, measure)) => Err(Blocked::Until(until, measure)),
        None => Ok(()),
    }
}

/// `at + per`, saturating far in the future instead of overflowing.
fn later(at: SystemTime, per: Duration) -> SystemTime {
    at.checked_add(per).unwrap_or(at)
}

/// Drops usage that no window of `longest` can see any more.
pub fn prune(usage: &mut Vec<Usage>, longest: Duration, now: SystemTime) {
    let since = now.checked_sub(longest).unwrap_or(SystemTime::UNIX_EPOCH);
    usage.retain(|u| u.end() > since);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests(n: u64, secs: u64) -> LimitConfig {
        LimitConfig { requests: Some(n), tokens: None, per: Duration::from_secs(secs), resets: None }
    }

    fn tokens(n: u64, secs: u64) -> LimitConfig {
        LimitConfig { requests: None, tokens: Some(n), per: Duration::from_secs(secs), resets: None }
    }

    fn done(id: i64, at: SystemTime, tokens: u64) -> Usage {
        Usage { id, done: Some(at), expires: at + Duration::from_secs(60), tokens }
    }

    #[test]
    fn the_nth_request_in_a_window_waits_for_the_oldest_to_leave() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let usage: Vec<Usage> = (0..3).map(|i| done(i, t0 + Duration::from_millis(100 * i as u64), 1)).collect();
        let now = t0 + Duration::from_millis(500);
        assert_eq!(
            check(&usage, &[requests(3, 2)], 1, now),
            Err(Blocked::Until(t0 + Duration::from_secs(2), QuotaMeasure::Requests))
        );
        assert_eq!(check(&usage, &[requests(4, 2)], 1, now), Ok(()));
        assert_eq!(check(&usage, &[requests(3, 2)], 1, t0 + Duration::from_secs(2)), Ok(()), "the oldest has left");
    }

    #[test]
    fn a_request_in_flight_occupies_its_window_until_answered() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let in_flight = Usage { id: 1, done: None, expires: now + Duration::from_secs(30), tokens: 0 };
        let another = Usage { id: 2, done: None, expires: now + Duration::from_secs(30), tokens: 0 };
        assert_eq!(
            check(&[in_flight, another], &[requests(2, 2)], 1, now),
            Err(Blocked::Until(now + Duration::from_secs(2), QuotaMeasure::Requests))
        );
    }

    #[test]
    fn token_windows_count_estimates_and_refuse_what_can_never_fit() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let usage = vec![done(1, t0, 4000), done(2, t0 + Duration::from_secs(10), 1500)];
        let now = t0 + Duration::from_secs(20);
        assert_eq!(check(&usage, &[tokens(6000, 60)], 500, now), Ok(()));
        assert_eq!(
            check(&usage, &[tokens(6000, 60)], 2000, now),
            Err(Blocked::Until(t0 + Duration::from_secs(60), QuotaMeasure::Tokens))
        );
        assert_eq!(check(&usage, &[tokens(6000, 60)], 7000, now), Err(Blocked::TooLarge));
    }

    #[test]
    fn the_latest_of_several_limits_wins_and_old_usage_is_pruned() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut usage: Vec<Usage> = (0..5).map(|i| done(i, t0 + Duration::from_secs(i as u64), 1)).collect();
        let now = t0 + Duration::from_secs(5);
        let limits = [requests(5, 10), requests(100, 3600)];
        assert_eq!(
            check(&usage, &limits, 1, now),
            Err(Blocked::Until(t0 + Duration::from_secs(10), QuotaMeasure::Requests))
        );
        prune(&mut usage, Duration::from_secs(3), now);
        assert_eq!(usage.len(), 2);
    }

    #[test]
    fn a_limit_of_zero_admits_nothing_and_does_not_panic() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            check(&[], &[requests(0, 60)], 1, now),
            Err(Blocked::Until(now + Duration::from_secs(60), QuotaMeasure::Requests))
        );
        let usage = vec![done(1, now, 1)];
        assert!(matches!(check(&usage, &[requests(0, 60)], 1, now), Err(Blocked::Until(..))));
    }
}
