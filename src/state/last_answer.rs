//! When the database last answered a batch's statement: what tells a database that is not
//! answering from one that is answering slowly.
//!
//! A call that goes through a batcher waits in its queue, behind the batch in flight, before its
//! own batch goes out, and the worker gives up on it [`STATE_CALL_TIMEOUT`] after it was queued.
//! When the batch ahead was cancelled by Postgres for its time (`statement_timeout`, a busy
//! moment of the windows), the calls behind it go out with less than the whole statement bound
//! left before their deadline: their giving up proves nothing of the database, and three of them
//! in a row used to take a reachable database for down (review_stmt2, finding 1). Such a give-up
//! counts as a timeout only when no batch has heard from the database for longer than Postgres
//! lets a statement run ([`OUTLASTED`]): a database that answers, even with a cancellation,
//! answers within that. Only the batches' statements count (they write and commit): a database
//! whose writes hang while its reads answer is not answering the calls jobs wait on.
//!
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::postgres::{STATE_CALL_TIMEOUT, STATEMENT_TIMEOUT};

/// How long the database must have been silent, on this worker's clock, to show that it is not
/// answering: the statement bound Postgres holds every statement of the pool to, and the time a
/// cancellation takes to come back (a statement is cancelled at its next check for interrupts,
/// and the answer crosses the network).
pub(super) const OUTLASTED: Duration = STATEMENT_TIMEOUT.saturating_add(Duration::from_millis(250));
// A silent database can show so before a call's deadline.
const _: () = assert!(OUTLASTED.as_millis() < STATE_CALL_TIMEOUT.as_millis());

/// The instant of the database's last answer, in milliseconds on the worker's monotonic clock
/// (given by the caller), plus one: zero is "never".
#[derive(Debug, Default)]
pub struct LastAnswer(AtomicU64);

impl LastAnswer {
    /// The database answered a statement at `now_ms`: a result, or an error of its own (a
    /// refusal, a cancellation), not a lost connection.
    fn heard(&self, now_ms: u64) {
        self.0.fetch_max(now_ms.saturating_add(1), Ordering::Relaxed);
    }

    /// The database answered a statement sent at `sent_ms` at `now_ms`: heard when the answer
    /// came within [`STATE_CALL_TIMEOUT`] of the statement's start, in time for a call that went out with
    /// it. A later answer shows a database, or a path to it, slower than any call can wait (a
    /// commit, which `statement_timeout` does not bound, that takes seconds; a link that
    /// delivers late): the calls given up on meanwhile were not queued behind a busy moment,
    /// and must count (review_silent, finding 1).
    pub(super) fn answered(&self, sent_ms: u64, now_ms: u64) {
        if Duration::from_millis(now_ms.saturating_sub(sent_ms)) < STATE_CALL_TIMEOUT {
            self.heard(now_ms);
        }
    }

    /// How long the database has been silent at `now_ms`; `None` when it never answered.
    pub(super) fn silent_for(&self, now_ms: u64) -> Option<Duration> {
        let last = self.0.load(Ordering::Relaxed).checked_sub(1)?;
        Some(Duration::from_millis(now_ms.saturating_sub(last)))
    }

    /// Whether the database answered a statement within [`OUTLASTED`] of `now_ms`.
    pub(super) fn answering(&self, now_ms: u64) -> bool {
        self.silent_for(now_ms).is_some_and(|silent| silent < OUTLASTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_never_heard_from_is_not_answering() {
        let last = LastAnswer::default();
        assert_eq!(last.silent_for(0), None);
        assert!(!last.answering(0));
    }

    #[test]
    fn an_answer_counts_until_the_bound_and_its_cancellation_time_have_passed() {
        let last = LastAnswer::default();
        last.heard(0);
        assert!(last.answering(0));
        assert!(last.answering(1_749));
        assert!(!last.answering(1_750));
        last.heard(1_500);
        assert_eq!(last.silent_for(3_000), Some(Duration::from_millis(1_500)));
        assert!(last.answering(3_000));
    }

    #[test]
    fn an_answer_noted_late_never_moves_the_last_one_back() {
        let last = LastAnswer::default();
        last.heard(5_000);
        last.heard(4_000);
        assert_eq!(last.silent_for(6_000), Some(Duration::from_millis(1_000)));
        assert_eq!(last.silent_for(4_500), Some(Duration::ZERO), "a reading older than the answer");
    }

    #[test]
    fn an_answer_later_than_a_call_can_wait_is_not_heard() {
        let last = LastAnswer::default();
        last.answered(1_000, 2_999);
        assert_eq!(last.silent_for(2_999), Some(Duration::ZERO));
        last.answered(3_000, 5_000);
        assert_eq!(last.silent_for(5_000), Some(Duration::from_millis(2_001)), "a late answer is not heard");
        assert!(!LastAnswer::default().answering(0));
    }

    #[test]
    fn the_end_of_the_clock_does_not_wrap_to_never() {
        let last = LastAnswer::default();
        last.heard(u64::MAX);
        assert!(last.silent_for(u64::MAX).is_some());
        assert!(last.answering(u64::MAX));
    }
}
