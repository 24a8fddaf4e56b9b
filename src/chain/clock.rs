//! Time as a parameter: the engine reads the time and waits only through a [`Clock`], so its unit
//! tests drive a clock of their own and no test depends on wall time or a millisecond margin.
//!
//! Also the one place for instant arithmetic that cannot panic: [`later`] saturates at
//! [`far_future`] instead of overflowing on a huge `max_wait` or a hostile retry time.

use std::time::{Duration, SystemTime};

/// Where the engine gets the time and how it waits.
#[async_trait::async_trait]
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;

    /// Waits `duration` (a test clock may advance its own time instead of waiting).
    async fn sleep(&self, duration: Duration);
}

/// The wall clock and tokio's timer: what production runs on.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

#[async_trait::async_trait]
impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    async fn sleep(&self, duration: Duration) {
        // tokio saturates a deadline that does not fit its clock rather than panicking.
        tokio::time::sleep(duration).await;
    }
}

/// The latest instant the engine uses: the start of 9999-12-31 UTC. Everything the engine
/// computes stays at or before it, so it always fits `SystemTime`, Postgres `timestamptz` and
/// RFC 3339 formatting (which cannot write a year past 9999).
pub fn far_future() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_214_400)
}

/// An instant as RFC 3339 in whole seconds; never panics (see [`writable`]).
pub fn rfc3339_seconds(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(writable(at)).to_string()
}

/// An instant as RFC 3339 in milliseconds; never panics (see [`writable`]).
pub fn rfc3339_millis(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(writable(at)).to_string()
}

/// The RFC 3339 formatter refuses years past 9999 and instants before 1970 (its `Display` fails,
/// and `to_string` panics); a time read from the database or a provider may be either, so it is
/// pinned to the range the formatter writes.
fn writable(at: SystemTime) -> SystemTime {
    at.clamp(SystemTime::UNIX_EPOCH, far_future())
}

/// `at + duration`, saturating at [`far_future`] (`SystemTime + Duration` panics on overflow).
pub fn later(at: SystemTime, duration: Duration) -> SystemTime {
    at.checked_add(duration).map_or_else(far_future, |t| t.min(far_future()))
}

/// A clock for tests: it starts where it is told and only moves when advanced or slept on;
/// a sleep advances it at once, so a test of a ten-minute wait takes no time.
#[cfg(test)]
#[derive(Debug)]
pub struct ManualClock {
    now: std::sync::Mutex<SystemTime>,
}

#[cfg(test)]
impl ManualClock {
    pub fn starting_at(now: SystemTime) -> Self {
        Self { now: std::sync::Mutex::new(now) }
    }

    pub fn advance(&self, duration: Duration) {
        let mut now = self.now.lock().unwrap();
        *now = later(*now, duration);
    }
}

#[cfg(test)]
#[async_trait::async_trait]
impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap()
    }

    async fn sleep(&self, duration: Duration) {
        self.advance(duration);
        // Let other tasks of the test run, as a real sleep would.
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_saturates_instead_of_panicking() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(later(now, Duration::from_secs(5)), now + Duration::from_secs(5));
        assert_eq!(later(now, Duration::from_secs(u64::MAX)), far_future());
        assert_eq!(later(now, Duration::MAX), far_future());
        assert_eq!(later(far_future() + Duration::from_secs(1), Duration::ZERO), far_future());
        humantime::format_rfc3339_millis(far_future()).to_string();
    }

    #[test]
    fn any_instant_formats_without_panicking() {
        let year_10000 = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert_eq!(rfc3339_seconds(year_10000), "9999-12-31T00:00:00Z");
        assert_eq!(rfc3339_millis(year_10000), "9999-12-31T00:00:00.000Z");
        let before_1970 = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(rfc3339_seconds(before_1970), "1970-01-01T00:00:00Z");
    }

    #[tokio::test]
    async fn a_manual_clock_moves_only_when_slept_on_or_advanced() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let clock = ManualClock::starting_at(start);
        assert_eq!(clock.now(), start);
        clock.sleep(Duration::from_secs(600)).await;
        assert_eq!(clock.now(), start + Duration::from_secs(600));
        clock.advance(Duration::from_secs(1));
        assert_eq!(clock.now(), start + Duration::from_secs(601));
    }
}
