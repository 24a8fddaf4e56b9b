//! Shared provider state and the result ledger, behind traits the chain and the worker use.
//!
//! [`postgres::PgStore`] is the production store shared by every worker (contract §6);
//! [`memory::MemoryStore`] is the embedded one for `batch` without a database and for unit tests.

mod credits;
mod last_answer;
mod ledger_batcher;
pub mod memory;
pub mod postgres;
pub mod quota;
mod quota_batcher;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::{LimitConfig, QuotaPoolConfig};
use crate::routing::{CooldownReason, QuotaObservation};

/// A provider that must not be called before `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cooldown {
    pub until: SystemTime,
    pub reason: CooldownReason,
    /// The provider's own words (secret-free), for `status` and the attempt list.
    pub detail: String,
}

/// What [`ProviderState::claim_probe`] decided for one call.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeClaim {
    /// Call the provider: this caller holds its probe, or it has no circuit to probe.
    Call,
    /// Do not: skip the provider for this job until the cooldown ends. It concerns this call
    /// only (a store need not keep it): another worker's probe, or a cooldown its notice has not
    /// brought yet.
    Held(Cooldown),
}

impl ProbeClaim {
    pub fn is_call(&self) -> bool {
        matches!(self, ProbeClaim::Call)
    }
}

impl Cooldown {
    /// Whether `self` replaces `current` in the shared state. A cooldown only moves forward,
    /// except that a circuit reopened by a failed probe replaces the probe's hold
    /// ([`ProviderState::claim_probe`]): the new open time counts from the failure, not from
    /// the end of a hold sized for the slowest possible answer; and that the provider's own
    /// time, still to come, replaces our guess of a rate limit's end (a 429 that gave none),
    /// even a sooner one: contract §6 cools it "until the time the provider gave". A guessed
    /// daily reset gives way only to the provider's daily reset: a per-minute retry time says
    /// nothing of the day's quota. A time already past (an outage's cooldown shared late, a
    /// notice come late) never ends a running guess: "past" is at `now` where the caller keeps
    /// a clock of the shared state's (the database's view), and otherwise (`None`: a store with
    /// no clock of its own, fed by one caller in order) before the guess was made.
    pub fn replaces(&self, current: &Cooldown, now: Option<SystemTime>) -> bool {
        let reopened = self.reason == CooldownReason::Circuit && current.reason == CooldownReason::Circuit;
        let guessed_for = match current.reason {
            CooldownReason::RateLimitedEstimate if self.reason.is_providers_word() => {
                Some(crate::chain::DEFAULT_RATE_LIMIT_COOLDOWN)
            }
            CooldownReason::QuotaDayEstimate if self.reason == CooldownReason::QuotaDay => {
                Some(Duration::from_secs(24 * 3600))
            }
            _ => None,
        };
        let told = guessed_for.is_some_and(|length| {
            let guessed_at = current.until.checked_sub(length).unwrap_or(current.until);
            self.until > now.unwrap_or(guessed_at)
        });
        reopened || told || self.until > current.until
    }
}

/// What the chain asks before calling a provider.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub provider: &'a str,
    /// The provider's configured limits, held across all workers together.
    pub limits: &'a [LimitConfig],
    /// The shared pools (`[[quotas]]`) the provider also draws from: each held across every
    /// provider that names it, exactly like the provider's own limits.
    pub pools: &'a [QuotaPoolConfig],
    /// Estimated tokens of this request (prompt + completion budget).
    pub tokens: u64,
    /// The longest the request can be in flight (its timeout): a worker that dies mid-call
    /// releases its slot after this.
    pub flight: Duration,
}

/// The answer to "may I call this provider now?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Call it; hand the permit back through [`ProviderState::finish`] when the answer arrives.
    Granted(Permit),
    /// It is cooling down (a 429, a bad key, an open circuit…) until the given time.
    Cooling(Cooldown),
    /// A limit is spent until `until`.
    OverQuota { until: SystemTime, measure: QuotaMeasure },
    /// The request alone is larger than one of the provider's (or its pools') token limits.
    TooLarge,
}

pub use crate::routing::QuotaMeasure;

/// A granted call, counted in the provider's windows until it is finished.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Permit {
    /// The usage record, when the provider has limits.
    pub usage_id: Option<i64>,
    /// This process's own record of the call: the Postgres store keeps one for every call so
    /// that, while the database is away, it can hold its local share of each limit.
    pub local_id: Option<i64>,
    /// The provider whose windows count the call, when the shared store counts it: its answer
    /// is recorded in the same transaction as that provider's next asks.
    pub provider: Option<Arc<str>>,
    /// The tokens the shared windows counted the call with (its estimate): an answer that
    /// reports more raises their count, and is written before the job goes on.
    pub estimate: u64,
    /// Admitted from a credit this worker holds (`usage_id` is the credit's): its answer is
    /// the credit's to account for, not a call of its own in the windows.
    pub from_credit: bool,
    /// Admitted from a credit: how much of the credit had been taken when this call was
    /// admitted, inclusive of it (requests, tokens). Its answer's figures hold that much of the
    /// credit: the rest of it is unseen by them (`fallback_observe` of migration 0013).
    pub credit_sent: Option<(u64, u64)>,
}

impl Permit {
    /// A call that counts against no limit.
    pub const UNCOUNTED: Permit =
        Permit { usage_id: None, local_id: None, provider: None, estimate: 0, from_credit: false, credit_sent: None };
}

/// Provider state every worker sees the same way.
///
/// Methods do not fail: a store that cannot reach its database falls back to what this process
/// last knew (and logs it), because a worker must keep answering jobs through a database restart.
#[async_trait::async_trait]
pub trait ProviderState: Send + Sync {
    /// Whether the provider may be called now; if it may, the call is counted against its limits
    /// at once (so two workers cannot both take the last slot). Sees the shared truth: a
    /// cooldown another worker recorded is seen before this worker's next call (the Postgres
    /// store's listener delivers it to the local copy as it commits).
    async fn admit(&self, ask: Ask<'_>, now: SystemTime) -> Admission;

    /// The answer to a granted call arrived: its window occupancy ends now, and its token count
    /// is corrected from the provider's `usage` when known. A shared store may return before
    /// the answer is written, but never before every later admission of this process that
    /// counts in one of the call's windows is bound to see it (the job's result need not wait
    /// for the bookkeeping).
    /// `now` is the answer's instant (the engine's clock): a sliding window frees its slot one
    /// window after it, a calendar window at the first reset after it.
    async fn finish(&self, permit: Permit, tokens: Option<u64>, now: SystemTime);

    /// A granted call that was never sent (its job lost the provider's half-open probe to
    /// another): its slot comes back when that cannot leave a window counting less than the
    /// provider. The shared store takes it out of its windows when no rate-limit figure was
    /// counted in them since its admission (one may have read it as sent), and an open credit
    /// gives its place to another call; otherwise it counts as an answered call.
    async fn release(&self, permit: Permit);

    /// [`finish`](Self::finish), returning only once the answer is written where
    /// [`observe_quota`](Self::observe_quota) reads it: an observation of the provider's
    /// headers is counted against the call's answer (its token count, the end of its flight).
    async fn finish_written(&self, permit: Permit, tokens: Option<u64>, now: SystemTime) {
        self.finish(permit, tokens, now).await;
    }

    /// Cools `provider` down until `cooldown.until` for every worker. A cooldown only moves
    /// forward: an earlier `until` than the one stored changes nothing.
    async fn cool_down(&self, provider: &str, cooldown: Cooldown);

    /// A call succeeded: resets the 5xx run and closes the circuit (its cooldown is cleared, so
    /// every worker may call at once, not only when the probe's hold ends).
    async fn record_success(&self, provider: &str);

    /// The half-open probe (contract §6): when `provider`'s circuit cooldown has expired, exactly
    /// one caller across all workers takes the probe, which holds the cooldown `hold_for` past
    /// `now` (the call's timeout and a margin) so every other worker keeps skipping it while the
    /// probe is in flight. Call it after [`admit`](Self::admit) granted a call.
    ///
    /// [`ProbeClaim::Call`] when the caller just took the probe or the provider has no circuit
    /// to probe; [`ProbeClaim::Held`] with the cooldown to skip it for when someone else holds
    /// the probe, the circuit is still open, or another cooldown has replaced it.
    async fn claim_probe(&self, provider: &str, now: SystemTime, hold_for: Duration) -> ProbeClaim;

    /// A call failed with a 5xx: returns how many 5xx in a row all workers have now seen.
    ///
    /// Once the run has reached [`CIRCUIT_THRESHOLD`](crate::chain::CIRCUIT_THRESHOLD), only
    /// the 5xx of a half-open probe counts: any other is the late answer of a call sent before
    /// the circuit opened, news of the same outage. So the count grows by one per failed probe,
    /// and the open time doubles per probe, not per call that happened to be in flight.
    async fn record_server_error(&self, provider: &str, detail: &str) -> u32;

    /// An answer of `provider` failed a job's checks (contract §7) for `reason` (a
    /// [`RejectReason`](crate::chain::checks::RejectReason) label): counted for `status`, across
    /// all workers. Nothing else changes: a rejection cools nothing down. Best effort: a count
    /// the database cannot take now is dropped (`/metrics` still counts it).
    async fn record_rejected_output(&self, provider: &str, reason: &str);

    /// A successful answer of `ask.provider` carried what the provider counts of its budgets:
    /// the shared view of the matching limits (its own and its pools') is corrected from it
    /// (contract §6), within what the config declares. The default ignores it.
    ///
    /// `observed` is the permit of the call that answered: the provider's figures are as of
    /// when it received that call, so calls admitted after it are not in them
    /// ([`quota::observe`]). An observation whose reset has passed is ignored
    /// ([`quota::current`]).
    async fn observe_quota(&self, ask: Ask<'_>, observed: &Permit, seen: &[QuotaObservation], now: SystemTime) {
        let _ = (ask, observed, seen, now);
    }
}

/// What the ledger knows of a job when a delivery of it arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// How many times this job has been delivered without being answered, this delivery
    /// included: its first receipt and every redelivery (see [`Receipt`]).
    pub deliveries: u32,
    /// The stored result (a JSON text), when the job was answered before.
    pub result: Option<String>,
    /// The key was first used by a job with another fingerprint (a reused `message_id`): this
    /// delivery is not that job, and must not be given its result.
    pub other_job: bool,
}

/// What a receipt of a job tells the ledger's count of deliveries without an answer (the guard
/// against a job that kills every worker that takes it, `max_deliveries`).
///
/// Only the broker's `redelivered` flag says that a delivery of the same message went
/// unsettled before. A job published again (the same `message_id`, or the same body) and a
/// parked job coming back are new messages: counting them made a producer that retries, or a
/// backlog enqueued twice, dead-letter its own parked jobs as `internal_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// A message the broker delivers for the first time: counts only as the key's first receipt.
    Fresh,
    /// The broker delivered this message before, and it was not settled.
    Redelivered,
}

impl Receipt {
    pub fn of(redelivered: bool) -> Receipt {
        if redelivered { Receipt::Redelivered } else { Receipt::Fresh }
    }

    /// The deliveries a key's first receipt counts: a redelivery's first delivery went unseen
    /// (the worker died before the ledger heard of it).
    pub fn first_count(self) -> u32 {
        match self {
            Receipt::Fresh => 1,
            Receipt::Redelivered => 2,
        }
    }

    /// The deliveries a later receipt of a known key adds.
    pub fn later_count(self) -> u32 {
        match self {
            Receipt::Fresh => 0,
            Receipt::Redelivered => 1,
        }
    }
}

/// The idempotency ledger (contract §4): results by job key, each key bound to the fingerprint
/// of the job that first used it.
#[async_trait::async_trait]
pub trait ResultLedger: Send + Sync {
    /// Records a receipt of `key` by the job `fingerprint` and returns what is known of it: the
    /// key's first receipt counts one delivery (two when already a redelivery), a later one
    /// counts only when [`Receipt::Redelivered`]. A receipt by another job (`other_job`) counts
    /// nothing against the key's own job.
    async fn open(&self, key: &str, fingerprint: &str, receipt: Receipt) -> Result<LedgerEntry, StoreError>;

    /// Stores the job's result so a redelivery is answered without a provider call; a key that
    /// belongs to another job is left alone.
    async fn store(&self, key: &str, fingerprint: &str, result_json: &str) -> Result<(), StoreError>;

    /// Counts one internal failure (a panic, an unforeseen error) of the delivery `key` and
    /// returns how many it has had.
    async fn record_failure(&self, key: &str, reason: &str) -> Result<u32, StoreError>;
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The database refused or failed this one request.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database answers too slowly (every connection busy, a lock wait): this call fails,
    /// and several in a row count as unreachable.
    #[error("database busy: {0}")]
    Busy(String),
    /// The database cancelled the statement for its slowness (`statement_timeout`, a lock wait
    /// past `lock_timeout`): it answers, but is busy. Such calls count as an outage only in a
    /// run with no other answer between (see `PgStore`'s `cancelled`).
    #[error("database busy, statement cancelled: {0}")]
    Cancelled(String),
    /// The database cannot be reached (stopped, restarting, network gone): calls fail at once
    /// until it answers again, and the worker serves from its own view meanwhile.
    #[error("database unreachable: {0}")]
    Unreachable(String),
}
