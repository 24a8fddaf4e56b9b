//! Strict window accounting, for the embedded store (Postgres runs the same rules in
//! `fallback_admit`, migrations/0007).
//!
//! A request occupies every window from when it is sent until its answer arrives. A sliding
//! window (`per`) holds never more than `requests` calls (or `tokens` tokens) in any interval of
//! length `per`: a call leaves it `per` after its occupancy ends. A calendar window (`resets`)
//! counts a call in every calendar day its occupancy touches, and a call leaves it at the first
//! reset after its occupancy ends: a quota spent at 23:30 has room again at the reset, not 24 h
//! after the call.
//!
//! Besides real calls, a scope (a provider, a pool) holds what providers' rate-limit headers
//! taught us ([`Learnt`]): occupancies of one limit that make our count what the provider counts.

use std::time::{Duration, SystemTime};

use super::{Ask, QuotaMeasure};
use crate::config::LimitConfig;
use crate::routing::QuotaObservation;

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
    pub fn end(&self) -> SystemTime {
        self.done.unwrap_or(self.expires)
    }
}

/// Use of one declared limit that a provider reported and our calls do not explain (calls
/// made elsewhere on the same key, before a restart...): it counts in that limit's window
/// only, until `leaves`, and is the only use an observation may take back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learnt {
    pub limit: LimitConfig,
    pub amount: u64,
    pub leaves: SystemTime,
}

/// What one scope (a provider's own limits, or a pool) has used.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// In the order of their ids (each recorded under the store's lock as its id is drawn).
    pub usage: Vec<Usage>,
    pub learnt: Vec<Learnt>,
    /// The length `usage` may reach before [`prune_lately`] looks through it again.
    prune_at: usize,
    /// When it last did: past one window from then, it looks again however long `usage` is (a
    /// burst's calls are forgotten once no window sees them, also when calls become rare).
    pruned_at: Option<SystemTime>,
}

/// Below this length a scope's usage is always looked through.
const PRUNE_AT_LEAST: usize = 64;

impl Scope {
    /// The use recorded under `id` (ids are in order: found by bisection).
    pub fn usage(&self, id: i64) -> Option<&Usage> {
        self.usage.get(self.position(id)?)
    }

    /// The same, to change it.
    pub fn usage_mut(&mut self, id: i64) -> Option<&mut Usage> {
        let at = self.position(id)?;
        self.usage.get_mut(at)
    }

    /// Removes the use recorded under `id`, if any.
    pub fn forget(&mut self, id: i64) {
        if let Some(at) = self.position(id) {
            self.usage.remove(at);
        }
    }

    fn position(&self, id: i64) -> Option<usize> {
        self.usage.binary_search_by_key(&id, |u| u.id).ok()
    }
}

/// Why a request cannot be admitted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    Until(SystemTime, QuotaMeasure),
    /// The request alone exceeds a token limit.
    TooLarge,
}

impl Blocked {
    /// The verdict of two scopes together: a request too large for either can never be sent;
    /// otherwise it waits for the later of the two.
    pub fn and(self, other: Blocked) -> Blocked {
        match (self, other) {
            (Blocked::TooLarge, _) | (_, Blocked::TooLarge) => Blocked::TooLarge,
            (Blocked::Until(a, ma), Blocked::Until(b, mb)) => {
                if b > a {
                    Blocked::Until(b, mb)
                } else {
                    Blocked::Until(a, ma)
                }
            }
        }
    }
}

/// The measure a limit counts and its size.
pub fn measure_of(limit: &LimitConfig) -> (QuotaMeasure, u64) {
    match (limit.requests, limit.tokens) {
        (Some(n), _) => (QuotaMeasure::Requests, n),
        (None, n) => (QuotaMeasure::Tokens, n.unwrap_or(0)),
    }
}

/// What one call amounts to in a window of `measure`.
fn amount(measure: QuotaMeasure, tokens: u64) -> u64 {
    match measure {
        QuotaMeasure::Requests => 1,
        QuotaMeasure::Tokens => tokens,
    }
}

/// The start of `limit`'s window that contains `now` (calls ending before it are out of it),
/// and when a call that ends now leaves it at the earliest.
fn window(limit: &LimitConfig, now: SystemTime) -> (SystemTime, SystemTime) {
    match &limit.resets {
        Some(reset) => (reset.last_at_or_before(now), reset.next_after(now)),
        None => (now.checked_sub(limit.per).unwrap_or(SystemTime::UNIX_EPOCH), later(now, limit.per)),
    }
}

/// What occupies `limit`'s window now: (when it leaves at the earliest, amount). A call in
/// flight may answer any moment, so it leaves no earlier than a call that ends now.
fn occupying(scope: &Scope, limit: &LimitConfig, now: SystemTime) -> Vec<(SystemTime, u64)> {
    let (measure, _) = measure_of(limit);
    let (start, leaves_now) = window(limit, now);
    let calls = scope.usage.iter().filter(|u| match limit.resets {
        // A call counts in every calendar day its occupancy touches.
        Some(_) => u.end() >= start,
        None => u.end() > start,
    });
    let calls = calls.map(|u| {
        let leaves = if limit.resets.is_some() { leaves_now } else { later(u.end().min(now), limit.per) };
        (leaves, amount(measure, u.tokens))
    });
    let learnt = scope.learnt.iter().filter(|l| l.limit == *limit && l.leaves > now).map(|l| (l.leaves, l.amount));
    calls.chain(learnt).collect()
}

/// What `limit`'s window holds now, real calls and learnt use together.
pub fn used(scope: &Scope, limit: &LimitConfig, now: SystemTime) -> u64 {
    occupying(scope, limit, now).iter().fold(0u64, |sum, (_, a)| sum.saturating_add(*a))
}

/// Checks a new request of `tokens` against `limits`, given the scope's recorded use.
pub fn check(scope: &Scope, limits: &[LimitConfig], tokens: u64, now: SystemTime) -> Result<(), Blocked> {
    let mut wait: Option<Blocked> = None;
    for limit in limits {
        let (measure, max) = measure_of(limit);
        if measure == QuotaMeasure::Tokens && tokens > max {
            return Err(Blocked::TooLarge);
        }
        let mut occupying = occupying(scope, limit, now);
        let used = occupying.iter().fold(0u64, |sum, (_, a)| sum.saturating_add(*a));
        let excess = used.saturating_add(amount(measure, tokens)).saturating_sub(max);
        if excess == 0 {
            continue;
        }
        // Room comes when enough has left, in leaving order; with a limit of 0 (a local share
        // rounded down) nothing ever fits: retry after one window.
        occupying.sort();
        let mut freed = 0u64;
        let leaving = occupying.iter().find(|(_, a)| {
            freed = freed.saturating_add(*a);
            freed >= excess
        });
        let until = leaving.map_or_else(|| window(limit, now).1, |(at, _)| *at);
        let blocked = Blocked::Until(until, measure);
        wait = Some(wait.map_or(blocked, |w| w.and(blocked)));
    }
    wait.map_or(Ok(()), Err)
}

/// `at + per`, saturating far in the future instead of overflowing.
fn later(at: SystemTime, per: Duration) -> SystemTime {
    at.checked_add(per).unwrap_or(at)
}

/// How long a call must be kept to answer for `limits`: the longest window, and a calendar
/// day can last 25 hours (the day a zone leaves daylight saving time).
pub fn keep_for<'a>(limits: impl IntoIterator<Item = &'a LimitConfig>) -> Duration {
    let keep =
        |l: &LimitConfig| if l.resets.is_some() { l.per.saturating_add(Duration::from_secs(7200)) } else { l.per };
    limits.into_iter().map(keep).max().unwrap_or_default()
}

/// Drops usage that no window of `longest` can see any more, and learnt use that has left.
pub fn prune(scope: &mut Scope, longest: Duration, now: SystemTime) {
    let since = now.checked_sub(longest).unwrap_or(SystemTime::UNIX_EPOCH);
    scope.usage.retain(|u| u.end() > since);
    scope.learnt.retain(|l| l.leaves > now);
}

/// [`prune`] when the usage has doubled, or a window has passed, since it was last looked
/// through: what no window can see any more is only skipped by every reader, so it may wait, and
/// a store that records every call (the Postgres store's own account of its calls, a day's
/// window of them) then pays a constant share per call instead of a pass over the whole window.
pub fn prune_lately(scope: &mut Scope, longest: Duration, now: SystemTime) {
    let window_passed = scope.pruned_at.is_none_or(|at| later(at, longest) <= now);
    if scope.usage.len() >= scope.prune_at || window_passed {
        prune(scope, longest, now);
        scope.prune_at = scope.usage.len().saturating_mul(2).max(PRUNE_AT_LEAST);
        scope.pruned_at = Some(now);
    } else {
        scope.learnt.retain(|l| l.leaves > now);
    }
}

/// Which declared limits an observation speaks of, as (pool name or `None` for the provider's
/// own, limit): of its measure, those of the window it named; else those whose size is the
/// limit it stated (none when no declared limit has that size); else, when it states no size,
/// the only one of that measure. Anything else is ambiguous and ignored.
pub fn matching<'a>(ask: &Ask<'a>, seen: &QuotaObservation) -> Vec<(Option<&'a str>, &'a LimitConfig)> {
    let own = ask.limits.iter().map(|l| (None, l));
    let pooled = ask.pools.iter().flat_map(|p| p.limits.iter().map(move |l| (Some(p.name.as_str()), l)));
    let of_measure: Vec<_> = own.chain(pooled).filter(|(_, l)| measure_of(l).0 == seen.measure).collect();
    if let Some(window) = seen.window {
        return of_measure.into_iter().filter(|(_, l)| l.per == window).collect();
    }
    if let Some(size) = seen.limit {
        // A stated size that matches no declared limit is another budget (the provider's
        // minute when we declare its day): never read it as ours.
        return of_measure.into_iter().filter(|(_, l)| measure_of(l).1 == size).collect();
    }
    if of_measure.len() == 1 { of_measure } else { Vec::new() }
}

/// Whether an observation still speaks of the provider's current budget. Headers are written
/// when the provider takes the call and arrive with its answer: one whose reset has passed by
/// now (`resets_at <= now`) describes a budget the provider has renewed since, and counting its
/// use again would block a whole new window with no call left to correct it. It is ignored.
pub fn current(seen: &QuotaObservation, now: SystemTime) -> bool {
    seen.resets_at.is_none_or(|at| at > now)
}

/// The longest that use learnt from an answer without a reset time stays: the contract's
/// default wait for a 429 without a time. Without a reset we cannot tell which of the
/// provider's budgets it was, so it must not hold a long (daily) window for a whole day.
pub const LEARNT_WITHOUT_RESET: Duration = Duration::from_secs(60);

/// When use learnt now leaves `limit`'s window: when the provider says its budget is whole
/// again, but never later than a call made now would leave it; without a (future) reset time,
/// after [`LEARNT_WITHOUT_RESET`]. (Callers drop an observation whose reset has passed:
/// [`current`].)
pub fn learnt_leaves(limit: &LimitConfig, resets_at: Option<SystemTime>, now: SystemTime) -> SystemTime {
    let bound = window(limit, now).1;
    let leaves = resets_at.filter(|at| *at > now).unwrap_or_else(|| later(now, LEARNT_WITHOUT_RESET));
    leaves.min(bound)
}

/// What the provider said of one limit, in the answer to one of our calls.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub remaining: u64,
    pub resets_at: Option<SystemTime>,
    /// The usage id of the call whose answer carried it; `None` when unknown (a call counted
    /// in no window here).
    pub call: Option<i64>,
}

/// Makes the scope's count of `limit` what the provider says (`declared - remaining`): raised
/// with learnt use when it says less is left than we count; lowered, when it says more is left,
/// by taking back learnt use only (real calls are never forgotten, so we never exceed what we
/// declared).
///
/// The provider counted when it received `seen.call`: calls we admitted after it (ids are
/// handed out in admission order) are in our count but not in its figure. Lowering compares
/// with our count without them, else each answer that arrives while later calls fly would take
/// back someone else's real use and let us send into 429s; with the call unknown, nothing is
/// lowered. Raising compares with our whole count: it may learn less than the provider counts
/// (a later answer, whose figure includes those calls, raises the rest), never more. Leaving the
/// later calls in flight out when raising was tried (the PostgreSQL store's migration of the
/// same rule) and not kept: calls reach a provider in any order, and each later call that
/// overtook the observed one was then learnt once too often, a slot held until a later figure
/// took it back (the backlog benchmark's planned mode at 92 % of a strict limit instead of 98 %).
pub fn observe(scope: &mut Scope, limit: &LimitConfig, seen: Seen, now: SystemTime) {
    let (_, declared) = measure_of(limit);
    let target = declared.saturating_sub(seen.remaining);
    let counted = used(scope, limit, now);
    if target > counted {
        let leaves = learnt_leaves(limit, seen.resets_at, now);
        scope.learnt.push(Learnt { limit: limit.clone(), amount: target - counted, leaves });
        return;
    }
    let Some(call) = seen.call else { return };
    let up_to_call = Scope {
        usage: scope.usage.iter().filter(|u| u.id <= call).cloned().collect(),
        learnt: scope.learnt.clone(),
        ..Scope::default()
    };
    let mut surplus = used(&up_to_call, limit, now).saturating_sub(target);
    for learnt in scope.learnt.iter_mut().filter(|l| l.limit == *limit && l.leaves > now) {
        let taken = learnt.amount.min(surplus);
        learnt.amount -= taken;
        surplus -= taken;
    }
    scope.learnt.retain(|l| l.amount > 0);
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

    fn sc(usage: &[Usage]) -> Scope {
        Scope { usage: usage.to_vec(), ..Scope::default() }
    }

    fn at(rfc3339: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc3339).unwrap()
    }

    fn daily(n: u64, reset: &str) -> LimitConfig {
        LimitConfig {
            requests: Some(n),
            tokens: None,
            per: Duration::from_secs(86_400),
            resets: Some(crate::calendar::DailyReset::parse(reset).unwrap()),
        }
    }

    fn done(id: i64, at: SystemTime, tokens: u64) -> Usage {
        Usage { id, done: Some(at), expires: at + Duration::from_secs(60), tokens }
    }

    #[test]
    fn pruning_lately_costs_a_constant_share_per_call_and_never_drops_what_a_window_sees() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let limit = requests(1_000_000, 10);
        let mut scope = Scope::default();
        let mut looked_through = 0usize;
        for i in 0..10_000i64 {
            // One call every 10 ms, each answered at once: 1000 calls in any 10 s window.
            let now = t0 + Duration::from_millis(10 * i as u64);
            let (before, last_pruned) = (scope.usage.len(), scope.pruned_at);
            prune_lately(&mut scope, limit.per, now);
            // Each prune stamps its time: what it looked through is what was there before it.
            if scope.pruned_at != last_pruned {
                looked_through += before;
            }
            scope.usage.push(done(i, now, 1));
            assert!(scope.usage.len() <= 2 * 1_001 + PRUNE_AT_LEAST, "call {i}: {} kept", scope.usage.len());
            assert_eq!(used(&scope, &limit, now), (i + 1).min(1_000) as u64, "call {i}");
        }
        // A pass over the whole window at every call would be 10^7 entries read.
        assert!(looked_through < 4 * 10_000, "{looked_through} entries read for 10000 calls");
        assert!(scope.usage(9_999).is_some() && scope.usage(5).is_none(), "found by id, the old ones gone");
    }

    #[test]
    fn the_nth_request_in_a_window_waits_for_the_oldest_to_leave() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let usage: Vec<Usage> = (0..3).map(|i| done(i, t0 + Duration::from_millis(100 * i as u64), 1)).collect();
        let now = t0 + Duration::from_millis(500);
        assert_eq!(
            check(&sc(&usage), &[requests(3, 2)], 1, now),
            Err(Blocked::Until(t0 + Duration::from_secs(2), QuotaMeasure::Requests))
        );
        assert_eq!(check(&sc(&usage), &[requests(4, 2)], 1, now), Ok(()));
        assert_eq!(
            check(&sc(&usage), &[requests(3, 2)], 1, t0 + Duration::from_secs(2)),
            Ok(()),
            "the oldest has left"
        );
    }

    #[test]
    fn a_request_in_flight_occupies_its_window_until_answered() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let in_flight = Usage { id: 1, done: None, expires: now + Duration::from_secs(30), tokens: 0 };
        let another = Usage { id: 2, done: None, expires: now + Duration::from_secs(30), tokens: 0 };
        assert_eq!(
            check(&sc(&[in_flight, another]), &[requests(2, 2)], 1, now),
            Err(Blocked::Until(now + Duration::from_secs(2), QuotaMeasure::Requests))
        );
    }

    #[test]
    fn token_windows_count_estimates_and_refuse_what_can_never_fit() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let usage = vec![done(1, t0, 4000), done(2, t0 + Duration::from_secs(10), 1500)];
        let now = t0 + Duration::from_secs(20);
        assert_eq!(check(&sc(&usage), &[tokens(6000, 60)], 500, now), Ok(()));
        assert_eq!(
            check(&sc(&usage), &[tokens(6000, 60)], 2000, now),
            Err(Blocked::Until(t0 + Duration::from_secs(60), QuotaMeasure::Tokens))
        );
        assert_eq!(check(&sc(&usage), &[tokens(6000, 60)], 7000, now), Err(Blocked::TooLarge));
    }

    #[test]
    fn the_latest_of_several_limits_wins_and_old_usage_is_pruned() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let usage: Vec<Usage> = (0..5).map(|i| done(i, t0 + Duration::from_secs(i as u64), 1)).collect();
        let now = t0 + Duration::from_secs(5);
        let limits = [requests(5, 10), requests(100, 3600)];
        assert_eq!(
            check(&sc(&usage), &limits, 1, now),
            Err(Blocked::Until(t0 + Duration::from_secs(10), QuotaMeasure::Requests))
        );
        let mut scope = sc(&usage);
        prune(&mut scope, Duration::from_secs(3), now);
        assert_eq!(scope.usage.len(), 2);
    }

    #[test]
    fn a_limit_of_zero_admits_nothing_and_does_not_panic() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            check(&Scope::default(), &[requests(0, 60)], 1, now),
            Err(Blocked::Until(now + Duration::from_secs(60), QuotaMeasure::Requests))
        );
        let usage = vec![done(1, now, 1)];
        assert!(matches!(check(&sc(&usage), &[requests(0, 60)], 1, now), Err(Blocked::Until(..))));
    }

    #[test]
    fn a_calendar_quota_spent_at_2330_has_room_at_midnight_utc() {
        let limit = daily(2, "00:00 UTC");
        let usage = [done(1, at("2026-11-30T23:00:00Z"), 1), done(2, at("2026-11-30T23:30:00Z"), 1)];
        let now = at("2026-11-30T23:31:00Z");
        assert_eq!(
            check(&sc(&usage), std::slice::from_ref(&limit), 1, now),
            Err(Blocked::Until(at("2026-12-01T00:00:00Z"), QuotaMeasure::Requests)),
            "room at the reset, not 24 h after the calls"
        );
        assert_eq!(check(&sc(&usage), std::slice::from_ref(&limit), 1, at("2026-12-01T00:00:00Z")), Ok(()));
        // A sliding day would have waited until 23:00 the next day.
        let sliding = requests(2, 86_400);
        assert_eq!(
            check(&sc(&usage), &[sliding], 1, now),
            Err(Blocked::Until(at("2026-12-01T23:00:00Z"), QuotaMeasure::Requests))
        );
    }

    #[test]
    fn a_call_whose_occupancy_touches_two_calendar_days_counts_in_both() {
        let limit = daily(1, "00:00 UTC");
        let sent_before_midnight =
            Usage { id: 1, done: Some(at("2026-12-01T00:00:02Z")), expires: at("2026-12-01T00:01:00Z"), tokens: 1 };
        let now = at("2026-12-01T00:00:05Z");
        assert_eq!(
            check(&sc(&[sent_before_midnight]), std::slice::from_ref(&limit), 1, now),
            Err(Blocked::Until(at("2026-12-02T00:00:00Z"), QuotaMeasure::Requests))
        );
        // In flight across midnight: it counts in the new day, and may leave at the next reset.
        let in_flight = Usage { id: 2, done: None, expires: at("2026-12-01T00:01:00Z"), tokens: 1 };
        assert!(check(&sc(&[in_flight]), &[limit], 1, now).is_err());
    }

    #[test]
    fn a_pacific_calendar_day_follows_daylight_saving_time() {
        // 2026-11-01 is 25 hours long in Los Angeles: midnight PDT = 07:00Z, next midnight PST = 08:00Z.
        let limit = daily(1, "00:00 America/Los_Angeles");
        let usage = [done(1, at("2026-11-01T07:30:00Z"), 1)];
        let late_that_day = at("2026-11-02T07:30:00Z");
        assert_eq!(
            check(&sc(&usage), std::slice::from_ref(&limit), 1, late_that_day),
            Err(Blocked::Until(at("2026-11-02T08:00:00Z"), QuotaMeasure::Requests)),
            "still the same (25-hour) Pacific day"
        );
        assert_eq!(check(&sc(&usage), std::slice::from_ref(&limit), 1, at("2026-11-02T08:00:00Z")), Ok(()));
        let mut scope = sc(&usage);
        prune(&mut scope, keep_for([&limit]), late_that_day);
        assert_eq!(scope.usage.len(), 1, "kept for the whole long day");
    }

    #[test]
    fn an_observation_raises_our_count_and_lowers_only_what_it_added() {
        let limit = requests(10, 60);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut scope = sc(&[done(1, now, 1)]);
        let seen = |remaining, resets_at| Seen { remaining, resets_at, call: Some(1) };
        observe(&mut scope, &limit, seen(3, Some(now + Duration::from_secs(20))), now);
        assert_eq!(used(&scope, &limit, now), 7, "believed: 3 left of 10");
        assert_eq!(used(&scope, &limit, now + Duration::from_secs(20)), 1, "the learnt use leaves at the reset");
        observe(&mut scope, &limit, seen(10, None), now);
        assert_eq!(used(&scope, &limit, now), 1, "our own call is never forgotten");
        observe(&mut scope, &limit, seen(0, Some(now + Duration::from_secs(3600))), now);
        assert_eq!(used(&scope, &limit, now + Duration::from_secs(59)), 10);
        assert_eq!(used(&scope, &limit, now + Duration::from_secs(60)), 0, "bounded by the window");
        assert!(check(&scope, std::slice::from_ref(&limit), 1, now).is_err());
        assert!(check(&scope, &[requests(10, 3600)], 1, now).is_ok(), "learnt use counts in its own limit only");
    }

    fn observation(remaining: u64, limit: Option<u64>) -> QuotaObservation {
        QuotaObservation { measure: QuotaMeasure::Requests, remaining, limit, resets_at: None, window: None }
    }

    #[test]
    fn a_stated_size_that_matches_no_declared_limit_is_another_budget() {
        // OpenAI-style headers name no window: a budget of 60 (the provider's minute) is not
        // our only declared requests limit, 1000 a day.
        let limits = [requests(1000, 86_400)];
        let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: Duration::from_secs(30) };
        assert!(matching(&ask, &observation(0, Some(60))).is_empty());
        assert_eq!(matching(&ask, &observation(0, Some(1000))).len(), 1);
        assert_eq!(matching(&ask, &observation(0, None)).len(), 1, "no size stated: the only one");
    }

    #[test]
    fn learnt_use_without_a_reset_time_leaves_after_a_minute_not_a_day() {
        let limit = requests(1000, 86_400);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut scope = sc(&[done(1, now, 1)]);
        observe(&mut scope, &limit, Seen { remaining: 0, resets_at: None, call: Some(1) }, now);
        assert_eq!(used(&scope, &limit, now), 1000);
        assert_eq!(used(&scope, &limit, now + LEARNT_WITHOUT_RESET), 1, "only our own call after a minute");
        let reset = now + Duration::from_secs(30);
        assert_eq!(learnt_leaves(&limit, Some(reset), now), reset, "a stated reset is kept");
    }

    #[test]
    fn an_observation_whose_reset_has_passed_is_not_current() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let with_reset = |at| QuotaObservation { resets_at: Some(at), ..observation(0, Some(50)) };
        assert!(!current(&with_reset(now), now));
        assert!(!current(&with_reset(now - Duration::from_secs(2)), now));
        assert!(current(&with_reset(now + Duration::from_millis(1)), now));
        assert!(current(&observation(0, Some(50)), now));
    }

    #[test]
    fn lowering_discounts_calls_admitted_after_the_observed_one() {
        let limit = requests(10, 60);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let in_flight = |id| Usage { id, done: None, expires: now + Duration::from_secs(30), tokens: 1 };
        let mut scope = sc(&[done(1, now, 1), done(2, now, 1), in_flight(3), in_flight(4), in_flight(5)]);
        scope.learnt.push(Learnt { limit: limit.clone(), amount: 5, leaves: now + Duration::from_secs(60) });
        // The answer to call 2: the provider had 5 external + calls 1 and 2: 3 left.
        observe(&mut scope, &limit, Seen { remaining: 3, resets_at: None, call: Some(2) }, now);
        assert_eq!(used(&scope, &limit, now), 10, "calls 3 to 5 are not in its figure");
        // Call unknown: nothing to compare with, nothing taken back.
        observe(&mut scope, &limit, Seen { remaining: 10, resets_at: None, call: None }, now);
        assert_eq!(used(&scope, &limit, now), 10);
        // The answer to call 5 (its figure holds all five of ours) says 5 left: the external
        // use has left the provider's window, and is taken back.
        observe(&mut scope, &limit, Seen { remaining: 5, resets_at: None, call: Some(5) }, now);
        assert_eq!(used(&scope, &limit, now), 5, "our five calls only");
    }

    #[test]
    fn raising_never_learns_a_later_call_that_overtook_the_observed_one() {
        // 10 an hour. X (1) then Y (2) are admitted; Y overtakes X at the provider, which holds
        // Y, 5 of another client, X: "3 of 10 left" in X's answer, Y answered or not.
        let limit = requests(10, 3600);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let in_flight = Usage { id: 2, done: None, expires: now + Duration::from_secs(30), tokens: 1 };
        for y in [done(2, now, 1), in_flight] {
            let mut scope = sc(&[done(1, now, 1), y.clone()]);
            observe(&mut scope, &limit, Seen { remaining: 3, resets_at: None, call: Some(1) }, now);
            assert_eq!(used(&scope, &limit, now), 7, "5 learnt, not 6: Y is in the figure ({y:?})");
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;
        use crate::calendar::DailyReset;

        proptest! {
            /// Whatever the zone, the reset time and the calls' timing (across DST changes),
            /// no calendar day ever holds more admitted calls than the limit, counting every
            /// call in each day its occupancy touches.
            #[test]
            fn no_calendar_day_ever_holds_more_than_its_limit(
                zone in prop::sample::select(vec!["UTC", "America/Los_Angeles", "Europe/Berlin", "Australia/Lord_Howe", "America/New_York"]),
                hour in 0u8..24,
                minute in 0u8..60,
                start in prop::sample::select(vec!["2026-03-07T00:00:00Z", "2026-10-31T00:00:00Z", "2026-04-04T12:00:00Z"]),
                steps in prop::collection::vec((0u64..4 * 3600, 0u64..900), 1..120),
                max in 1u64..6,
            ) {
                let reset = DailyReset::parse(&format!("{hour:02}:{minute:02} {zone}")).unwrap();
                let limit = LimitConfig { requests: Some(max), tokens: None, per: Duration::from_secs(86_400), resets: Some(reset.clone()) };
                let mut now = humantime::parse_rfc3339(start).unwrap();
                let mut scope = Scope::default();
                let mut admitted = Vec::new();
                for (i, (gap, latency)) in steps.into_iter().enumerate() {
                    now += Duration::from_secs(gap);
                    prune(&mut scope, keep_for([&limit]), now);
                    if check(&scope, std::slice::from_ref(&limit), 1, now).is_ok() {
                        let end = now + Duration::from_secs(latency);
                        scope.usage.push(Usage { id: i as i64, done: None, expires: end, tokens: 1 });
                        admitted.push((now, end));
                    }
                }
                for (sent, _) in &admitted {
                    let day_start = reset.last_at_or_before(*sent);
                    let day_end = reset.next_after(*sent);
                    let in_day = admitted.iter().filter(|(s, e)| *s < day_end && *e >= day_start).count() as u64;
                    prop_assert!(in_day <= max, "{in_day} calls in the day from {day_start:?}");
                }
            }

            #[test]
            fn a_reset_text_never_panics(text in any::<String>()) {
                let _ = DailyReset::parse(&text);
            }
        }
    }
}
