//! The fallback engine: pure logic over two traits, [`ChatProvider`] and [`ProviderState`].
//!
//! It knows nothing of AMQP, SQL or HTTP, and reads the time only from a [`Clock`]. One *pass*
//! walks the chain in order and either gets an answer, fails for good, or names the earliest
//! instant a provider becomes usable again; [`run`] repeats passes, waiting in between while the
//! wait is short, and hands a long wait back to the caller (the worker parks the job in a delay
//! queue rather than hold a broker slot).

pub mod checks;
pub mod clock;
mod outcome;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};

pub use checks::{Accept, Expectation, OnAllRejected};
pub use clock::{Clock, SystemClock, far_future, later, rfc3339_millis, rfc3339_seconds};
pub use outcome::{
    CIRCUIT_BASE, CIRCUIT_THRESHOLD, DEFAULT_RATE_LIMIT_COOLDOWN, circuit_cooldown, clamp_asked, cooldown_for,
};

use crate::config::{LimitConfig, QuotaPoolConfig};
use crate::job::{ChatBody, ErrorCode, Job, estimate_prompt_tokens, requested_completion_tokens};
use crate::providers::{ChatProvider, Completion, Failure, FailureKind};
use crate::routing::{Attempt, AttemptOutcome, CooldownReason, LimitScope, QuotaObservation};
use crate::state::{Admission, Ask, Cooldown, Permit, ProbeClaim, ProviderState, QuotaMeasure, quota};

/// One provider as a chain uses it.
#[derive(Clone)]
pub struct Member {
    pub name: String,
    pub model: String,
    pub free: bool,
    pub context_window: Option<u64>,
    pub max_retries: u32,
    /// Held across all workers by the state store.
    pub limits: Vec<LimitConfig>,
    /// The pools (`[[quotas]]`, resolved from config at build time) the provider draws from as
    /// well: shared, so building an [`Ask`] per call allocates nothing.
    pub pools: Arc<[QuotaPoolConfig]>,
    /// The per-request timeout: bounds how long a call can occupy the provider's windows.
    pub timeout: Duration,
    /// Every other configured provider that draws from one of this provider's `[[quotas]]`
    /// pools, resolved once from the config: an account-scoped 429 (contract §6) cools them
    /// down with this one, so no worker spends a request to learn what the account said.
    pub pool_mates: Vec<String>,
    /// This worker's last timeout on the provider, shared by every chain that has it.
    pub timeouts: Arc<RecentTimeouts>,
    pub provider: Arc<dyn ChatProvider>,
}

/// When one of this worker's jobs last timed out on a provider. A lone timeout may be a fluke
/// and is retried in place (`max_retries`) before the provider is cooled down; jobs that time
/// out together mean the provider hangs, and each retrying in place would send it one more
/// request (and wait one more timeout) before any of them cooled it down (contract §6: a
/// timeout cools the provider down for every worker).
#[derive(Debug, Default)]
pub struct RecentTimeouts(std::sync::Mutex<Option<SystemTime>>);

impl RecentTimeouts {
    /// Records a timeout at `now` and answers the one recorded before it.
    fn record(&self, now: SystemTime) -> Option<SystemTime> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).replace(now)
    }
}

/// A named chain, ready to run.
pub struct Chain {
    pub name: String,
    pub members: Vec<Member>,
    pub max_wait: Duration,
    /// The most a job's own `max_wait` may ask for.
    pub max_wait_limit: Duration,
    pub free_wait: Duration,
    /// What an acceptable answer is (contract §7); a job's own `accept` overrides it key by key.
    pub accept: Accept,
}

impl Chain {
    /// How long a job may wait: its own `max_wait` when it set one within `max_wait_limit`,
    /// else the chain's. Above the limit the job is invalid (the text says why).
    pub fn max_wait_for(&self, asked: Option<Duration>) -> Result<Duration, String> {
        match asked {
            None => Ok(self.max_wait),
            Some(asked) if asked <= self.max_wait_limit => Ok(asked),
            Some(asked) => Err(format!(
                "`max_wait` {} is above chain `{}`'s max_wait_limit ({})",
                humantime::format_duration(asked),
                self.name,
                humantime::format_duration(self.max_wait_limit)
            )),
        }
    }
}

/// What the engine remembers of one job across passes (and, through the worker, across parks).
#[derive(Debug, Clone)]
pub struct JobProgress {
    /// When the job was first received: `max_wait` and `free_wait` count from here.
    pub first_seen: SystemTime,
    pub attempts: Vec<Attempt>,
    /// Providers that refused this request for good (client errors, context too small).
    dropped: HashSet<String>,
    /// Providers that failed this job transiently without a shared cooldown (a lone 5xx), with
    /// the time before which this job will not retry them and how often they failed.
    backoff: HashMap<String, (SystemTime, u32)>,
    /// When this job last timed out on each provider (see [`RecentTimeouts`]).
    timed_out: HashMap<String, SystemTime>,
    /// The last answer the job's checks rejected, kept when `on_all_rejected = "best"` so the
    /// job can get it instead of failing. Held in memory only: a job parked meanwhile comes
    /// back without it (an answer does not fit the parked job's headers).
    best: Option<Box<RejectedAnswer>>,
}

/// An answer that failed the job's checks, and who gave it.
#[derive(Debug, Clone)]
struct RejectedAnswer {
    provider: String,
    model: String,
    free: bool,
    completion: Completion,
}

impl JobProgress {
    pub fn new(first_seen: SystemTime) -> Self {
        Self::resume(first_seen, Vec::new())
    }

    /// Rebuilds progress from a parked job's attempt list.
    pub fn resume(first_seen: SystemTime, attempts: Vec<Attempt>) -> Self {
        let dropped = attempts.iter().filter(|a| a.outcome.is_final_for_job()).map(|a| a.provider.clone()).collect();
        Self { first_seen, attempts, dropped, backoff: HashMap::new(), timed_out: HashMap::new(), best: None }
    }

    /// Records that `member` was passed over. A job that waits goes through its chain again and
    /// again: a skip repeating the provider's previous one only moves that entry's `until`, so the
    /// result (and the metrics) list each stretch of skipping once, not once per wake-up.
    fn skip(&mut self, member: &Member, outcome: AttemptOutcome, until: Option<SystemTime>, message: Option<String>) {
        let until = until.map(rfc3339_millis);
        let previous = self.attempts.iter_mut().rev().find(|a| a.provider == member.name);
        if let Some(previous) = previous.filter(|a| a.outcome == outcome) {
            previous.until = until;
            previous.message = message;
            return;
        }
        let provider = member.name.clone();
        self.attempts.push(Attempt { provider, outcome, status: None, latency_ms: 0, until, message });
    }
}

/// How a job ended (or that it must wait).
#[derive(Debug)]
pub enum Verdict {
    Answered {
        provider: String,
        model: String,
        free: bool,
        completion: Completion,
        /// The answer failed the job's checks and is given because of
        /// `on_all_rejected = "best"` (`routing.rejected` in the result).
        rejected: bool,
    },
    Failed {
        code: ErrorCode,
        message: String,
    },
    /// Nothing is usable before `until` (and `until` is within `max_wait`).
    Wait {
        until: SystemTime,
        /// How the jobs waiting for `until` should spread their wake-ups.
        wake: Wake,
    },
}

/// How jobs that wait for the same instant spread their wake-ups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Room in a limit's window: a job's ask goes through strict admission, so jobs waking
    /// together cost asks, never calls beyond the limit, and a slot that frees is taken at once.
    /// Spread over the first 5 ms only: waking up to a tenth of the wait late (as below) left
    /// each slot idle for tens of milliseconds per window (measured: 97.2–97.5 % of strict 2 s
    /// windows used, 97.9–98.3 % with this).
    Room,
    /// Anything else (a cooldown's end, a backoff, the free wait): the provider itself, or a
    /// half-open circuit, would take the herd, so wake-ups spread over a tenth of the wait (at
    /// most 250 ms).
    Spread,
}

/// How long [`run`] may keep a job in hand.
#[derive(Debug, Clone, Copy)]
pub struct HoldPolicy {
    /// Waits up to this long happen in place; longer ones are returned as [`Verdict::Wait`].
    pub hold_limit: Duration,
    /// Never wait in place past this instant (the delivery's deadline).
    pub hold_until: SystemTime,
}

impl HoldPolicy {
    /// Waits of up to `hold_limit` in place, none ending more than `hold_for` after `now`.
    pub fn new(hold_limit: Duration, now: SystemTime, hold_for: Duration) -> Self {
        Self { hold_limit, hold_until: later(now, hold_for) }
    }
}

/// When a passed-over provider may be tried again, and whose word that time is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NextTry {
    at: SystemTime,
    /// The provider gave this time (a 429's retry time, a daily reset), or it is certain (a
    /// limit's window, `free_wait`): a deadline before it may fail the job at once. Otherwise
    /// it is our estimate (an open circuit, a backoff, a host that did not answer), which the
    /// job waits out until its deadline (contract §6).
    firm: bool,
    /// Room in the member's limits, which admission guards: see [`Wake::Room`].
    room: bool,
}

impl NextTry {
    fn firm(at: SystemTime) -> Self {
        Self { at, firm: true, room: false }
    }

    fn estimate(at: SystemTime) -> Self {
        Self { at, firm: false, room: false }
    }

    /// When a limit's window has room again: certain, and guarded by admission.
    fn room(at: SystemTime) -> Self {
        Self { at, firm: true, room: true }
    }

    fn after_cooldown(cooldown: &Cooldown) -> Self {
        Self { at: cooldown.until, firm: cooldown.reason.is_providers_word(), room: false }
    }
}

/// One job as a pass serves it: the request and the checks its answers must pass.
pub struct Request<'a> {
    pub body: &'a ChatBody,
    pub expect: Expectation,
}

impl<'a> Request<'a> {
    /// `job` under `chain`'s answer checks, overridden by the job's own `accept`. `Err` (a text
    /// for `invalid_request`) when no answer to it could be checked: its schema does not compile.
    pub fn new(chain: &Chain, job: &'a Job) -> Result<Request<'a>, String> {
        let accept = chain.accept.overridden_by(job.accept.as_ref());
        Ok(Request { body: &job.body, expect: Expectation::for_job(accept, &job.body)? })
    }
}

/// Runs passes until the job is answered, fails, or must wait longer than the policy allows.
pub async fn run(
    chain: &Chain,
    job: &Job,
    max_wait: Duration,
    progress: &mut JobProgress,
    state: &dyn ProviderState,
    hold: HoldPolicy,
    clock: &dyn Clock,
) -> Verdict {
    let request = match Request::new(chain, job) {
        Ok(request) => request,
        Err(message) => return Verdict::Failed { code: ErrorCode::InvalidRequest, message },
    };
    // Waits in a row refused for a time already past.
    let mut overdue: u32 = 0;
    loop {
        let verdict = run_pass(chain, &request, max_wait, progress, state, clock).await;
        let Verdict::Wait { until, wake } = verdict else {
            return verdict;
        };
        let now = clock.now();
        let wait = until.duration_since(now).unwrap_or_default();
        // Told to wait for a time already past: the shared state decides on a clock behind this
        // worker's, or refuses for a moment (a held lock). Asking again every few milliseconds
        // until it catches up would be a busy loop: the pause grows instead.
        overdue = if wait.is_zero() { overdue.saturating_add(1) } else { 0 };
        let pause = if overdue > 0 { overdue_pause(overdue) } else { spread(wait, wake) };
        // Whether to wait in place is the wait's to decide, not the random spread on top of it
        // (a wait up to the deadline, exactly the hold limit in `batch`, was otherwise handed
        // back, and read as a deadline); the spread only may not run past `hold_until`.
        let sleep = wait.saturating_add(pause);
        if wait > hold.hold_limit || later(now, sleep) > hold.hold_until {
            return Verdict::Wait { until, wake };
        }
        clock.sleep(sleep).await;
    }
}

/// A small random delay added to every wake-up so that jobs waiting for the same instant do not
/// all ask in the same millisecond; how small depends on what a herd would hit ([`Wake`]).
fn spread(wait: Duration, wake: Wake) -> Duration {
    spread_cap(wait, wake).mul_f64(fastrand::f64())
}

/// The most [`spread`] adds.
fn spread_cap(wait: Duration, wake: Wake) -> Duration {
    match wake {
        Wake::Room => MIN_SPREAD,
        Wake::Spread => (wait / 10).min(MAX_SPREAD).max(MIN_SPREAD),
    }
}

/// The narrowest spread of wake-ups.
const MIN_SPREAD: Duration = Duration::from_millis(5);

/// The pause before asking again after the `n`-th wait in a row for a time already past: 2.5-5,
/// 10-20, 40-80 ms, then 125-250 ms. At least half of it is certain, so a clock 100 ms
/// behind costs a handful of asks, not one every few milliseconds.
fn overdue_pause(n: u32) -> Duration {
    let cap = MIN_SPREAD.saturating_mul(4u32.saturating_pow(n.saturating_sub(1))).min(MAX_SPREAD);
    (cap / 2).saturating_add((cap / 2).mul_f64(fastrand::f64()))
}

/// The widest spread of wake-ups.
const MAX_SPREAD: Duration = Duration::from_millis(250);

/// One walk through the chain.
pub async fn run_pass(
    chain: &Chain,
    request: &Request<'_>,
    max_wait: Duration,
    progress: &mut JobProgress,
    state: &dyn ProviderState,
    clock: &dyn Clock,
) -> Verdict {
    let body = request.body;
    let needed_tokens = estimate_prompt_tokens(body).saturating_add(requested_completion_tokens(body).unwrap_or(0));
    let mut next_tries = Vec::new();
    for member in &chain.members {
        if progress.dropped.contains(&member.name) {
            continue;
        }
        let now = clock.now();
        if member.context_window.is_some_and(|window| needed_tokens > window) {
            let message = format!(
                "about {needed_tokens} tokens do not fit a {}-token context",
                member.context_window.unwrap_or(0)
            );
            progress.skip(member, AttemptOutcome::SkippedContext, None, Some(message));
            progress.dropped.insert(member.name.clone());
            continue;
        }
        // Before admission: a provider that cannot carry the job costs no request and no quota.
        if let Err(missing) = member.provider.can_carry(body) {
            progress.skip(member, AttemptOutcome::SkippedCapability, None, Some(missing));
            progress.dropped.insert(member.name.clone());
            continue;
        }
        if let Some(&(not_before, _)) = progress.backoff.get(&member.name)
            && not_before > now
        {
            next_tries.push(NextTry::estimate(not_before));
            continue;
        }
        let paid_from = later(progress.first_seen, chain.free_wait);
        if !member.free && now < paid_from {
            progress.skip(member, AttemptOutcome::SkippedPaid, Some(paid_from), None);
            next_tries.push(NextTry::firm(paid_from));
            continue;
        }
        let call = Call { member, body, expect: &request.expect, tokens: needed_tokens, state, clock };
        match call_member(&call, progress).await {
            Ok(completion) => {
                return Verdict::Answered {
                    provider: member.name.clone(),
                    model: member.model.clone(),
                    free: member.free,
                    completion,
                    rejected: false,
                };
            }
            Err(Some(next)) => next_tries.push(next),
            Err(None) => {}
        }
    }
    let verdict = conclude(chain, max_wait, progress, &next_tries, clock.now());
    match (verdict, progress.best.take()) {
        // `on_all_rejected = "best"`: the last rejected answer rather than no answer at all.
        (Verdict::Failed { .. }, Some(best)) => {
            let RejectedAnswer { provider, model, free, completion } = *best;
            Verdict::Answered { provider, model, free, completion, rejected: true }
        }
        (verdict, best) => {
            progress.best = best;
            verdict
        }
    }
}

/// What a pass that got no answer means for the job. It waits for the earliest provider within
/// its deadline; when every provider is beyond it, the job fails at once only if each of those
/// times is the provider's own word, and otherwise waits until the deadline (an estimate may be
/// wrong: the provider may come back sooner) and fails there.
fn conclude(
    chain: &Chain,
    max_wait: Duration,
    progress: &JobProgress,
    next_tries: &[NextTry],
    now: SystemTime,
) -> Verdict {
    let Some(earliest) = next_tries.iter().map(|next| next.at).min() else {
        return Verdict::Failed { code: ErrorCode::AllProvidersFailed, message: all_failed_message(chain, progress) };
    };
    let deadline = later(progress.first_seen, max_wait);
    if earliest <= deadline {
        // Every provider due before the wide spread would have ended waits only for room: a
        // herd costs asks, not calls. One due a little later (a 429's reset) would take the jobs
        // the freed slots do not take, woken together.
        let reach = later(earliest, spread_cap(earliest.duration_since(now).unwrap_or_default(), Wake::Spread));
        let room = next_tries.iter().filter(|next| next.at <= reach).all(|next| next.room);
        return Verdict::Wait { until: earliest, wake: if room { Wake::Room } else { Wake::Spread } };
    }
    if now < deadline && !next_tries.iter().all(|next| next.firm) {
        return Verdict::Wait { until: deadline, wake: Wake::Spread };
    }
    Verdict::Failed {
        code: ErrorCode::DeadlineExceeded,
        message: format!(
            "no provider of chain `{}` becomes usable within max_wait ({}); the earliest is at {}",
            chain.name,
            humantime::format_duration(max_wait),
            rfc3339_millis(earliest)
        ),
    }
}

/// One member's call for one job: what [`call_member`] and its helpers share.
struct Call<'a> {
    member: &'a Member,
    body: &'a ChatBody,
    /// What the job's answers must pass (contract §7).
    expect: &'a Expectation,
    /// The request's estimated size (prompt + completion budget).
    tokens: u64,
    state: &'a dyn ProviderState,
    clock: &'a dyn Clock,
}

impl Call<'_> {
    /// What the shared state is asked about this call: the same for admission and for what
    /// the answer's headers teach, so both speak of the same limits.
    fn ask(&self) -> Ask<'_> {
        let member = self.member;
        let flight = member.timeout.saturating_add(FLIGHT_MARGIN);
        Ask { provider: &member.name, limits: &member.limits, pools: &member.pools, tokens: self.tokens, flight }
    }
}

/// Calls one member (with in-place retries on timeout/5xx). `Err(Some(next))`: usable again
/// then; `Err(None)`: dropped for this job.
async fn call_member(call: &Call<'_>, progress: &mut JobProgress) -> Result<Completion, Option<NextTry>> {
    let member = call.member;
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(4))
        .with_max_times(member.max_retries as usize)
        .with_jitter()
        .build();
    loop {
        let permit = admit(call, progress).await?;
        let started = call.clock.now();
        let result = member.provider.complete(call.body).await;
        let latency_ms = elapsed_ms(call.clock, started);
        let tokens = result.as_ref().ok().and_then(|c| c.total_tokens);
        // Rate-limit headers correct the windows against this answer: it is written first.
        if result.as_ref().is_ok_and(|c| !c.quota.is_empty()) {
            call.state.finish_written(permit.clone(), tokens, call.clock.now()).await;
        } else {
            call.state.finish(permit.clone(), tokens, call.clock.now()).await;
        }
        let failure = match result {
            Ok(completion) => {
                settle_success(call, &permit, &completion).await;
                let rejection = call.expect.check(&completion.body).err();
                progress.attempts.push(Attempt {
                    provider: member.name.clone(),
                    outcome: if rejection.is_some() { AttemptOutcome::RejectedOutput } else { AttemptOutcome::Ok },
                    status: Some(completion.status),
                    latency_ms,
                    until: None,
                    message: rejection.as_ref().map(|r| r.message.clone()),
                });
                let Some(rejection) = rejection else { return Ok(completion) };
                reject(call, rejection.reason, completion, progress).await;
                return Err(None);
            }
            Err(failure) => failure,
        };
        let retry_delay = if failure.kind.is_retryable_in_place() { delays.next() } else { None };
        let hung = failure.kind == FailureKind::Timeout && failure.status.is_none();
        let retry_delay = retry_delay.filter(|_| !hung || !timeouts_together(call, progress));
        // A timeout that will be retried in place does not cool the provider down yet.
        let settled = if retry_delay.is_some() && failure.kind == FailureKind::Timeout {
            Settled::Nothing
        } else {
            settle_failure(call, &failure, progress).await
        };
        progress.attempts.push(Attempt {
            provider: member.name.clone(),
            outcome: failure.kind.into(),
            status: failure.status,
            latency_ms,
            until: settled.next_try().map(|next| rfc3339_millis(next.at)),
            message: Some(failure.message.clone()),
        });
        match (failure.kind, retry_delay, settled) {
            (FailureKind::Client, _, _) => {
                progress.dropped.insert(member.name.clone());
                return Err(None);
            }
            (_, Some(delay), Settled::JobBackoff(_) | Settled::Nothing) => call.clock.sleep(delay).await,
            (_, _, Settled::Shared(next) | Settled::JobBackoff(next)) => return Err(Some(next)),
            (_, None, Settled::Nothing) => {
                return Err(Some(NextTry::estimate(later(call.clock.now(), Duration::from_secs(1)))));
            }
        }
    }
}

/// Records this job's timeout on the member (its own, not a 408 the provider answered);
/// whether another job of this worker timed out on it within one timeout before: both calls
/// were then in flight together, and the provider hangs, so this timeout cools it down at once
/// instead of being retried in place.
fn timeouts_together(call: &Call<'_>, progress: &mut JobProgress) -> bool {
    let (member, now) = (call.member, call.clock.now());
    let previous = member.timeouts.record(now);
    let own_previous = progress.timed_out.insert(member.name.clone(), now);
    previous.is_some_and(|at| {
        Some(at) != own_previous && now.duration_since(at).ok().is_none_or(|since| since <= member.timeout)
    })
}

/// An answer that failed the job's checks: the provider worked (its circuit closed, the call
/// counted in its windows) but gave this job a bad answer, so it is dropped for this job like
/// a client error, without a cooldown: another job may well get a good answer from it. The
/// rejection is counted for `status`, and the answer kept for `on_all_rejected = "best"`.
async fn reject(call: &Call<'_>, reason: checks::RejectReason, completion: Completion, progress: &mut JobProgress) {
    let member = call.member;
    tracing::info!(provider = %member.name, reason = reason.label(), "an answer failed the job's checks");
    call.state.record_rejected_output(&member.name, reason.label()).await;
    progress.dropped.insert(member.name.clone());
    if call.expect.accept.on_all_rejected == OnAllRejected::Best {
        let (provider, model, free) = (member.name.clone(), member.model.clone(), member.free);
        progress.best = Some(Box::new(RejectedAnswer { provider, model, free, completion }));
    }
}

/// Milliseconds since `started` on `clock` (zero if the clock went backwards).
fn elapsed_ms(clock: &dyn Clock, started: SystemTime) -> u64 {
    let elapsed = clock.now().duration_since(started).unwrap_or_default();
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

/// Slack on top of a provider's timeout before an unanswered call stops counting in its windows
/// (and before a half-open probe that never answered may be taken by someone else).
const FLIGHT_MARGIN: Duration = Duration::from_secs(5);

/// Asks the shared state for one call. A provider whose circuit has just ended is called by one
/// job across all workers (the half-open probe); every other job skips it as cooling down.
async fn admit(call: &Call<'_>, progress: &mut JobProgress) -> Result<Permit, Option<NextTry>> {
    let member = call.member;
    let now = call.clock.now();
    let ask = call.ask();
    let flight = ask.flight;
    let admission = match call.state.admit(ask, now).await {
        Admission::Granted(permit) => match call.state.claim_probe(&member.name, now, flight).await {
            ProbeClaim::Call => return Ok(permit),
            // Another job probes the provider (or a cooldown this worker has not heard of yet
            // replaced the circuit): release the slot and skip the provider until then.
            ProbeClaim::Held(cooldown) => {
                call.state.release(permit).await;
                Admission::Cooling(cooldown)
            }
        },
        other => other,
    };
    match admission {
        Admission::Granted(permit) => Ok(permit),
        Admission::Cooling(cooldown) => {
            progress.skip(member, AttemptOutcome::SkippedCooldown, Some(cooldown.until), None);
            Err(Some(NextTry::after_cooldown(&cooldown)))
        }
        Admission::OverQuota { until, measure } => {
            let what = match measure {
                QuotaMeasure::Requests => "request limit",
                QuotaMeasure::Tokens => "token limit",
            };
            progress.skip(member, AttemptOutcome::SkippedQuota, Some(until), Some(format!("{what} reached")));
            // Room comes no earlier than the window says: a certain time, not a guess.
            Err(Some(NextTry::room(until)))
        }
        Admission::TooLarge => {
            let message =
                format!("about {} tokens exceed one of the provider's (or its pools') token limits", call.tokens);
            progress.skip(member, AttemptOutcome::SkippedContext, None, Some(message));
            progress.dropped.insert(member.name.clone());
            Err(None)
        }
    }
}

/// A success closes the provider's circuit and teaches the shared view what the provider's
/// rate-limit headers say is left (contract §6); one whose headers say a budget is spent cools
/// the provider down until its reset rather than let the next call collect a 429.
/// `permit` is the answered call's: its headers speak of the provider's count when it took it.
async fn settle_success(call: &Call<'_>, permit: &Permit, completion: &Completion) {
    let member = call.member;
    call.state.record_success(&member.name).await;
    let now = call.clock.now();
    if !completion.quota.is_empty() {
        call.state.observe_quota(call.ask(), permit, &completion.quota, now).await;
    }
    let Some(reset) = completion.exhausted_until else { return };
    if reset <= now || spent_budgets_are_held(&call.ask(), &completion.quota) {
        return;
    }
    let until = clamp_asked(&member.name, reset, now);
    let reason = if until > later(now, Duration::from_secs(3600)) {
        CooldownReason::QuotaDay
    } else {
        CooldownReason::RateLimited
    };
    let detail = "the provider's rate-limit headers report a spent budget".to_string();
    call.state.cool_down(&member.name, Cooldown { until, reason, detail }).await;
}

/// Whether every budget the headers report spent is one the config declares exactly (the same
/// window, or the same size when the provider names no window): those limits are held
/// strictly across all workers, and the observation has just been counted into them, so the
/// provider has room again as soon as the window does. Cooling the provider until the
/// provider's reset instead (when its window is *whole* again) would waste the slots that free
/// up before it. A spent budget the config does not hold still cools the provider.
fn spent_budgets_are_held(ask: &Ask<'_>, quota: &[QuotaObservation]) -> bool {
    let mut spent = quota.iter().filter(|q| q.remaining == 0).peekable();
    // Held exactly: the window or size the provider named matches a declared limit (not the
    // guess `matching` makes for an observation that names neither).
    let held = |q: &&QuotaObservation| (q.window.is_some() || q.limit.is_some()) && !quota::matching(ask, q).is_empty();
    spent.peek().is_some() && spent.all(|q| held(&q))
}

/// What a failure did to the provider's availability.
#[derive(Debug, Clone, Copy)]
enum Settled {
    /// Cooling down for every worker (a 429, a bad key, an open circuit…).
    Shared(NextTry),
    /// Only this job stays away for a while (a lone 5xx).
    JobBackoff(NextTry),
    /// Nothing to wait for: a client error, or a timeout about to be retried in place.
    Nothing,
}

impl Settled {
    fn next_try(self) -> Option<NextTry> {
        match self {
            Self::Shared(next) | Self::JobBackoff(next) => Some(next),
            Self::Nothing => None,
        }
    }
}

/// Applies a failure to the shared state and to the job's own backoff.
async fn settle_failure(call: &Call<'_>, failure: &Failure, progress: &mut JobProgress) -> Settled {
    let (member, state, now) = (call.member, call.state, call.clock.now());
    if let Some((until, reason)) = cooldown_for(&member.name, failure, now) {
        if failure.kind == FailureKind::RateLimited && failure.scope == LimitScope::Account {
            return cool_down_pool(call, failure, until, reason).await;
        }
        let cooldown = Cooldown { until, reason, detail: failure.message.clone() };
        state.cool_down(&member.name, cooldown.clone()).await;
        return Settled::Shared(NextTry::after_cooldown(&cooldown));
    }
    if failure.kind != FailureKind::Server {
        return Settled::Nothing;
    }
    // A 503's own retry-after, if any, still bounds how soon this provider is tried again.
    let asked = failure.retry_at.map(|asked| clamp_asked(&member.name, asked, now));
    let consecutive = state.record_server_error(&member.name, &failure.message).await;
    if let Some(open_for) = circuit_cooldown(consecutive) {
        let until = later(now, open_for).max(asked.unwrap_or(now));
        let detail = format!("{consecutive} server errors in a row: {}", failure.message);
        state.cool_down(&member.name, Cooldown { until, reason: CooldownReason::Circuit, detail }).await;
        return Settled::Shared(NextTry::estimate(until));
    }
    // A lone 5xx: this job backs off from this provider for a while, others are not affected.
    let failures = progress.backoff.get(&member.name).map_or(0, |&(_, n)| n).saturating_add(1);
    let backoff = Duration::from_secs(1 << failures.min(5)).min(Duration::from_secs(30));
    let not_before = later(now, backoff).max(asked.unwrap_or(now));
    progress.backoff.insert(member.name.clone(), (not_before, failures));
    Settled::JobBackoff(NextTry::estimate(not_before))
}

/// A 429 the provider scoped to the account (contract §6): the provider and every pool mate
/// cool down together, each through the shared state (so every worker learns it the usual
/// way), with a detail that says it was the account's limit and who met it.
async fn cool_down_pool(call: &Call<'_>, failure: &Failure, until: SystemTime, reason: CooldownReason) -> Settled {
    let member = call.member;
    let detail = format!("the account's limit (its [[quotas]] pools): {}", failure.message);
    let cooldown = Cooldown { until, reason, detail };
    call.state.cool_down(&member.name, cooldown.clone()).await;
    for mate in &member.pool_mates {
        let detail =
            format!("the account's limit, met by `{}` (a [[quotas]] pool it shares): {}", member.name, failure.message);
        call.state.cool_down(mate, Cooldown { until, reason, detail }).await;
    }
    if !member.pool_mates.is_empty() {
        tracing::info!(provider = %member.name, mates = ?member.pool_mates, "an account-scoped 429 cools the provider's pools");
    }
    Settled::Shared(NextTry::after_cooldown(&cooldown))
}

fn all_failed_message(chain: &Chain, progress: &JobProgress) -> String {
    if chain.members.is_empty() {
        return format!("chain `{}` has no enabled provider (are their API keys set?)", chain.name);
    }
    let reasons: Vec<String> = chain
        .members
        .iter()
        .map(|member| {
            let last = progress.attempts.iter().rev().find(|a| a.provider == member.name);
            match last {
                Some(a) => {
                    let status = a.status.map(|s| format!(" {s}")).unwrap_or_default();
                    let message = a.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
                    format!("{}: {}{status}{message}", member.name, a.outcome.as_str())
                }
                None => format!("{}: not tried", member.name),
            }
        })
        .collect();
    let rejected_last = |member: &Member| {
        let last = progress.attempts.iter().rev().find(|a| a.provider == member.name);
        last.is_some_and(|a| a.outcome == AttemptOutcome::RejectedOutput)
    };
    if chain.members.iter().all(rejected_last) {
        return format!("no answer from chain `{}` passed the job's checks: {}", chain.name, reasons.join("; "));
    }
    format!("every provider of chain `{}` refused the request: {}", chain.name, reasons.join("; "))
}

#[cfg(test)]
mod tests;
