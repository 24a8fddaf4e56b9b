//! The fallback engine: pure logic over two traits, [`ChatProvider`] and [`ProviderState`].
//!
//! It knows nothing of AMQP, SQL or HTTP. One *pass* walks the chain in order and either gets an
//! answer, fails for good, or names the earliest instant a provider becomes usable again;
//! [`run`] repeats passes, waiting in between while the wait is short, and hands a long wait back
//! to the caller (the worker parks the job in a delay queue rather than hold a broker slot).

pub mod clock;
mod outcome;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};

pub use outcome::{CIRCUIT_THRESHOLD, circuit_cooldown, cooldown_for};

use crate::config::LimitConfig;
use crate::job::{ChatBody, ErrorCode, estimate_prompt_tokens, requested_completion_tokens};
use crate::providers::{ChatProvider, Completion, Failure, FailureKind};
use crate::routing::{Attempt, AttemptOutcome, CooldownReason};
use crate::state::{Admission, Ask, Cooldown, ProviderState, QuotaMeasure};

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
    /// The per-request timeout: bounds how long a call can occupy the provider's windows.
    pub timeout: Duration,
    pub provider: Arc<dyn ChatProvider>,
}

/// A named chain, ready to run.
pub struct Chain {
    pub name: String,
    pub members: Vec<Member>,
    pub max_wait: Duration,
    pub free_wait: Duration,
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
}

impl JobProgress {
    pub fn new(first_seen: SystemTime) -> Self {
        Self::resume(first_seen, Vec::new())
    }

    /// Rebuilds progress from a parked job's attempt list.
    pub fn resume(first_seen: SystemTime, attempts: Vec<Attempt>) -> Self {
        let dropped = attempts.iter().filter(|a| a.outcome.is_final_for_job()).map(|a| a.provider.clone()).collect();
        Self { first_seen, attempts, dropped, backoff: HashMap::new() }
    }

    /// Records that `member` was passed over. A job that waits goes through its chain again and
    /// again: a skip repeating the provider's previous one only moves that entry's `until`, so the
    /// result (and the metrics) list each stretch of skipping once, not once per wake-up.
    fn skip(&mut self, member: &Member, outcome: AttemptOutcome, until: Option<SystemTime>, message: Option<String>) {
        let until = until.map(|t| humantime::format_rfc3339_millis(t).to_string());
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
    },
    Failed {
        code: ErrorCode,
        message: String,
    },
    /// Nothing is usable before `until` (and `until` is within `max_wait`).
    Wait {
        until: SystemTime,
    },
}

/// How long [`run`] may keep a job in hand.
#[derive(Debug, Clone, Copy)]
pub struct HoldPolicy {
    /// Waits up to this long happen in place; longer ones are returned as [`Verdict::Wait`].
    pub hold_limit: Duration,
    /// Never wait in place past this instant (the delivery's deadline).
    pub hold_until: Instant,
}

/// Runs passes until the job is answered, fails, or must wait longer than the policy allows.
pub async fn run(
    chain: &Chain,
    body: &ChatBody,
    max_wait: Duration,
    progress: &mut JobProgress,
    state: &dyn ProviderState,
    hold: HoldPolicy,
) -> Verdict {
    loop {
        let verdict = run_pass(chain, body, max_wait, progress, state).await;
        let Verdict::Wait { until } = verdict else {
            return verdict;
        };
        let wait = until.duration_since(SystemTime::now()).unwrap_or_default();
        let wait = wait + spread(wait);
        if wait > hold.hold_limit || Instant::now() + wait > hold.hold_until {
            return Verdict::Wait { until };
        }
        tokio::time::sleep(wait).await;
    }
}

/// A small random delay added to every wake-up so that jobs waiting for the same reset do not
/// all call the provider in the same millisecond.
fn spread(wait: Duration) -> Duration {
    let cap = (wait / 10).min(Duration::from_millis(250)).max(Duration::from_millis(5));
    cap.mul_f64(fastrand::f64())
}

/// One walk through the chain.
pub async fn run_pass(
    chain: &Chain,
    body: &ChatBody,
    max_wait: Duration,
    progress: &mut JobProgress,
    state: &dyn ProviderState,
) -> Verdict {
    let needed_tokens = estimate_prompt_tokens(body) + requested_completion_tokens(body).unwrap_or(0);
    let mut wake: Option<SystemTime> = None;
    let mut earliest = |t: SystemTime| wake = Some(wake.map_or(t, |w: SystemTime| w.min(t)));

    for member in &chain.members {
        if progress.dropped.contains(&member.name) {
            continue;
        }
        let now = SystemTime::now();
        if member.context_window.is_some_and(|window| needed_tokens > window) {
            let message = format!(
                "about {needed_tokens} tokens do not fit a {}-token context",
                member.context_window.unwrap_or(0)
            );
            progress.skip(member, AttemptOutcome::SkippedContext, None, Some(message));
            progress.dropped.insert(member.name.clone());
            continue;
        }
        if let Some(&(not_before, _)) = progress.backoff.get(&member.name)
            && not_before > now
        {
            earliest(not_before);
            continue;
        }
        let paid_from = progress.first_seen + chain.free_wait;
        if !member.free && now < paid_from {
            progress.skip(member, AttemptOutcome::SkippedPaid, Some(paid_from), None);
            earliest(paid_from);
            continue;
        }
        match call_member(member, body, needed_tokens, progress, state).await {
            Ok(completion) => {
                return Verdict::Answered {
                    provider: member.name.clone(),
                    model: member.model.clone(),
                    free: member.free,
                    completion,
                };
            }
            Err(Some(retry_at)) => earliest(retry_at),
            Err(None) => {}
        }
    }

    let deadline = progress.first_seen + max_wait;
    match wake {
        Some(until) if until <= deadline => Verdict::Wait { until },
        Some(until) => Verdict::Failed {
            code: ErrorCode::DeadlineExceeded,
            message: format!(
                "no provider of chain `{}` becomes usable within max_wait ({}); the earliest is at {}",
                chain.name,
                humantime::format_duration(max_wait),
                humantime::format_rfc3339_seconds(until)
            ),
        },
        None => Verdict::Failed { code: ErrorCode::AllProvidersFailed, message: all_failed_message(chain, progress) },
    }
}

/// Calls one member (with in-place retries on timeout/5xx). `Err(Some(t))`: usable again at
/// `t`; `Err(None)`: dropped for this job.
async fn call_member(
    member: &Member,
    body: &ChatBody,
    tokens: u64,
    progress: &mut JobProgress,
    state: &dyn ProviderState,
) -> Result<Completion, Option<SystemTime>> {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(4))
        .with_max_times(member.max_retries as usize)
        .with_jitter()
        .build();
    loop {
        let ask =
            Ask { provider: &member.name, limits: &member.limits, tokens, flight: member.timeout + FLIGHT_MARGIN };
        let permit = match state.admit(ask, SystemTime::now()).await {
            Admission::Granted(permit) => permit,
            Admission::Cooling(cooldown) => {
                progress.skip(member, AttemptOutcome::SkippedCooldown, Some(cooldown.until), None);
                return Err(Some(cooldown.until));
            }
            Admission::OverQuota { until, measure } => {
                let what = match measure {
                    QuotaMeasure::Requests => "request limit",
                    QuotaMeasure::Tokens => "token limit",
                };
                progress.skip(member, AttemptOutcome::SkippedQuota, Some(until), Some(format!("{what} reached")));
                return Err(Some(until));
            }
            Admission::TooLarge => {
                let message = format!("about {tokens} tokens exceed one of the provider's token limits");
                progress.skip(member, AttemptOutcome::SkippedContext, None, Some(message));
                progress.dropped.insert(member.name.clone());
                return Err(None);
            }
        };
        let started = Instant::now();
        let result = member.provider.complete(body).await;
        let latency_ms = started.elapsed().as_millis() as u64;
        state.finish(permit, result.as_ref().ok().and_then(|c| c.total_tokens)).await;
        let failure = match result {
            Ok(completion) => {
                state.record_success(&member.name).await;
                if let Some(until) = completion.exhausted_until {
                    spent_budget(member, until, state).await;
                }
                progress.attempts.push(Attempt {
                    provider: member.name.clone(),
                    outcome: AttemptOutcome::Ok,
                    status: Some(completion.status),
                    latency_ms,
                    until: None,
                    message: None,
                });
                return Ok(completion);
            }
            Err(failure) => failure,
        };
        // A timeout that will be retried in place does not cool the provider down yet.
        let retry_delay = if failure.kind.is_retryable_in_place() { delays.next() } else { None };
        let retry_at = if retry_delay.is_some() && failure.kind == FailureKind::Timeout {
            None
        } else {
            settle_failure(member, &failure, progress, state).await
        };
        progress.attempts.push(Attempt {
            provider: member.name.clone(),
            outcome: failure.kind.into(),
            status: failure.status,
            latency_ms,
            until: retry_at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
            message: Some(failure.message.clone()),
        });
        let circuit_open = retry_at.is_some_and(|t| t > SystemTime::now() + Duration::from_secs(5));
        match retry_delay {
            Some(delay) if !circuit_open => tokio::time::sleep(delay).await,
            _ if failure.kind == FailureKind::Client => {
                progress.dropped.insert(member.name.clone());
                return Err(None);
            }
            _ => {
                return Err(Some(retry_at.unwrap_or_else(|| SystemTime::now() + Duration::from_secs(1))));
            }
        }
    }
}

/// Slack on top of a provider's timeout before an unanswered call stops counting in its windows.
const FLIGHT_MARGIN: Duration = Duration::from_secs(5);

/// A success whose headers say a budget is spent: cool the provider down until its reset rather
/// than let the next call collect a 429.
async fn spent_budget(member: &Member, until: SystemTime, state: &dyn ProviderState) {
    let now = SystemTime::now();
    if until <= now {
        return;
    }
    let reason =
        if until > now + Duration::from_secs(3600) { CooldownReason::QuotaDay } else { CooldownReason::RateLimited };
    let detail = "the provider's rate-limit headers report a spent budget".to_string();
    state.cool_down(&member.name, Cooldown { until, reason, detail }).await;
}

/// Applies a failure to the shared state; returns when the provider is usable again for this job.
async fn settle_failure(
    member: &Member,
    failure: &Failure,
    progress: &mut JobProgress,
    state: &dyn ProviderState,
) -> Option<SystemTime> {
    let now = SystemTime::now();
    if let Some((until, reason)) = cooldown_for(failure, now) {
        let detail = failure.message.clone();
        state.cool_down(&member.name, Cooldown { until, reason, detail }).await;
        return Some(until);
    }
    if failure.kind != FailureKind::Server {
        return None;
    }
    let consecutive = state.record_server_error(&member.name, &failure.message).await;
    if let Some(open_for) = circuit_cooldown(consecutive) {
        let until = failure.retry_at.unwrap_or(now + open_for).max(now + open_for);
        let detail = format!("{consecutive} server errors in a row: {}", failure.message);
        state.cool_down(&member.name, Cooldown { until, reason: CooldownReason::Circuit, detail }).await;
        return Some(until);
    }
    // A lone 5xx: this job backs off from this provider for a while, others are not affected.
    let failures = progress.backoff.get(&member.name).map_or(0, |&(_, n)| n) + 1;
    let backoff = Duration::from_secs(1 << failures.min(5)).min(Duration::from_secs(30));
    let not_before = failure.retry_at.unwrap_or(now + backoff).max(now + backoff);
    progress.backoff.insert(member.name.clone(), (not_before, failures));
    Some(not_before)
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
    format!("every provider of chain `{}` refused the request: {}", chain.name, reasons.join("; "))
}

#[cfg(test)]
mod tests;
