//! Admission credits (issue #9): room for several calls to a provider, taken from the shared
//! windows in one ask, from which this worker admits its own calls without asking again.
//!
//! Every call to a provider with limits used to cost the database an ask and an answer, each
//! writing one row per window: under load that made Postgres the price of a limited job (four
//! times the result ledger's). Where a provider's limits are large (a day's 14,400 requests, a
//! paid model's thousands a minute) a worker asks for a small share of them at once — at most
//! [`SHARE_DIVISOR`]th of any window, [`MAX_CALLS`] calls at most — and admits its calls from it
//! for [`LIFETIME`]. When the credit is spent, expired or its calls used more tokens than it
//! holds, it closes; once its last call has answered it *ends*: its count in the windows
//! becomes what its calls used (requests admitted, tokens reported), leaving one window after
//! that last answer, as any call's does.
//!
//! The rule stays strict: from when it is taken until it ends, every window counts the whole
//! credit, which is at least what its calls use; a call that uses more tokens than the credit
//! has left raises the credit's count before its job goes on. A credit a worker cannot end (it
//! was killed) leaves its windows when its deadline does, as a call in flight: `LIFETIME` and
//! the calls' own timeout later. Small limits (a minute's 30 requests) get no credit: a share
//! of them would hold back what other workers could use.
//!
//! This module keeps the book; it knows nothing of the database or the clock (callers pass
//! `now`), so its rules are tested alone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::routing::QuotaMeasure;

use super::postgres::WindowSpec;

/// How long a credit admits calls after it was granted. Short: what it holds and does not use
/// is held from every other worker until it ends.
pub const LIFETIME: Duration = Duration::from_secs(1);

/// A credit holds at most this share of any of its windows (1/256: 0.4 %).
pub const SHARE_DIVISOR: u64 = 256;

/// A credit holds at most this many calls.
pub const MAX_CALLS: u64 = 64;

/// How many calls of `tokens` each a credit for these windows may hold: `None` when not even
/// two (a credit of one call is an ask). `tokens` is the first call's estimate; the credit
/// holds that many tokens per call.
pub fn size_for(specs: &[WindowSpec], tokens: u64) -> Option<u64> {
    let calls = specs.iter().fold(MAX_CALLS, |calls, spec| {
        let share = spec.limit / SHARE_DIVISOR;
        let per_call = match spec.key.measure {
            QuotaMeasure::Requests => 1,
            QuotaMeasure::Tokens => tokens.max(1),
        };
        calls.min(share / per_call)
    });
    (!specs.is_empty() && calls >= 2).then_some(calls)
}

/// One credit: the database's call id it was granted under and what it holds and has given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credit {
    pub call: i64,
    /// Calls it holds in the shared windows.
    requests: u64,
    /// Tokens the shared windows count for it: what it was granted, then what it last wrote.
    tokens: u64,
    /// The longest flight of a call it may admit: its deadline in the database covers them.
    max_flight: Duration,
    /// No call is admitted from it at or after this instant.
    open_until: SystemTime,
    /// Calls admitted from it.
    admitted: u64,
    /// Tokens its calls take: the count of those answered (their estimate when the provider
    /// gave none) and the estimate of those in flight.
    taken: u64,
    in_flight: u64,
    /// Tokens of its calls that have answered (their count, or their estimate when the
    /// provider gave none): those the provider certainly counted before any call admitted now.
    answered_tokens: u64,
    /// No more calls: it counts what it admitted, and ends with its last answer.
    closed: bool,
    /// Writes made of it: each carries the next number, and the database applies a write
    /// only over an older one, whatever order they arrive in.
    writes: u64,
}

impl Credit {
    /// A credit granted at `now` as call `call` for `requests` calls and `tokens` tokens, for
    /// calls whose flight is at most `max_flight`.
    pub fn new(call: i64, requests: u64, tokens: u64, max_flight: Duration, now: SystemTime) -> Credit {
        let open_until = now.checked_add(LIFETIME).unwrap_or(now);
        Credit {
            call,
            requests,
            tokens,
            max_flight,
            open_until,
            admitted: 0,
            taken: 0,
            in_flight: 0,
            answered_tokens: 0,
            closed: false,
            writes: 0,
        }
    }

    fn admits(&self, tokens: u64, flight: Duration, now: SystemTime) -> bool {
        !self.closed
            && now < self.open_until
            && flight <= self.max_flight
            && self.admitted < self.requests
            && self.taken.checked_add(tokens).is_some_and(|taken| taken <= self.tokens)
    }

    /// After this instant none of its calls can still be out: each is bounded by its flight.
    fn deadline(&self) -> SystemTime {
        let last_call_ends = self.max_flight.saturating_add(DEADLINE_MARGIN);
        self.open_until.checked_add(last_call_ends).unwrap_or(self.open_until)
    }

    /// What the windows count of a closed credit from now on: the calls it admitted and the
    /// tokens they take; its end once none is out.
    fn write(&mut self, provider: &Arc<str>) -> Ending {
        let raises = self.taken > self.tokens;
        self.tokens = self.taken;
        self.writes = self.writes.saturating_add(1);
        Ending {
            provider: provider.clone(),
            call: self.call,
            requests: self.admitted,
            tokens: self.taken,
            ended: self.in_flight == 0,
            raises,
            seq: self.writes,
        }
    }
}

/// How long past its last call's flight a credit's calls may still answer (the answer's own
/// bookkeeping); after that a credit is ended whatever it still waits for.
const DEADLINE_MARGIN: Duration = Duration::from_secs(5);

/// A call admitted from a credit: the credit's call id, and how much of the credit the
/// provider certainly counted when it received the call: the credit's calls that had answered
/// before it was admitted (at their count), and the call itself (at its estimate). A figure in
/// the call's answer holds at least that much of the credit. Calls still in flight when it was
/// admitted are not in it: they may reach the provider after it (review 4: counting them took
/// back a call still on its way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub call: i64,
    pub requests: u64,
    pub tokens: u64,
}

/// What the shared windows must be told of a closed credit: from now on it counts `requests`
/// calls and `tokens` tokens, and (when `ended`) its calls have all answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub provider: Arc<str>,
    pub call: i64,
    pub requests: u64,
    pub tokens: u64,
    /// Its last call has answered: it leaves the windows one window from now.
    pub ended: bool,
    /// The token count rises above what the windows count: written before the job goes on.
    pub raises: bool,
    /// The write's number for this credit: a later write supersedes it.
    pub seq: u64,
}

/// A provider's credits: the one admitting calls, those closed with calls still out, and until
/// when the windows have no room for a new one.
#[derive(Debug, Default)]
struct ProviderCredits {
    open: Option<Credit>,
    closing: HashMap<i64, Credit>,
    /// Credits ended at their deadline with calls still out: an answer that comes after all
    /// (held up past its flight) still raises the count it reports.
    overdue: HashMap<i64, Credit>,
    no_room_until: Option<SystemTime>,
}

/// Overdue credits kept for their late answers at most (calls that never answer leave theirs).
const MAX_OVERDUE: usize = 1024;

impl ProviderCredits {
    /// Closes the open credit: it counts what it admitted from now on (a write), and ends at
    /// once when no call of it is out.
    fn close_open(&mut self, provider: &Arc<str>) -> Option<Ending> {
        let mut credit = self.open.take()?;
        credit.closed = true;
        let ending = credit.write(provider);
        if !ending.ended {
            self.closing.insert(credit.call, credit);
        }
        Some(ending)
    }

    /// Ends the closed credits past their deadline: a call that never answered (its job was
    /// dropped) must not keep its credit, nor its entry here, for ever.
    fn end_overdue(&mut self, provider: &Arc<str>, now: SystemTime) -> Vec<Ending> {
        let overdue: Vec<i64> = self.closing.values().filter(|c| c.deadline() <= now).map(|c| c.call).collect();
        let mut endings = Vec::new();
        for call in overdue {
            if let Some(mut credit) = self.closing.remove(&call) {
                let out = std::mem::take(&mut credit.in_flight);
                endings.push(credit.write(provider));
                if self.overdue.len() >= MAX_OVERDUE {
                    self.overdue.clear();
                }
                credit.in_flight = out;
                self.overdue.insert(call, credit);
            }
        }
        endings
    }

    /// A late answer to a call of a credit ended at its deadline: a raise of what it counts
    /// when the answer reports more than its estimate (the credit has ended: it stays so).
    fn late_answer(&mut self, provider: &Arc<str>, call: i64, estimate: u64, tokens: Option<u64>) -> Option<Ending> {
        let credit = self.overdue.get_mut(&call)?;
        credit.in_flight = credit.in_flight.saturating_sub(1);
        credit.taken = credit.taken.saturating_sub(estimate).saturating_add(tokens.unwrap_or(estimate));
        credit.answered_tokens = credit.answered_tokens.saturating_add(tokens.unwrap_or(estimate));
        let raised = credit.taken > credit.tokens;
        let ending = raised.then(|| Ending { ended: true, ..credit.write(provider) });
        if credit.in_flight == 0 {
            self.overdue.remove(&call);
        }
        ending
    }
}

/// Every provider's credits in this worker.
#[derive(Debug, Default)]
pub struct CreditBook {
    providers: HashMap<Arc<str>, ProviderCredits>,
}

impl CreditBook {
    /// Admits a call of `tokens` and `flight` from `provider`'s open credit: the credit's call
    /// id and how much of it is taken with this call, or `None` when it has none that admits
    /// it. A credit that cannot admit it is closed (what the windows must be told of it comes
    /// back too): the next credit starts from this call's size.
    pub fn take(
        &mut self,
        provider: &Arc<str>,
        tokens: u64,
        flight: Duration,
        now: SystemTime,
    ) -> (Option<Taken>, Option<Ending>) {
        let Some(credits) = self.providers.get_mut(provider) else { return (None, None) };
        match credits.open.as_mut() {
            Some(credit) if credit.admits(tokens, flight, now) => {
                let taken = Taken {
                    call: credit.call,
                    requests: credit.admitted.saturating_sub(credit.in_flight).saturating_add(1),
                    tokens: credit.answered_tokens.saturating_add(tokens),
                };
                credit.admitted = credit.admitted.saturating_add(1);
                credit.taken = credit.taken.saturating_add(tokens);
                credit.in_flight = credit.in_flight.saturating_add(1);
                (Some(taken), None)
            }
            Some(_) => (None, credits.close_open(provider)),
            None => (None, None),
        }
    }

    /// Whether a new credit may be asked for now: the last ask for one was not refused for lack
    /// of room until later.
    pub fn may_ask(&self, provider: &str, now: SystemTime) -> bool {
        self.providers.get(provider).and_then(|c| c.no_room_until).is_none_or(|until| until <= now)
    }

    /// The windows refused a credit or a call at `now` (or an ask for one failed): they are at
    /// their limit, where room
    /// comes back a slot at a time as earlier calls leave. A credit taken there holds two or
    /// more of those slots at once and frees them only together, one window after its *last*
    /// call answers: a slot whose job came first waits for the others (up to the credit's
    /// lifetime when no second job asks), and each such wait is a slot of the window unused.
    /// So calls ask one by one for a credit's lifetime; a credit is tried again after that.
    /// The refusal's room time is not kept here: the refusal itself is (`quota_blocked`), for
    /// the asks it stands for, and is dropped when an answer makes room sooner.
    pub fn at_limit(&mut self, provider: &Arc<str>, now: SystemTime) {
        let until = now.checked_add(LIFETIME).unwrap_or(now);
        let credits = self.providers.entry(provider.clone()).or_default();
        credits.no_room_until = Some(credits.no_room_until.map_or(until, |current| current.max(until)));
    }

    /// Makes `credit` the provider's open one; the one it replaces closes, and closed ones past
    /// their deadline end (what the windows must be told of them).
    pub fn open(&mut self, provider: &Arc<str>, credit: Credit, now: SystemTime) -> Vec<Ending> {
        let credits = self.providers.entry(provider.clone()).or_default();
        let mut endings = credits.end_overdue(provider, now);
        endings.extend(credits.close_open(provider));
        credits.open = Some(credit);
        endings
    }

    /// The answer to a call admitted from credit `call`, `estimate` the tokens it was admitted
    /// with, `tokens` the provider's count when it gave one: what the windows must be told now.
    /// An open credit whose calls take more tokens than it holds closes; a closed one is
    /// written again when its count rises or its last call has answered (a count that only
    /// falls waits for the end: until then the windows count more, not less).
    pub fn answer(&mut self, provider: &Arc<str>, call: i64, estimate: u64, tokens: Option<u64>) -> Option<Ending> {
        let credits = self.providers.get_mut(provider)?;
        let is_open = credits.open.as_ref().is_some_and(|c| c.call == call);
        if !is_open && !credits.closing.contains_key(&call) {
            return credits.late_answer(provider, call, estimate, tokens);
        }
        let credit = if is_open { credits.open.as_mut()? } else { credits.closing.get_mut(&call)? };
        credit.in_flight = credit.in_flight.saturating_sub(1);
        credit.taken = credit.taken.saturating_sub(estimate).saturating_add(tokens.unwrap_or(estimate));
        credit.answered_tokens = credit.answered_tokens.saturating_add(tokens.unwrap_or(estimate));
        let raised = credit.taken > credit.tokens;
        if is_open {
            return if raised { credits.close_open(provider) } else { None };
        }
        if !raised && credit.in_flight > 0 {
            return None;
        }
        let ending = credit.write(provider);
        if ending.ended {
            credits.closing.remove(&call);
        }
        Some(ending)
    }

    /// A call admitted from credit `call` with `estimate` tokens that was never sent: whether
    /// the credit was still open and gave the call's place back (another call may take it; the
    /// credit ends counting only the calls it sent). A closed credit has written the call among
    /// its calls, and a rate-limit figure may have been counted against that since: taking it
    /// out now could leave the windows below the provider, so it is answered as any call.
    pub fn release(&mut self, provider: &Arc<str>, call: i64, estimate: u64) -> bool {
        let Some(credit) = self.providers.get_mut(provider).and_then(|c| c.open.as_mut()).filter(|c| c.call == call)
        else {
            return false;
        };
        credit.in_flight = credit.in_flight.saturating_sub(1);
        credit.admitted = credit.admitted.saturating_sub(1);
        credit.taken = credit.taken.saturating_sub(estimate);
        true
    }

    /// Closes credit `call` of `provider` if it is still open (its lifetime is over), and ends
    /// closed ones past their deadline: what the windows must be told of them.
    pub fn close(&mut self, provider: &Arc<str>, call: i64, now: SystemTime) -> Vec<Ending> {
        let Some(credits) = self.providers.get_mut(provider) else { return Vec::new() };
        let mut endings = credits.end_overdue(provider, now);
        if credits.open.as_ref().is_some_and(|c| c.call == call) {
            endings.extend(credits.close_open(provider));
        }
        endings
    }

    /// When closed credit `call` ends whatever its calls do, while it waits for them.
    pub fn closing_deadline(&self, provider: &Arc<str>, call: i64) -> Option<SystemTime> {
        self.providers.get(provider)?.closing.get(&call).map(Credit::deadline)
    }

    /// Closes every open credit (the worker stops): what the windows must be told of them.
    pub fn close_all(&mut self) -> Vec<Ending> {
        self.providers.iter_mut().filter_map(|(provider, credits)| credits.close_open(provider)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitConfig;
    use crate::state::postgres::windows_of;
    use proptest::prelude::*;

    fn limit(requests: Option<u64>, tokens: Option<u64>, per_secs: u64) -> LimitConfig {
        LimitConfig { requests, tokens, per: Duration::from_secs(per_secs), resets: None }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    const FLIGHT: Duration = Duration::from_secs(30);

    #[test]
    fn only_large_windows_get_a_credit_and_it_holds_a_small_share_of_each() {
        let day = 86_400;
        let size = |limits: &[LimitConfig], tokens| size_for(&windows_of("p", limits, &[]), tokens);
        let bench = [limit(Some(100_000), None, day), limit(None, Some(100_000_000), day)];
        assert_eq!(size(&bench, 23), Some(MAX_CALLS));
        assert_eq!(size(&[limit(Some(14_400), None, day)], 100), Some(56));
        // Groq's minute window (30 requests) leaves no room for a credit, whatever the day allows.
        assert_eq!(size(&[limit(Some(14_400), None, day), limit(Some(30), None, 60)], 100), None);
        // A token window holds the credit's tokens: 6000 a minute is 23 tokens of share.
        let minute_tokens = [limit(Some(100_000), None, 60), limit(None, Some(6000), 60)];
        assert_eq!(size(&minute_tokens, 10), Some(2));
        assert_eq!(size(&minute_tokens, 12), None);
        assert_eq!(size(&[], 10), None);
    }

    fn book_with_credit(requests: u64, tokens: u64) -> (CreditBook, Arc<str>) {
        let provider: Arc<str> = Arc::from("p");
        let mut book = CreditBook::default();
        assert_eq!(book.open(&provider, Credit::new(7, requests, tokens, FLIGHT, at(0)), at(0)), vec![]);
        (book, provider)
    }

    fn told(p: &Arc<str>, requests: u64, tokens: u64, ended: bool, raises: bool, seq: u64) -> Ending {
        Ending { provider: p.clone(), call: 7, requests, tokens, ended, raises, seq }
    }

    #[test]
    fn a_call_counts_as_sent_before_it_only_the_credits_calls_that_had_answered() {
        let (mut book, p) = book_with_credit(4, 400);
        assert_eq!(book.take(&p, 100, FLIGHT, at(0)).0, Some(Taken { call: 7, requests: 1, tokens: 100 }));
        assert_eq!(book.take(&p, 100, FLIGHT, at(0)).0, Some(Taken { call: 7, requests: 1, tokens: 100 }));
        // One answers (40 tokens used); the other is still on its way to the provider.
        assert_eq!(book.answer(&p, 7, 100, Some(40)), None);
        assert_eq!(book.take(&p, 100, FLIGHT, at(0)).0, Some(Taken { call: 7, requests: 2, tokens: 140 }));
    }

    #[test]
    fn a_credit_admits_what_it_holds_then_counts_what_it_admitted_and_ends_with_its_last_answer() {
        let (mut book, p) = book_with_credit(3, 300);
        for _ in 1..=3 {
            // None of the credit's calls has answered: each call's figure holds only itself.
            let taken = Taken { call: 7, requests: 1, tokens: 100 };
            assert_eq!(book.take(&p, 100, FLIGHT, at(0)), (Some(taken), None), "what the figure surely holds");
        }
        // The fourth call does not fit: the credit closes, with its calls still out.
        let closed = book.take(&p, 100, FLIGHT, at(0));
        assert_eq!(closed, (None, Some(told(&p, 3, 300, false, false, 1))));
        // Lowered counts wait for the end.
        assert_eq!(book.answer(&p, 7, 100, Some(40)), None);
        assert_eq!(book.answer(&p, 7, 100, None), None);
        assert_eq!(book.answer(&p, 7, 100, Some(10)), Some(told(&p, 3, 150, true, false, 2)));
        // Nothing is left of it.
        assert_eq!(book.answer(&p, 7, 100, Some(10)), None);
        assert_eq!(book.close_all(), vec![]);
    }

    #[test]
    fn a_call_never_sent_gives_its_place_in_an_open_credit_to_the_next_call() {
        let (mut book, p) = book_with_credit(2, 200);
        assert_eq!(book.take(&p, 100, FLIGHT, at(0)).0.map(|t| t.call), Some(7));
        assert_eq!(book.take(&p, 100, FLIGHT, at(0)).0.map(|t| t.call), Some(7));
        assert!(book.release(&p, 7, 100), "an open credit takes it back");
        assert_eq!(book.take(&p, 100, FLIGHT, at(0)).0.map(|t| t.call), Some(7), "its place is free again");
        // Full again: it closes counting the two calls admitted and sent, not three.
        assert_eq!(book.take(&p, 100, FLIGHT, at(0)), (None, Some(told(&p, 2, 200, false, false, 1))));
    }

    #[test]
    fn a_call_never_sent_stays_in_a_closed_credit() {
        let (mut book, p) = book_with_credit(3, 300);
        for _ in 0..2 {
            assert_eq!(book.take(&p, 100, FLIGHT, at(0)).0.map(|t| t.call), Some(7));
        }
        assert_eq!(book.close(&p, 7, at(1)), vec![told(&p, 2, 200, false, false, 1)]);
        assert!(!book.release(&p, 7, 100), "a closed credit has written it: it is answered instead");
        assert!(!book.release(&p, 9, 100), "an unknown credit");
        assert_eq!(book.answer(&p, 7, 100, None), None, "a call is still out");
        assert_eq!(book.answer(&p, 7, 100, Some(30)), Some(told(&p, 2, 130, true, false, 2)));
    }

    #[test]
    fn a_credit_closed_at_the_end_of_its_lifetime_gives_back_what_it_did_not_admit() {
        let (mut book, p) = book_with_credit(64, 6400);
        assert_eq!(book.take(&p, 100, FLIGHT, at(0)).0.map(|t| t.call), Some(7));
        assert_eq!(book.close(&p, 7, at(1)), vec![told(&p, 1, 100, false, false, 1)]);
        assert_eq!(book.answer(&p, 7, 100, Some(20)), Some(told(&p, 1, 20, true, false, 2)));
    }

    #[test]
    fn a_credit_admits_nothing_after_its_lifetime_or_beyond_its_flight_or_tokens() {
        let (mut book, p) = book_with_credit(10, 1000);
        assert_eq!(book.take(&p, 2000, FLIGHT, at(0)).0.map(|t| t.call), None, "more tokens than it holds");
        let (mut book, p) = book_with_credit(10, 1000);
        assert_eq!(
            book.take(&p, 10, FLIGHT + Duration::from_millis(1), at(0)).0.map(|t| t.call),
            None,
            "a longer flight"
        );
        let (mut book, p) = book_with_credit(10, 1000);
        // Closed with no call out: it ends at once, with nothing used.
        let (taken, ending) = book.take(&p, 10, FLIGHT, at(0) + LIFETIME);
        assert_eq!(taken, None, "past its lifetime");
        assert_eq!(ending, Some(told(&p, 0, 0, true, false, 1)));
    }

    #[test]
    fn calls_that_use_more_tokens_than_the_credit_holds_raise_it_at_once_and_close_it() {
        let (mut book, p) = book_with_credit(10, 100);
        assert_eq!(book.take(&p, 40, FLIGHT, at(0)).0.map(|t| t.call), Some(7));
        assert_eq!(book.take(&p, 40, FLIGHT, at(0)).0.map(|t| t.call), Some(7));
        // 90 + 40 in flight: 130 of 100.
        assert_eq!(book.answer(&p, 7, 40, Some(90)), Some(told(&p, 2, 130, false, true, 1)));
        assert_eq!(book.take(&p, 1, FLIGHT, at(0)).0.map(|t| t.call), None, "a raised credit is closed");
        assert_eq!(book.answer(&p, 7, 40, Some(5)), Some(told(&p, 2, 95, true, false, 2)));
    }

    #[test]
    fn a_closed_credit_is_written_again_when_its_count_rises() {
        let (mut book, p) = book_with_credit(2, 200);
        assert_eq!(book.take(&p, 100, FLIGHT, at(0)).0.map(|t| t.call), Some(7));
        assert_eq!(book.take(&p, 100, FLIGHT, at(0)).0.map(|t| t.call), Some(7));
        assert_eq!(book.close(&p, 7, at(0)), vec![told(&p, 2, 200, false, false, 1)]);
        assert_eq!(book.answer(&p, 7, 100, Some(150)), Some(told(&p, 2, 250, false, true, 2)));
        assert_eq!(book.answer(&p, 7, 100, Some(150)), Some(told(&p, 2, 300, true, true, 3)));
    }

    #[test]
    fn a_new_credit_closes_the_old_one_whose_calls_still_end_it() {
        let (mut book, p) = book_with_credit(5, 500);
        assert_eq!(book.take(&p, 10, FLIGHT, at(0)).0.map(|t| t.call), Some(7));
        let replaced = book.open(&p, Credit::new(8, 5, 500, FLIGHT, at(0)), at(0));
        assert_eq!(replaced, vec![told(&p, 1, 10, false, false, 1)]);
        assert_eq!(book.take(&p, 10, FLIGHT, at(0)).0.map(|t| t.call), Some(8));
        assert_eq!(book.answer(&p, 7, 10, Some(3)), Some(told(&p, 1, 3, true, false, 2)));
        let closing = book.close_all();
        assert_eq!(closing.len(), 1);
        assert_eq!((closing[0].call, closing[0].ended), (8, false), "credit 8 has a call out");
        let ended = book.answer(&p, 8, 10, None).unwrap();
        assert_eq!((ended.call, ended.requests, ended.tokens, ended.ended), (8, 1, 10, true));
    }

    #[test]
    fn a_closed_credit_whose_call_never_answers_ends_at_its_deadline() {
        let (mut book, p) = book_with_credit(5, 500);
        assert_eq!(book.take(&p, 10, FLIGHT, at(0)).0.map(|t| t.call), Some(7));
        assert_eq!(book.close(&p, 7, at(1)), vec![told(&p, 1, 10, false, false, 1)]);
        let before = at(0) + LIFETIME + FLIGHT;
        assert_eq!(book.close(&p, 7, before), vec![], "its call may still answer");
        let after = before + DEADLINE_MARGIN;
        assert_eq!(book.close(&p, 7, after), vec![told(&p, 1, 10, true, false, 2)]);
        // Its call answers after all: a lower count changes nothing, a higher one is raised.
        assert_eq!(book.answer(&p, 7, 10, Some(1)), None, "a lower count waits for nothing");
        let (mut book, p) = book_with_credit(5, 500);
        assert_eq!(book.take(&p, 10, FLIGHT, at(0)).0.map(|t| t.call), Some(7));
        assert_eq!(book.close(&p, 7, at(1)), vec![told(&p, 1, 10, false, false, 1)]);
        assert_eq!(book.close(&p, 7, after), vec![told(&p, 1, 10, true, false, 2)]);
        assert_eq!(book.answer(&p, 7, 10, Some(900)), Some(told(&p, 1, 900, true, true, 3)));
        assert_eq!(book.answer(&p, 7, 10, Some(900)), None, "nothing is left of it");
    }

    #[test]
    fn a_refused_credit_is_not_asked_for_again_before_the_windows_have_room() {
        let p: Arc<str> = Arc::from("p");
        let mut book = CreditBook::default();
        assert!(book.may_ask("p", at(0)));
        book.at_limit(&p, at(4));
        assert!(!book.may_ask("p", at(4)));
        assert!(book.may_ask("p", at(5)));
    }

    /// Windows at their limit give room back a slot at a time: no credit is asked for there
    /// for a credit's lifetime after a refusal, and a credit is tried again after it.
    #[test]
    fn windows_at_their_limit_are_asked_one_call_at_a_time_for_a_credits_lifetime() {
        let p: Arc<str> = Arc::from("p");
        let mut book = CreditBook::default();
        let ms = |n: u64| at(0) + Duration::from_millis(n);
        book.at_limit(&p, ms(0));
        assert!(!book.may_ask("p", ms(4)), "a slot that frees 4 ms later is no room for a credit");
        assert!(!book.may_ask("p", ms(999)));
        assert!(book.may_ask("p", ms(1000)), "a credit is tried again after its lifetime");
        book.at_limit(&p, ms(1500));
        book.at_limit(&p, ms(1200));
        assert!(!book.may_ask("p", ms(2499)), "a refusal does not shorten a later one's wait");
        assert!(book.may_ask("p", ms(2500)));
    }

    /// What a run of the book has told the windows: the credit's count and its ending.
    struct Told {
        counted: u64,
        ended: Option<Ending>,
    }

    impl Told {
        fn hear(&mut self, ending: Option<Ending>) {
            let Some(ending) = ending else { return };
            assert!(self.ended.is_none(), "told again after its end: {ending:?}");
            self.counted = ending.tokens;
            if ending.ended {
                self.ended = Some(ending);
            }
        }
    }

    proptest! {
        /// Whatever the calls and their answers, the windows never count less than the calls
        /// use: while a credit is live it counts at least what its calls take, and what it ends
        /// with is exactly what they used and how many they were.
        #[test]
        fn a_credit_never_counts_less_than_its_calls_use(
            requests in 1u64..20,
            tokens in 0u64..2000,
            steps in proptest::collection::vec((0u64..300, proptest::option::of(0u64..600), any::<bool>()), 1..60),
        ) {
            let (mut book, p) = book_with_credit(requests, tokens);
            let mut told = Told { counted: tokens, ended: None };
            let mut out: Vec<u64> = Vec::new();
            let (mut used, mut admitted) = (0u64, 0u64);
            for (size, reported, answer_one) in steps {
                if answer_one && let Some(estimate) = out.pop() {
                    used += reported.unwrap_or(estimate);
                    told.hear(book.answer(&p, 7, estimate, reported));
                } else if told.ended.is_none() {
                    let (taken, ending) = book.take(&p, size, FLIGHT, at(0));
                    if let Some(taken) = taken {
                        out.push(size);
                        admitted += 1;
                        // What the figure surely holds: the credit's answered calls (what
                        // they used) and this one (its estimate), not the others still out.
                        prop_assert_eq!(taken.requests, admitted - (out.len() as u64 - 1));
                        prop_assert_eq!(taken.tokens, used + size);
                    }
                    told.hear(ending);
                }
                let in_flight: u64 = out.iter().sum();
                let live = told.ended.is_none();
                prop_assert!(!live || told.counted >= used + in_flight, "{} < {} + {}", told.counted, used, in_flight);
                prop_assert!(admitted <= requests);
            }
            for estimate in std::mem::take(&mut out) {
                used += estimate;
                told.hear(book.answer(&p, 7, estimate, None));
            }
            if told.ended.is_none() {
                for ending in book.close(&p, 7, at(0)) {
                    told.hear(Some(ending));
                }
            }
            prop_assert_eq!(told.ended.map(|e| e.requests), Some(admitted));
            prop_assert_eq!(told.counted, used);
        }
    }
}
