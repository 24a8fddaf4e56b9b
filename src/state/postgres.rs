//! The Postgres store: the table is the truth, LISTEN/NOTIFY keeps a local copy warm.
//!
//! Every cooldown is written with `GREATEST` (it only moves forward) and announced with
//! `pg_notify` in the same statement, so it is visible to all workers at commit. Every worker's
//! listener copies each change into its local cache (and reloads the table after any reconnect,
//! since notifications sent meanwhile are lost), so admission reads the cache, not the row: a
//! provider without limits costs no query per call. While the listener is not live, admission
//! reads the row per call as before. A provider with limits (or pools) is admitted by `fallback_admit`,
//! which checks the row's cooldown under its lock anyway.
//!
//! Postgres is not in the way of a call (contract §4): the first state call that finds the
//! database unreachable marks it down, and from then on every state call answers at once from
//! this worker's own view ([`Outage`]): the cooldowns it knows, each limit enforced over its own
//! calls at `limit / workers last seen alive`, no ledger. A probe waits for the database to
//! answer again, then reloads the shared state and writes back the calls and cooldowns of the
//! outage.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgPool, Row};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::credits::{self, Credit, CreditBook, Ending};
use super::last_answer::{LastAnswer, OUTLASTED};
use super::ledger_batcher::{self, Request};
use super::memory::MemoryStore;
use super::quota_batcher::{self, AnswerWrite};
use super::{
    Admission, Ask, Cooldown, LedgerEntry, Permit, ProbeClaim, ProviderState, QuotaMeasure, Receipt, ResultLedger,
    StoreError,
};
use crate::chain::CIRCUIT_THRESHOLD;
use crate::chain::clock::later;
use crate::config::{LimitConfig, QuotaPoolConfig};
use crate::routing::{CooldownReason, QuotaObservation};

/// The embedded migrations (`migrations/`), applied under sqlx's advisory lock so that N workers
/// can start together.
///
/// A migration this version does not know (a newer version's, applied during its rollout) is
/// not a reason to refuse to start: from 0008 on, a migration keeps what older workers use (0008
/// keeps 0007's functions; one that cannot says so in docs/operations.md), and a worker that
/// restarts mid-rollout, or is rolled back, must still run.
pub static MIGRATOR: std::sync::LazyLock<sqlx::migrate::Migrator> = std::sync::LazyLock::new(|| {
    let mut migrator = sqlx::migrate!();
    migrator.set_ignore_missing(true);
    migrator
});

/// The NOTIFY channel for provider-state changes.
const CHANNEL: &str = "fallback_provider_state";
/// The NOTIFY channel a worker's first heartbeat announces it on: every other worker counts the
/// workers alive again at once, rather than at its own next heartbeat (up to
/// [`HEARTBEAT_INTERVAL`] later), so that a database outage right after a worker joined finds
/// every worker dividing each limit by the same count. Its payload means nothing (anyone may
/// NOTIFY it): the table is counted.
const WORKERS_CHANNEL: &str = "fallback_workers";
/// The workers whose heartbeat is younger than `$1` seconds ([`HEARTBEAT_STALE`]).
const COUNT_ALIVE: &str = "SELECT count(*) FROM worker_heartbeat WHERE seen_at > now() - make_interval(secs => $1)";

/// The longest one state call may take before the database counts as unreachable: a worker
/// must not hold jobs for seconds on a dead connection pool.
pub(super) const STATE_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long Postgres works on one statement of this worker before cancelling it
/// (`statement_timeout`, set on every connection of the pool). It sits below
/// [`STATE_CALL_TIMEOUT`] so that a statement held up by busy windows ends with the database's
/// own answer, which frees its locks and counts as a busy moment, before the worker gives up on
/// it, which counts towards taking the database for down: `lock_timeout` bounds each window's
/// wait, not the statement's, and a call in several busy windows adds them up (review round 5
/// of the release). Migrations, pruning and the write-back after an outage lift it.
pub(super) const STATEMENT_TIMEOUT: Duration = Duration::from_millis(1500);
const _: () = assert!(STATEMENT_TIMEOUT.as_millis() < STATE_CALL_TIMEOUT.as_millis());
/// The pauses before each new try of an answer the database did not take (see
/// [`PgStore::write_later`]): about 6 s in all, then its call is left to expire.
const ANSWER_RETRY_PAUSES: [Duration; 3] = [Duration::from_millis(250), Duration::from_secs(1), Duration::from_secs(4)];
/// Answers waiting to be written again at most: past that, more are dropped (their calls count
/// until they expire), so a database that refuses every answer cannot grow a worker's memory.
const MAX_RETRIED_ANSWERS: usize = 10_000;

/// Answers waiting to be written again, each with the tries it has had, and whether a task is
/// writing them (one at a time).
#[derive(Default)]
struct RetriedAnswers {
    answers: Vec<(AnswerWrite, u8)>,
    writing: bool,
}

/// How many calls written back while in flight are remembered for their answers (see
/// `Outage::written_back`): far more than a worker has in flight.
const MAX_WRITTEN_BACK_IN_FLIGHT: usize = 10_000;

/// The largest token count of one call a provider's answer may set (a trillion; far above any
/// limit): the windows' running totals add millions of these before a bigint overflows.
const MAX_REPORTED_TOKENS: u64 = 1 << 40;

/// How often an unreachable database is probed.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Cooldowns kept for sharing after an outage (the latest per provider is what matters).
const MAX_UNSHARED_COOLDOWNS: usize = 1000;

/// State calls in a row that may time out before the database counts as unreachable: one slow
/// query (a lock wait, a full pool) fails only itself.
const TIMEOUTS_BEFORE_DOWN: u32 = 3;
/// How long a run of cancelled state calls (at least [`TIMEOUTS_BEFORE_DOWN`], nothing answered
/// between, none more than this apart) lasts before the database counts as down: as long as
/// three calls given up in a row take at least, one after the other.
const CANCELLED_BEFORE_DOWN: Duration = Duration::from_secs(4);

/// A run of state calls jobs wait on that the database cancelled for their time, on
/// [`monotonic_ms`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CancelledRun {
    first_ms: u64,
    last_ms: u64,
    calls: u32,
}

impl CancelledRun {
    /// The run after one more cancelled call at `now_ms`, and how long it lasted when that call
    /// takes the database for down (the run then ends). A call more than
    /// [`CANCELLED_BEFORE_DOWN`] after the last one starts a new run.
    fn one_more(current: Option<CancelledRun>, now_ms: u64) -> (Option<CancelledRun>, Option<Duration>) {
        let gap_ms = u64::try_from(CANCELLED_BEFORE_DOWN.as_millis()).unwrap_or(u64::MAX);
        let mut run = match current {
            Some(run) if now_ms.saturating_sub(run.last_ms) <= gap_ms => run,
            _ => CancelledRun { first_ms: now_ms, last_ms: now_ms, calls: 0 },
        };
        run.calls = run.calls.saturating_add(1);
        run.last_ms = now_ms;
        let lasted = Duration::from_millis(now_ms.saturating_sub(run.first_ms));
        if run.calls >= TIMEOUTS_BEFORE_DOWN && lasted >= CANCELLED_BEFORE_DOWN {
            return (None, Some(lasted));
        }
        (Some(run), None)
    }
}

/// The LISTEN session pings itself this often through the pool ...
const LISTEN_PING: Duration = Duration::from_secs(1);
/// ... and its copy of the shared state is not trusted once a ping sent has not come back
/// within this long: a connection that died without a close (an idle cut by a NAT or a load
/// balancer) loses the notices sent meanwhile, and a view that no longer hears them must ask
/// the table. A ping that could not be sent (the pool busy) proves nothing either way: the
/// session has its own connection. A dead session is so found within a ping and an echo, less
/// than a circuit's shortest open time (5 s): a circuit that opened unheard is asked about
/// before it can end (its probe is claimed in the table).
const PING_ECHO: Duration = Duration::from_secs(1);
const PING_ECHO_MS: u64 = PING_ECHO.as_millis() as u64;
const _: () = assert!(LISTEN_PING.as_millis() + PING_ECHO.as_millis() < crate::chain::CIRCUIT_BASE.as_millis() / 2);
/// After this long without any notification the session is rebuilt.
const LISTEN_SILENCE: Duration = Duration::from_secs(15);
/// The channel of those pings: one per worker (`fallback_listener_ping_<random>`), so a worker's
/// ping wakes only its own session.
const PING_CHANNEL_PREFIX: &str = "fallback_listener_ping_";

/// A worker not seen for this long is no longer counted among the living (heartbeats come
/// every [`HEARTBEAT_INTERVAL`]).
const HEARTBEAT_STALE: Duration = Duration::from_secs(30);
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// This process's copy of the shared state (kept by the listener and by our own writes).
    cache: Arc<Mutex<HashMap<String, CachedProvider>>>,
    /// The batching task of admissions and finishes (one batch per provider in flight, asks
    /// that wait meanwhile go out together), started on first use.
    quota: Arc<OnceLock<mpsc::Sender<quota_batcher::Request>>>,
    /// Each provider's windows, prepared once (a batch shares them), with the limits and pools
    /// they were made from.
    windows: Arc<Mutex<HashMap<String, ProviderWindows>>>,
    /// The ledger's batching task, started on first use.
    ledger: Arc<OnceLock<mpsc::Sender<Request>>>,
    /// Whether the database is reachable, and this worker's own view for when it is not.
    outage: Arc<Outage>,
    /// Where the LISTEN session connects: its own connection, outside the pool (so a busy pool
    /// never starves it), and possibly another address (a session-mode PgBouncer, or Postgres
    /// itself, when the pool goes through a transaction-mode PgBouncer).
    listen_options: Arc<PgConnectOptions>,
    /// When a state call last gave up on a query still running (see [`Abandoned`]).
    abandoned: Arc<Abandoned>,
    /// When the database last answered a batch's statement: a call given up on in a batcher's
    /// queue counts as a timeout only when the batches have heard nothing past the statement
    /// bound ([`PgStore::gave_up_in_queue`]).
    last_answer: Arc<LastAnswer>,
    /// Answers of calls queued for recording, which their jobs do not wait for: a worker that
    /// stops waits for them ([`PgStore::answers_recorded`]).
    answers: TaskTracker,
    /// The credits this worker admits its calls from (see [`credits`]).
    credits: Arc<Mutex<CreditBook>>,
    /// One ask for a credit per provider at a time: the calls that wait meanwhile are admitted
    /// from it rather than each asking for one.
    credit_asks: Arc<Mutex<HashMap<Arc<str>, CreditGate>>>,
    /// One claim of a provider's probe at a time in this worker: a claim may wait up to a
    /// second for the provider's row, and the jobs behind it learn its outcome instead of each
    /// holding a connection of the pool on the same lock.
    probe_claims: Arc<Mutex<HashMap<String, ClaimGate>>>,
}

/// This worker's own view, kept at all times and used alone while the database is unreachable.
#[derive(Default)]
struct Outage {
    down: AtomicBool,
    /// The LISTEN session is up and has loaded the table since it (re)connected: the local copy
    /// of every cooldown is current, so a provider without limits is admitted without a query.
    listening: AtomicBool,
    /// When the session was last known current: loaded, or its own ping echoed (milliseconds
    /// on [`monotonic_ms`]).
    heard_ms: AtomicU64,
    /// When the oldest ping not echoed yet was sent, on the same clock (when the last one was
    /// sent once every ping has come back).
    ping_sent_ms: AtomicU64,
    /// How long the last ping echoed took to come back: what the view lags behind the table.
    echo_lag_ms: AtomicU64,
    /// State calls in a row that got no answer in time.
    timeouts_in_a_row: AtomicU32,
    /// The current run of state calls jobs wait on that the database cancelled for their time
    /// (see [`PgStore::cancelled`]), if any.
    cancelled_run: Mutex<Option<CancelledRun>>,
    /// Workers seen alive at the last heartbeat or count (at least 1): the divisor of the local
    /// share.
    workers_alive: AtomicU32,
    /// A count of the workers alive is asked for (a worker joined, or the LISTEN session
    /// reconnected); asks that come while one runs make one more.
    workers_count_wanted: tokio::sync::Notify,
    /// Every call this worker made recently, shared or not.
    own_calls: MemoryStore,
    /// Calls admitted locally during an outage, with the limits and pools they count against,
    /// to write back to the shared windows.
    unsynced_calls: Mutex<Vec<UnsyncedCall>>,
    /// Cooldowns learnt during an outage, to share once the database is back.
    unshared_cooldowns: Mutex<Vec<(String, Cooldown)>>,
    /// Cooldowns only this worker holds (the database refused them, or has not taken them
    /// yet), by provider: the table's word (a notice, a reload) never ends one early.
    held_cooldowns: Mutex<HashMap<String, Cooldown>>,
    /// Answers to calls the database admitted that arrived while it was unreachable.
    unwritten_answers: Mutex<Vec<AnswerWrite>>,
    /// Answers the database did not take when they came, waiting to be written again.
    retried_answers: Mutex<RetriedAnswers>,
    /// Calls admitted locally, written back while still in flight: their database id and
    /// provider, by local id, so that their answers correct the shared windows too.
    written_back: Mutex<HashMap<i64, WrittenBack>>,
    /// A task writes back what an outage left (see [`PgStore::write_back_what_is_left`]).
    writing_back_leftovers: AtomicBool,
    /// Told when that task ends.
    leftovers_written: tokio::sync::Notify,
}

impl Outage {
    /// Whether anything of an outage still waits for a write-back.
    fn has_unwritten(&self) -> bool {
        !self.unsynced_calls.lock().unwrap().is_empty()
            || !self.unwritten_answers.lock().unwrap().is_empty()
            || !self.unshared_cooldowns.lock().unwrap().is_empty()
    }
}

/// Held while a credit is asked for (see `PgStore::credit_asks`).
type CreditGate = Arc<tokio::sync::Mutex<()>>;

/// Held while a provider's probe is claimed (see `PgStore::probe_claims`), with the last
/// claim's outcome and when it was decided (on [`monotonic_ms`]).
type ClaimGate = Arc<tokio::sync::Mutex<Option<(ProbeClaim, u64)>>>;

/// A provider's prepared windows and the limits and pools they were made from.
struct ProviderWindows {
    limits: Vec<LimitConfig>,
    pools: Vec<QuotaPoolConfig>,
    windows: Arc<quota_batcher::Windows>,
}

/// A call admitted during an outage: its local record and what it counts against.
struct UnsyncedCall {
    local_id: i64,
    limits: Vec<LimitConfig>,
    pools: Vec<QuotaPoolConfig>,
    /// The database id its rows are written under, given at its first write-back and kept for
    /// every retry: a write-back that committed but whose answer was lost is not counted again.
    shared_id: Option<i64>,
}

#[derive(Debug, Clone, Default)]
struct CachedProvider {
    cooldown: Option<Cooldown>,
    /// Last seen run of 5xx; a success only needs a write when it is not zero.
    consecutive_server_errors: i32,
    /// The database's last "no room before" answer for this provider's limits.
    quota_blocked: Option<QuotaBlock>,
}

/// A refusal kept so that the jobs waiting for a provider do not all ask the database again
/// before it said there would be room.
#[derive(Debug, Clone, Copy)]
struct QuotaBlock {
    until: SystemTime,
    measure: QuotaMeasure,
    /// The tokens of the refused ask: a tokens window that had no room for it may have room for
    /// a smaller one, which the database decides (every ask takes the same one request).
    tokens: u64,
}

impl QuotaBlock {
    /// Whether this refusal stands for an ask of `tokens` too.
    fn stands_for(&self, tokens: u64) -> bool {
        self.measure == QuotaMeasure::Requests || tokens >= self.tokens
    }

    /// What is kept after the database decided an ask of `tokens` (the decisions of one batch
    /// arrive in any order). A refusal for lack of requests stands for every ask and replaces a
    /// token refusal; of two token refusals the smaller ask's stands for more asks; a grant ends
    /// what it disproves (a request slot was free; `tokens` fit) and nothing else: a refusal of
    /// a larger ask still stands, the grant made that window only fuller. Cooling, too large, or
    /// no limits say nothing of room: nothing is kept, as before.
    fn after(kept: Option<QuotaBlock>, decided: &Admission, tokens: u64, now: SystemTime) -> Option<QuotaBlock> {
        let kept = kept.filter(|k| k.until > now);
        match decided {
            Admission::OverQuota { until, measure: QuotaMeasure::Requests } => {
                Some(QuotaBlock { until: *until, measure: QuotaMeasure::Requests, tokens })
            }
            Admission::OverQuota { until, measure: QuotaMeasure::Tokens } => match kept {
                Some(k) if k.measure == QuotaMeasure::Requests || k.tokens < tokens => Some(k),
                _ => Some(QuotaBlock { until: *until, measure: QuotaMeasure::Tokens, tokens }),
            },
            Admission::Granted(_) => kept.filter(|k| k.measure == QuotaMeasure::Tokens && k.tokens > tokens),
            _ => None,
        }
    }
}

/// The notification payload, built by SQL's `json_build_object`.
#[derive(Deserialize)]
struct Notice {
    provider: String,
    /// Absent on notices that only carry the 5xx run.
    #[serde(default)]
    until_ms: Option<i64>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    detail: Option<String>,
    /// The provider's run of 5xx across workers, when it changed (so a success anywhere ends
    /// every worker's view of the run).
    #[serde(default)]
    server_errors: Option<i32>,
    /// The row as committed, sent by the table's trigger (migration 0015) after any change,
    /// the service's or an operator's: the copy is set to it exactly.
    #[serde(default)]
    table: bool,
}

impl PgStore {
    /// A lazily connecting pool: the worker starts (and keeps running) while Postgres is down.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<PgStore, sqlx::Error> {
        let options = PgConnectOptions::from_str(url)?.application_name("fallback-worker");
        let abandoned = Arc::new(Abandoned::default());
        let released = abandoned.clone();
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(STATE_CALL_TIMEOUT)
            .after_connect(|conn, _| Box::pin(checks_its_client(conn)))
            // Every connection handed out is pinged first, as sqlx's own test does, but with a
            // bound (sqlx's has none but the pool's acquire timeout): a terminated session is
            // replaced unseen. The batchers skip both pings between back-to-back batches
            // (`ledger_batcher::Leases`).
            .test_before_acquire(false)
            .before_acquire(|conn, _| Box::pin(answers_in_time(conn)))
            .after_release(move |conn, _| {
                let check = released.lately();
                Box::pin(async move { if check { answers_in_time(conn).await } else { Ok(true) } })
            })
            .connect_lazy_with(options);
        Ok(PgStore { abandoned, ..Self::from_pool(pool) })
    }

    pub fn from_pool(pool: PgPool) -> PgStore {
        let outage = Outage { workers_alive: AtomicU32::new(1), ..Outage::default() };
        let listen_options = Arc::new(pool.connect_options().as_ref().clone());
        PgStore {
            pool,
            cache: Arc::default(),
            quota: Arc::default(),
            windows: Arc::default(),
            ledger: Arc::default(),
            outage: Arc::new(outage),
            last_answer: Arc::default(),
            listen_options,
            abandoned: Arc::default(),
            answers: TaskTracker::new(),
            credits: Arc::default(),
            credit_asks: Arc::default(),
            probe_claims: Arc::default(),
        }
    }

    /// Waits until the answers queued so far are recorded (or given up on, within the bound of
    /// a state call): a stopping worker leaves no call counted with its estimate alone. The
    /// tracker stays closed, which only makes its `wait` end whenever it is empty: callers that
    /// wait at once never miss each other's wake-up.
    pub async fn answers_recorded(&self) {
        let endings = self.credits.lock().unwrap().close_all();
        self.end_credits(endings).await;
        self.answers.close();
        self.answers.wait().await;
        self.leftovers_written_or_given_up().await;
    }

    /// Waits, within the bound of a state call, for the write-back of what an outage left (an
    /// answer the database took only after a few tries): a stopping worker leaves it counted,
    /// but never waits on a database that keeps refusing it (review 33c).
    async fn leftovers_written_or_given_up(&self) {
        let written = async {
            loop {
                let told = self.outage.leftovers_written.notified();
                if !self.outage.writing_back_leftovers.load(Ordering::SeqCst) {
                    return;
                }
                told.await;
            }
        };
        if tokio::time::timeout(STATE_CALL_TIMEOUT, written).await.is_err() {
            tracing::warn!("stopping with calls of an outage not written back: they count until they expire");
        }
    }

    /// Whether the answer to a call of `provider` must be written before its job goes on (see
    /// [`ProviderState::finish`]): its windows include a pool's, which other providers' asks
    /// count in too, or the answer `raises` the call's tokens and a window counts tokens. One
    /// look at the windows its admissions prepared.
    fn written_first(&self, provider: &str, raises: bool) -> bool {
        let windows = self.windows.lock().unwrap();
        windows.get(provider).is_some_and(|w| {
            w.windows
                .specs
                .iter()
                .any(|s| s.key.kind == ScopeKind::Pool || (raises && s.key.measure == QuotaMeasure::Tokens))
        })
    }

    /// [`ProviderState::finish`], waiting until the answer is written (or given up on), for a
    /// caller that reads the windows next, such as a test; the chain does not wait.
    pub async fn finish_recorded(
        &self,
        permit: Permit,
        tokens: Option<u64>,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        if permit.from_credit {
            return match self.credit_answer(permit, tokens, now) {
                Some(ending) => self.write_ending(ending).await,
                None => Ok(()),
            };
        }
        match self.queue_answer(permit, tokens, now).await? {
            Some(answer) => self.written(answer).await,
            None => Ok(()),
        }
    }

    /// Waits for a queued answer's batch; an answer the database was unreachable for is kept
    /// for the write-back, one it was too slow for or refused (a lock wait past the statement's
    /// `lock_timeout`, a deadlock) is written again later.
    async fn written(&self, answer: QueuedAnswer) -> Result<(), StoreError> {
        // Nobody waits on an answer's write: the job went on when it was queued.
        let outcome = self.answer_of(Caller::Background, answer.reply, answer.deadline).await;
        match &outcome {
            Err(StoreError::Unreachable(_)) => self.keep_for_the_write_back([answer.write]),
            Err(StoreError::Busy(_) | StoreError::Cancelled(_) | StoreError::Unavailable(_)) => {
                self.write_later(answer.write)
            }
            _ => {}
        }
        outcome
    }

    /// An answer the database did not take (every connection held up, a window's row held
    /// elsewhere past the statement's `lock_timeout`) is written again from the background: a
    /// raised token count lost to a slow moment would leave the windows counting less than the
    /// provider. One task writes all the answers waiting, in one statement per try, so that a
    /// failed batch never becomes a statement per answer holding the pool's connections (review
    /// 4). Writing an answer twice is harmless: it sets its call's amount and only ever brings
    /// its leaving earlier, and a credit's writes are numbered.
    fn write_later(&self, write: AnswerWrite) {
        let mut waiting = self.outage.retried_answers.lock().unwrap();
        if waiting.answers.len() >= MAX_RETRIED_ANSWERS {
            return answer_not_recorded(&StoreError::Busy("too many answers wait to be written again".into()));
        }
        waiting.answers.push((write, 0));
        if !std::mem::replace(&mut waiting.writing, true) {
            let store = self.clone();
            self.answers.spawn(async move { store.write_answers_again().await });
        }
    }

    /// Writes the answers waiting in [`Outage::retried_answers`] until none is left: each gets
    /// [`ANSWER_RETRY_PAUSES`]`.len()` tries, after those pauses. One that meets the database
    /// unreachable goes to the write-back that ends the outage (the worker is marked down, as
    /// any state call that finds it gone does).
    async fn write_answers_again(self) {
        loop {
            let pause = {
                let mut waiting = self.outage.retried_answers.lock().unwrap();
                let Some(tries) = waiting.answers.iter().map(|(_, tries)| *tries).min() else {
                    waiting.writing = false;
                    return;
                };
                ANSWER_RETRY_PAUSES.get(usize::from(tries)).copied().unwrap_or(Duration::ZERO)
            };
            tokio::time::sleep(pause).await;
            let answers = std::mem::take(&mut self.outage.retried_answers.lock().unwrap().answers);
            let writes: Vec<AnswerWrite> = answers.iter().map(|(a, _)| *a).collect();
            // `guarded` answers at once while the database is known to be down, and marks it
            // down when this write finds it gone.
            match self.guarded_for(Caller::Background, self.write_answers(&writes, StatementBound::Kept)).await {
                Ok(()) => {}
                Err(StoreError::Unreachable(_)) => self.keep_for_the_write_back(writes),
                Err(_) => self.try_again(answers),
            }
        }
    }

    /// Puts `answers` back for another try, but those that had their last.
    fn try_again(&self, answers: Vec<(AnswerWrite, u8)>) {
        let mut waiting = self.outage.retried_answers.lock().unwrap();
        for (answer, tries) in answers {
            let tries = tries.saturating_add(1);
            if usize::from(tries) < ANSWER_RETRY_PAUSES.len() {
                waiting.answers.push((answer, tries));
            } else {
                answer_not_recorded(&StoreError::Busy("an answer the database did not take in four tries".into()));
            }
        }
    }

    /// Keeps answers the database could not be reached for until the outage's write-back. One
    /// that comes after the outage ended (its write failed just before the database came back,
    /// and the write-back has run) is written back at once: it would otherwise wait for the
    /// next outage.
    fn keep_for_the_write_back(&self, answers: impl IntoIterator<Item = AnswerWrite>) {
        self.outage.unwritten_answers.lock().unwrap().extend(answers);
        if !self.is_degraded() {
            let store = self.clone();
            tokio::spawn(async move { store.write_back_what_is_left().await });
        }
    }

    /// Counts the answer in this worker's own view and queues it for the shared windows, with
    /// the other answers and the asks that arrive meanwhile (one transaction): `None` when the
    /// shared windows do not count the call. The database stamps the answer with its own
    /// clock, as it does the admissions; `now` is for this worker's own view.
    async fn queue_answer(
        &self,
        permit: Permit,
        tokens: Option<u64>,
        now: SystemTime,
    ) -> Result<Option<QueuedAnswer>, StoreError> {
        self.count_in_own_view(&permit, tokens, now);
        let written_back = match (permit.usage_id, permit.local_id) {
            (None, Some(local_id)) => self.outage.written_back.lock().unwrap().remove(&local_id),
            _ => None,
        };
        let (call, provider) = match (permit.usage_id, permit.provider, written_back) {
            (Some(call), Some(provider), _) => (call, provider),
            (None, _, Some(shared)) => (shared.call, shared.provider),
            _ => return Ok(None),
        };
        // A provider's count is taken as it says, but never so large that the windows' totals
        // overflow: one absurd `usage.total_tokens` would otherwise fail its whole batch of
        // finishes (bigint out of range), and the other calls' raised counts in it with it.
        let tokens = tokens.map(|t| saturating_i64(t.min(MAX_REPORTED_TOKENS)));
        let name = provider.clone();
        let queued = self.queue_write(provider, AnswerWrite::of_call(call, tokens)).await?;
        // A count corrected from the provider's `usage` may make room that a kept token
        // refusal denies (an estimate larger than the use): the next ask goes to the database,
        // behind this answer. An answer frees no request slot: a request refusal stands.
        if tokens.is_some()
            && let Some(cached) = self.cache.lock().unwrap().get_mut(&*name)
        {
            cached.quota_blocked = cached.quota_blocked.filter(|b| b.measure == QuotaMeasure::Requests);
        }
        Ok(Some(queued))
    }

    /// [`ProviderState::release`]. A call from an open credit gives its place back in the
    /// credit, which later counts only the calls it sent. A call the shared windows admitted
    /// goes to `fallback_release_calls` (migration 0016): when no rate-limit figure was counted
    /// in its windows since its admission, its rows count nothing from now on; otherwise a
    /// figure may have read it as sent, and it ends as an answered call (taking it out then
    /// could leave a window below the provider). Any other call is answered as one that
    /// reported no count: a closed credit has written it among its calls, and a call admitted
    /// from this worker's own share during an outage goes through the write-back as an answered
    /// call. The kept refusal stays: it may be all that stops an outage admission past a full
    /// shared window.
    async fn release_call(&self, permit: Permit, now: SystemTime) {
        if permit.from_credit {
            let released = match (&permit.provider, permit.usage_id) {
                (Some(provider), Some(call)) => self.credits.lock().unwrap().release(provider, call, permit.estimate),
                _ => false,
            };
            if released {
                self.forget_own_call(&permit);
                return;
            }
            return self.finish(permit, None, now).await;
        }
        let (Some(call), Some(_)) = (permit.usage_id, &permit.provider) else {
            return self.finish(permit, None, now).await;
        };
        let store = self.clone();
        self.answers.spawn(async move {
            let released =
                sqlx::query("SELECT fallback_release_calls($1)").bind([call].as_slice()).execute(&store.pool);
            match store.guarded_for(Caller::Background, released).await {
                Ok(_) => store.forget_own_call(&permit),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot release a call that was never sent; it is answered instead");
                    store.finish(permit, None, now).await;
                }
            }
        });
    }

    /// Takes a call that was never sent out of this worker's own record of its calls.
    fn forget_own_call(&self, permit: &Permit) {
        if let Some(local_id) = permit.local_id {
            self.outage.own_calls.forget(local_id);
        }
    }

    /// Queues `write` for `provider`'s windows (kept for the write-back when the database
    /// is unreachable).
    async fn queue_write(&self, provider: Arc<str>, write: AnswerWrite) -> Result<QueuedAnswer, StoreError> {
        let deadline = tokio::time::Instant::now() + STATE_CALL_TIMEOUT;
        let request = |reply| quota_batcher::Request::Finish(quota_batcher::Answer { provider, write, reply });
        let reply = match self.enqueue(self.quota(), request, deadline).await {
            Ok(reply) => reply,
            Err(e) => {
                if let StoreError::Unreachable(_) = e {
                    self.keep_for_the_write_back([write]);
                }
                return Err(e);
            }
        };
        Ok(QueuedAnswer { reply, deadline, write })
    }

    /// Counts the answer in this worker's own record of its calls (the local share while the
    /// database is away).
    fn count_in_own_view(&self, permit: &Permit, tokens: Option<u64>, now: SystemTime) {
        if let Some(local_id) = permit.local_id {
            self.outage.own_calls.finish_at(Permit { usage_id: Some(local_id), ..Permit::UNCOUNTED }, tokens, now);
        }
    }

    /// Counts the answer to a call admitted from a credit in this worker's own view and in the
    /// credit: what the shared windows must be told of the credit now, if anything.
    fn credit_answer(&self, permit: Permit, tokens: Option<u64>, now: SystemTime) -> Option<Ending> {
        self.count_in_own_view(&permit, tokens, now);
        let (provider, call) = (permit.provider?, permit.usage_id?);
        let tokens = tokens.map(|t| t.min(MAX_REPORTED_TOKENS));
        self.credits.lock().unwrap().answer(&provider, call, permit.estimate, tokens)
    }

    /// Writes what a credit's windows must count from now on, and waits for it.
    async fn write_ending(&self, ending: Ending) -> Result<(), StoreError> {
        let answer = AnswerWrite {
            call: ending.call,
            tokens: Some(saturating_i64(ending.tokens)),
            requests: Some(saturating_i64(ending.requests)),
            ended: ending.ended,
            seq: Some(saturating_i64(ending.seq)),
        };
        let queued = self.queue_write(ending.provider, answer).await?;
        self.written(queued).await
    }

    /// [`end_credit`](Self::end_credit) for each of `endings`.
    async fn end_credits(&self, endings: impl IntoIterator<Item = Ending>) {
        for ending in endings {
            self.end_credit(ending).await;
        }
    }

    /// A credit's write: before the caller goes on when it raises the count (another worker's
    /// next ask must count it), else on its own (until it lands the windows count more than
    /// the credit's calls use, never less).
    async fn end_credit(&self, ending: Ending) {
        if ending.raises {
            if let Err(e) = self.write_ending(ending).await {
                answer_not_recorded(&e);
            }
            return;
        }
        let store = self.clone();
        self.answers.spawn(async move {
            if let Err(e) = store.write_ending(ending).await {
                answer_not_recorded(&e);
            }
        });
    }

    /// Whether the LISTEN session is up, has loaded the shared state since it (re)connected and
    /// has not missed the echo of a ping it sent (within [`PING_ECHO`]): this worker then learns every
    /// cooldown as it is written.
    pub fn is_listening(&self) -> bool {
        let sent = self.outage.ping_sent_ms.load(Ordering::SeqCst);
        let heard = self.outage.heard_ms.load(Ordering::SeqCst);
        let echo_missed = sent > heard && monotonic_ms().saturating_sub(sent) > PING_ECHO_MS;
        let lagging = self.outage.echo_lag_ms.load(Ordering::SeqCst) > PING_ECHO_MS;
        !echo_missed && !lagging && self.outage.listening.load(Ordering::SeqCst)
    }

    /// The LISTEN session is current as of now (it has just loaded the table, or heard its own
    /// ping come back).
    fn heard(&self) {
        self.outage.heard_ms.store(monotonic_ms(), Ordering::SeqCst);
    }

    /// The LISTEN session received a NOTIFY on its ping channel. Its own pings carry the
    /// session's `nonce` and when they were sent (`<nonce>:<ms>`, milliseconds on
    /// [`monotonic_ms`]): every notice committed before that has arrived, so the view lags the
    /// table by the ping's trip. Anything else on the channel (anyone may NOTIFY it) proves
    /// nothing and is ignored; other notices prove nothing either, as they may come late.
    fn echoed(&self, payload: &str, nonce: &str) {
        let Some((from, sent)) = payload.split_once(':') else { return };
        let Ok(sent) = sent.parse::<u64>() else { return };
        let now = monotonic_ms();
        if from != nonce || sent > now {
            return;
        }
        self.outage.echo_lag_ms.store(now - sent, Ordering::SeqCst);
        self.heard();
    }

    /// Sends the LISTEN session to `url` instead of the pool's address.
    pub fn with_listen_url(mut self, url: &str) -> Result<PgStore, sqlx::Error> {
        let options = PgConnectOptions::from_str(url)?.application_name("fallback-worker listener");
        self.listen_options = Arc::new(options);
        Ok(self)
    }

    /// Whether state calls are currently served from this worker's own view.
    pub fn is_degraded(&self) -> bool {
        self.outage.down.load(Ordering::Relaxed)
    }

    /// Runs one state call against the database, unless it is known to be unreachable (then it
    /// fails at once). A call that finds it unreachable, or takes longer than
    /// [`STATE_CALL_TIMEOUT`], marks it down and starts the probe that brings it back.
    async fn guarded<T>(&self, call: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, StoreError> {
        self.guarded_for(Caller::Job, call).await
    }

    /// [`Self::guarded`], for `caller`: a call no job waits on that the database cancels for its
    /// slowness counts towards nothing (see [`Self::cancelled`]).
    async fn guarded_for<T>(
        &self,
        caller: Caller,
        call: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        if self.is_degraded() {
            return Err(StoreError::Unreachable("the database is down".into()));
        }
        let watch = self.abandoned.watch();
        let answer = tokio::time::timeout(STATE_CALL_TIMEOUT, call).await;
        watch.finished(answer.is_ok());
        if answer.is_ok() {
            self.outage.timeouts_in_a_row.store(0, Ordering::Relaxed);
        }
        match answer {
            Ok(Ok(value)) => {
                self.not_cancelled();
                Ok(value)
            }
            // Every connection busy (lock waits, a slow write-back) is slowness, not an outage.
            Ok(Err(sqlx::Error::PoolTimedOut)) => Err(self.timed_out("no pool connection free in time")),
            Ok(Err(e)) if is_transient(&e) => {
                self.went_down(&e.to_string());
                Err(StoreError::Unreachable(e.to_string()))
            }
            Ok(Err(e)) if is_slow(&e) => Err(self.cancelled(caller, is_statement_timeout(&e), e.to_string())),
            Ok(Err(e)) => {
                self.not_cancelled();
                Err(StoreError::Database(e))
            }
            Err(_) => Err(self.timed_out(&format!("no answer within {STATE_CALL_TIMEOUT:?}"))),
        }
    }

    /// A state call that got no answer in time: that call fails; several in a row mean the
    /// database is unreachable (one slow query must not switch the worker's mode).
    fn timed_out(&self, what: &str) -> StoreError {
        if self.outage.timeouts_in_a_row.fetch_add(1, Ordering::Relaxed) + 1 < TIMEOUTS_BEFORE_DOWN {
            return StoreError::Busy(what.to_string());
        }
        self.went_down(what);
        StoreError::Unreachable(what.to_string())
    }

    /// A state call the database gave up on for its slowness ([`is_slow`]). The database
    /// answered: it is busy, not away, and one such call never counts as a timeout (a call in
    /// several busy windows, each lock waited for within `lock_timeout`, is cancelled so).
    ///
    /// A run of statements cancelled for their time (`timed_out`: [`is_statement_timeout`]) that
    /// jobs wait on (`caller`), nothing answered between, [`TIMEOUTS_BEFORE_DOWN`] calls over
    /// [`CANCELLED_BEFORE_DOWN`] at least and none further apart, does take it for down: a
    /// database too slow for any call (every admission cancelled) would otherwise hold every
    /// limited call back for as long as it stays so, where the worker's own view serves them. A
    /// lock wait past `lock_timeout` is contention between workers, never counted: it must not
    /// put a loaded fleet on local shares.
    fn cancelled(&self, caller: Caller, timed_out: bool, what: String) -> StoreError {
        if matches!(caller, Caller::Background) || !timed_out {
            return StoreError::Cancelled(what);
        }
        let lasted = {
            let mut current = self.outage.cancelled_run.lock().unwrap();
            let (run, tripped) = CancelledRun::one_more(*current, monotonic_ms());
            *current = run;
            tripped
        };
        let Some(lasted) = lasted else { return StoreError::Cancelled(what) };
        self.went_down(&format!("every state call for {lasted:?} was cancelled as too slow: {what}"));
        StoreError::Unreachable(what)
    }

    /// A state call got an answer other than a cancellation: a run of cancelled calls ends.
    fn not_cancelled(&self) {
        *self.outage.cancelled_run.lock().unwrap() = None;
    }

    /// Marks the database down (once) and starts probing for its return.
    fn went_down(&self, why: &str) {
        if self.outage.down.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::warn!(
            error = why,
            "database unreachable: serving jobs from this worker's own view (cached cooldowns, a local share of every limit, no ledger)"
        );
        crate::observability::record_database_down(true);
        let store = self.clone();
        tokio::spawn(async move { store.recover().await });
    }

    /// Waits for the database to answer, then reloads the shared state, writes back what this
    /// worker did meanwhile, and leaves degraded mode.
    async fn recover(self) {
        loop {
            tokio::time::sleep(PROBE_INTERVAL).await;
            let ping = sqlx::query("SELECT 1").execute(&self.pool);
            if !matches!(tokio::time::timeout(STATE_CALL_TIMEOUT, ping).await, Ok(Ok(_))) {
                continue;
            }
            match self.write_back().await {
                Ok((calls, cooldowns)) => {
                    // A run of cancellations, or of timeouts, from before the outage does not
                    // carry over it: one call given up on after it is one, not the fourth.
                    self.not_cancelled();
                    self.outage.timeouts_in_a_row.store(0, Ordering::Relaxed);
                    self.outage.down.store(false, Ordering::SeqCst);
                    crate::observability::record_database_down(false);
                    // What was admitted or learnt between the write-back and now.
                    self.write_back_what_is_left().await;
                    tracing::info!(
                        calls,
                        cooldowns,
                        "database back: shared state reloaded, the outage's calls written back"
                    );
                    return;
                }
                Err(e) => tracing::debug!(error = %e, "database answers but cannot take the write-back yet"),
            }
        }
    }

    /// Writes back what is left of an outage once the worker has left degraded mode (the calls
    /// admitted while the first write-back ran, answers kept meanwhile), until it lands: a call
    /// left unwritten would count in no shared window until the next outage, which may never
    /// come (review 33). A new outage takes over: its own write-back writes them. One task at a
    /// time does it (more would only contend for the same windows); what arrives as it ends is
    /// written by it all the same. Nothing waits for it: a stopping worker does not wait on a
    /// database that keeps refusing the write (review 33b).
    async fn write_back_what_is_left(&self) {
        loop {
            if self.outage.writing_back_leftovers.swap(true, Ordering::SeqCst) {
                return;
            }
            self.write_back_until_written().await;
            self.outage.writing_back_leftovers.store(false, Ordering::SeqCst);
            self.outage.leftovers_written.notify_waiters();
            if self.is_degraded() || !self.outage.has_unwritten() {
                return;
            }
        }
    }

    async fn write_back_until_written(&self) {
        let mut tries = 0u32;
        while !self.is_degraded() && self.outage.has_unwritten() {
            match self.write_back().await {
                Ok(_) => return,
                Err(e) if tries == 0 => {
                    tracing::warn!(error = %e, "cannot write back the last calls of the outage yet; trying again")
                }
                Err(e) => tracing::debug!(error = %e, "cannot write back the last calls of the outage yet"),
            }
            tries = tries.saturating_add(1);
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// Shares the cooldowns and calls of the outage, then reloads every provider's row.
    async fn write_back(&self) -> Result<(usize, usize), sqlx::Error> {
        let cooldowns = std::mem::take(&mut *self.outage.unshared_cooldowns.lock().unwrap());
        for (provider, cooldown) in &cooldowns {
            if let Err(e) = self.share_cooldown(provider, cooldown).await {
                self.outage.unshared_cooldowns.lock().unwrap().extend(cooldowns.iter().cloned());
                return Err(e);
            }
            self.cooldown_shared(provider, cooldown);
        }
        let mut unsynced = std::mem::take(&mut *self.outage.unsynced_calls.lock().unwrap());
        let answers = std::mem::take(&mut *self.outage.unwritten_answers.lock().unwrap());
        if let Err(e) = self.write_back_calls_and_answers(&mut unsynced, &answers).await {
            self.outage.unsynced_calls.lock().unwrap().extend(unsynced);
            self.outage.unwritten_answers.lock().unwrap().extend(answers);
            return Err(e);
        }
        self.reload().await?;
        Ok((unsynced.len(), cooldowns.len()))
    }

    /// Writes `answers` in one statement: those that arrived while the database was unreachable
    /// (the write-back, [`StatementBound::Lifted`]), or those it did not take when they came
    /// (their retry, a state call like any other: [`StatementBound::Kept`]).
    async fn write_answers(&self, answers: &[AnswerWrite], bound: StatementBound) -> Result<(), sqlx::Error> {
        if answers.is_empty() {
            return Ok(());
        }
        let statement = finish_batch(answers);
        match bound {
            StatementBound::Kept => {
                statement.execute(&self.pool).await?;
            }
            StatementBound::Lifted => {
                let mut tx = self.begin_unbounded().await?;
                statement.execute(&mut *tx).await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Counts calls made during an outage in the shared windows (their provider's and their
    /// pools') of the limits they were admitted under, as if the database had admitted them,
    /// and writes the answers the database could not take meanwhile (credits that ended among
    /// them), in **one** transaction: a write-back that fails part-way counts nothing and its
    /// retry counts each call once, and no reader ever sees the outage's calls beside a credit
    /// still counted whole (the calls went in first, then the answers, and a reader between
    /// them saw both: more than was sent). Every window either touches is locked (created when
    /// missing) first, in the canonical order, as every admission and observation locks them.
    /// Each call keeps the database id of its first try, and a row already written under it is
    /// not written again: a retry after a commit whose answer was lost counts nothing twice.
    async fn write_back_calls_and_answers(
        &self,
        unsynced: &mut [UnsyncedCall],
        answers: &[AnswerWrite],
    ) -> Result<(), sqlx::Error> {
        if unsynced.is_empty() && answers.is_empty() {
            return Ok(());
        }
        let WrittenBackPlan { windows, in_flight, answered_again } = self.plan_written_back_calls(unsynced).await?;
        let answers: Vec<AnswerWrite> = answers.iter().copied().chain(answered_again).collect();
        let answers = answers.as_slice();
        let mut tx = self.begin_unbounded().await?;
        create_and_lock_windows(&mut tx, windows.keys(), answers).await?;
        for (key, (call_ids, amounts, leaves)) in &windows {
            insert_written_back_calls(&mut tx, key, call_ids, amounts, leaves).await?;
        }
        if !answers.is_empty() {
            finish_batch(answers).execute(&mut *tx).await?;
        }
        // `fallback_finish_batch` lets a commit that raises nothing skip its WAL flush: the
        // calls just counted must not be lost to a crash, so this commit waits for it.
        sqlx::query("SELECT set_config('synchronous_commit', 'on', true)").execute(&mut *tx).await?;
        tx.commit().await?;
        self.remember_written_back_in_flight(in_flight).await;
        Ok(())
    }

    /// The rows the outage's calls add to each window, under one database id per call (shared
    /// by its rows as an admission's are: an answer that comes after the write-back finds them
    /// through it; given once, see [`UnsyncedCall::shared_id`]), and the calls still in flight
    /// among them.
    async fn plan_written_back_calls(&self, unsynced: &mut [UnsyncedCall]) -> Result<WrittenBackPlan, sqlx::Error> {
        let mut plan = WrittenBackPlan::default();
        if unsynced.is_empty() {
            return Ok(plan);
        }
        let ids: Vec<i64> = unsynced.iter().map(|c| c.local_id).collect();
        let calls: HashMap<i64, (String, super::quota::Usage)> =
            self.outage.own_calls.calls(&ids).into_iter().map(|(p, u)| (u.id, (p, u))).collect();
        // Calls numbered by an earlier try may have been written by it (its commit's answer
        // lost): their rows are not written again, so an answer that came since is written
        // over them.
        let tried_before: HashSet<i64> =
            unsynced.iter().filter(|c| c.shared_id.is_some()).map(|c| c.local_id).collect();
        let unnumbered = unsynced.iter().filter(|c| c.shared_id.is_none()).count();
        if unnumbered > 0 {
            let shared_ids: Vec<i64> =
                sqlx::query_scalar("SELECT nextval('quota_call_id') FROM generate_series(1, $1)")
                    .bind(i32::try_from(unnumbered).unwrap_or(i32::MAX))
                    .fetch_all(&self.pool)
                    .await?;
            let unnumbered = unsynced.iter_mut().filter(|c| c.shared_id.is_none());
            for (call, shared_id) in unnumbered.zip(shared_ids) {
                call.shared_id = Some(shared_id);
            }
        }
        for call in unsynced.iter() {
            let (Some((provider, usage)), Some(shared_id)) = (calls.get(&call.local_id), call.shared_id) else {
                continue;
            };
            if usage.done.is_none() {
                let written =
                    WrittenBack { call: shared_id, provider: Arc::from(provider.as_str()), estimate: usage.tokens };
                plan.in_flight.push((call.local_id, written));
            } else if tried_before.contains(&call.local_id) {
                let tokens = Some(saturating_i64(usage.tokens.min(MAX_REPORTED_TOKENS)));
                plan.answered_again.push(AnswerWrite::of_call(shared_id, tokens));
            }
            let end = usage.done.unwrap_or(usage.expires);
            for spec in windows_of(provider, &call.limits, &call.pools) {
                // A provider's count is taken as it says, but never so large that the window's
                // total overflows (as on the answer paths): one absurd `usage.total_tokens`
                // would fail every write-back, and keep the worker degraded for good.
                let amount = match spec.key.measure {
                    QuotaMeasure::Requests => 1,
                    QuotaMeasure::Tokens => usage.tokens.min(MAX_REPORTED_TOKENS),
                };
                let leaves = match &spec.reset {
                    Some(reset) => reset.next_after(end),
                    None => end.checked_add(spec.key.window).unwrap_or(end),
                };
                let entry = plan.windows.entry(spec.key).or_default();
                entry.0.push(shared_id);
                entry.1.push(saturating_i64(amount));
                entry.2.push(epoch_ms(leaves) as f64);
            }
        }
        Ok(plan)
    }

    /// Calls written back while still in flight: their answers, when they come, are written
    /// under the id the write-back gave them. Answers that never come (their worker's job
    /// ended otherwise) leave their entry behind: at most the calls in flight at each
    /// write-back, dropped past a bound.
    async fn remember_written_back_in_flight(&self, in_flight: Vec<(i64, WrittenBack)>) {
        let local_ids: Vec<i64> = in_flight.iter().map(|(local_id, _)| *local_id).collect();
        {
            let mut written_back = self.outage.written_back.lock().unwrap();
            if written_back.len() > MAX_WRITTEN_BACK_IN_FLIGHT {
                written_back.clear();
            }
            written_back.extend(in_flight);
        }
        // An answer that came while the calls were being written found no entry yet: whoever
        // takes the entry out writes the answer, so each is written once.
        let answered: Vec<AnswerWrite> = self
            .outage
            .own_calls
            .calls(&local_ids)
            .into_iter()
            .filter(|(_, usage)| usage.done.is_some())
            .filter_map(|(_, usage)| {
                let written = self.outage.written_back.lock().unwrap().remove(&usage.id)?;
                let tokens = Some(saturating_i64(usage.tokens.min(MAX_REPORTED_TOKENS)));
                Some(AnswerWrite::of_call(written.call, tokens))
            })
            .collect();
        // The calls are written: failing now must not write them again (the write-back would
        // be retried whole). Their answers wait for the next write-back instead.
        if let Err(e) = self.write_answers(&answered, StatementBound::Lifted).await {
            tracing::debug!(error = %e, "cannot write the answers of calls written back yet; kept for later");
            self.keep_for_the_write_back(answered);
        }
    }

    /// Records this worker as alive and learns how many are (the divisor of the local share of
    /// every limit while the database is away). Called by housekeeping.
    pub async fn heartbeat(&self, worker: &str) -> Result<u32, StoreError> {
        let stale = HEARTBEAT_STALE.as_secs_f64();
        let alive = self
            .guarded_for(Caller::Background, async {
                // A worker not seen alive until now (a new one, or back after a pause) tells
                // the others (`WORKERS_CHANNEL`), in the statement that records it.
                sqlx::query(
                    "WITH known AS (SELECT seen_at > now() - make_interval(secs => $2) AS alive \
                                    FROM worker_heartbeat WHERE worker = $1), \
                          beat AS (INSERT INTO worker_heartbeat (worker, seen_at) VALUES ($1, now()) \
                                   ON CONFLICT (worker) DO UPDATE SET seen_at = now()) \
                     SELECT pg_notify($3, '') WHERE NOT coalesce((SELECT alive FROM known), false)",
                )
                .bind(worker)
                .bind(stale)
                .bind(WORKERS_CHANNEL)
                .execute(&self.pool)
                .await?;
                sqlx::query("DELETE FROM worker_heartbeat WHERE seen_at < now() - interval '1 day'")
                    .execute(&self.pool)
                    .await?;
                sqlx::query_scalar::<_, i64>(COUNT_ALIVE).bind(stale).fetch_one(&self.pool).await
            })
            .await?;
        let alive = u32::try_from(alive).unwrap_or(u32::MAX).max(1);
        self.outage.workers_alive.store(alive, Ordering::Relaxed);
        self.share_pending_cooldowns().await;
        Ok(alive)
    }

    /// Shares the cooldowns a slow database could not take when they were learnt.
    async fn share_pending_cooldowns(&self) {
        let pending = std::mem::take(&mut *self.outage.unshared_cooldowns.lock().unwrap());
        for (provider, cooldown) in pending {
            if cooldown.until > SystemTime::now() {
                self.cool_down(&provider, cooldown).await;
            }
        }
    }

    /// The secret that authenticates parked jobs' state headers: created by the first worker,
    /// read by every other.
    pub async fn shared_secret(&self) -> Result<Vec<u8>, sqlx::Error> {
        let fresh: Vec<u8> = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()].iter().flat_map(|u| *u.as_bytes()).collect();
        sqlx::query("INSERT INTO service_secret (id, secret) VALUES (1, $1) ON CONFLICT (id) DO NOTHING")
            .bind(&fresh)
            .execute(&self.pool)
            .await?;
        sqlx::query_scalar("SELECT secret FROM service_secret WHERE id = 1").fetch_one(&self.pool).await
    }

    /// A call admitted by this worker alone while the database is away: every limit (its own
    /// and its pools') at `limit / workers last seen alive`, counted over this worker's own
    /// recent calls.
    async fn admit_locally(&self, ask: Ask<'_>, now: SystemTime) -> Admission {
        let workers = u64::from(self.workers_alive());
        let share_of = |limits: &[LimitConfig]| -> Vec<LimitConfig> {
            limits
                .iter()
                .map(|l| LimitConfig {
                    requests: l.requests.map(|n| n / workers),
                    tokens: l.tokens.map(|n| n / workers),
                    per: l.per,
                    resets: l.resets.clone(),
                })
                .collect()
        };
        let share = share_of(ask.limits);
        let pool_shares: Vec<QuotaPoolConfig> =
            ask.pools.iter().map(|p| QuotaPoolConfig { name: p.name.clone(), limits: share_of(&p.limits) }).collect();
        let local_ask = Ask { limits: &share, pools: &pool_shares, ..ask };
        match self.outage.own_calls.admit(local_ask, now).await {
            // Larger than the local share, not than the limit: wait for the database instead.
            Admission::TooLarge if !too_large_for(ask, ask.tokens) => {
                Admission::OverQuota { until: ask_again_soon(now), measure: QuotaMeasure::Tokens }
            }
            // The local share is this worker's guess, not the provider's word: the job asks again
            // soon (the database may be back) rather than wait out a whole window or fail.
            Admission::OverQuota { until, measure } => {
                Admission::OverQuota { until: until.min(ask_again_soon(now)), measure }
            }
            Admission::Granted(local) => {
                let local_id = local.usage_id;
                if let Some(id) = local_id {
                    let call = UnsyncedCall {
                        local_id: id,
                        limits: ask.limits.to_vec(),
                        pools: ask.pools.to_vec(),
                        shared_id: None,
                    };
                    self.outage.unsynced_calls.lock().unwrap().push(call);
                }
                Admission::Granted(Permit { local_id, ..Permit::UNCOUNTED })
            }
            other => other,
        }
    }

    fn ledger(&self) -> &mpsc::Sender<Request> {
        self.ledger.get_or_init(|| ledger_batcher::spawn(self.pool.clone(), self.last_answer.clone()))
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the database the pool points at (a fresh server has none called `fallback`).
    pub async fn create_database(&self) -> Result<(), sqlx::Error> {
        use sqlx::Connection as _;
        let options = self.pool.connect_options();
        let name = options.get_database().unwrap_or("fallback").to_string();
        let mut admin = sqlx::PgConnection::connect_with(&options.as_ref().clone().database("postgres")).await?;
        let create = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match sqlx::raw_sql(sqlx::AssertSqlSafe(create)).execute(&mut admin).await {
            Ok(_) => tracing::info!(database = %name, "created the database"),
            // 42P04: another worker created it a moment ago.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// A transaction whose statements run as long as they need (see [`STATEMENT_TIMEOUT`]);
    /// its connection's own bound is back after it.
    async fn begin_unbounded(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT set_config('statement_timeout', '0', true)").execute(&mut *tx).await?;
        Ok(tx)
    }

    /// Applies the migrations the database lacks, on a connection of its own without the
    /// state calls' [`STATEMENT_TIMEOUT`] (a migration of a large table, or the wait for another
    /// worker's migration, takes as long as it takes), closed afterwards.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        let unbounded = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(STATE_CALL_TIMEOUT)
            // No bound at all, not even one the operator set for the worker's statements.
            .after_connect(|conn, _| {
                Box::pin(async move { sqlx::Executor::execute(conn, "SET statement_timeout = 0").await.map(|_| ()) })
            })
            .connect_with(self.pool.connect_options().as_ref().clone())
            .await?;
        let migrated = MIGRATOR.run(&unbounded).await;
        unbounded.close().await;
        migrated
    }

    /// Loads every provider row into the local copy.
    pub async fn reload(&self) -> Result<(), sqlx::Error> {
        let rows = sqlx::query(
            "SELECT provider, fallback_epoch_ms(cooldown_until) AS until_ms, \
             cooldown_reason, cooldown_detail, consecutive_server_errors FROM provider_state",
        )
        .fetch_all(&self.pool)
        .await?;
        let now = SystemTime::now();
        let held = self.outage.held_cooldowns.lock().unwrap().clone();
        let mut cache = self.cache.lock().unwrap();
        let mut in_table = HashSet::with_capacity(rows.len());
        for row in rows {
            let provider: String = row.get("provider");
            let table = cooldown_from(row.get("until_ms"), row.get("cooldown_reason"), row.get("cooldown_detail"));
            let entry = cache.entry(provider.clone()).or_default();
            entry.cooldown = with_held(table, held.get(&provider), now);
            entry.consecutive_server_errors = row.get("consecutive_server_errors");
            in_table.insert(provider);
        }
        // A row deleted while the listener was away: the table holds nothing of it any more.
        for (provider, entry) in cache.iter_mut().filter(|(provider, _)| !in_table.contains(*provider)) {
            entry.cooldown = with_held(None, held.get(provider), now);
            entry.consecutive_server_errors = 0;
        }
        Ok(())
    }

    /// A cooldown only this worker holds, until the database takes it (see
    /// [`Outage::held_cooldowns`]).
    fn hold_cooldown(&self, provider: &str, cooldown: &Cooldown) {
        // A circuit ends with any success, seen through the table: nothing to hold against it.
        if cooldown.reason == CooldownReason::Circuit {
            return;
        }
        let mut held = self.outage.held_cooldowns.lock().unwrap();
        let later = held.get(provider).is_none_or(|current| cooldown.until > current.until);
        if later {
            held.insert(provider.to_string(), cooldown.clone());
        }
    }

    /// The database took `cooldown`: one this worker held that ends no later is the table's now.
    fn cooldown_shared(&self, provider: &str, cooldown: &Cooldown) {
        let mut held = self.outage.held_cooldowns.lock().unwrap();
        if held.get(provider).is_some_and(|current| current.until <= cooldown.until) {
            held.remove(provider);
        }
    }

    /// Follows NOTIFY until `shutdown`; after any reconnect it reloads the table, since
    /// notifications sent while disconnected are lost.
    pub async fn listen(self, shutdown: CancellationToken) {
        tokio::spawn(self.clone().count_workers_when_asked(shutdown.clone()));
        let mut delay = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            let session = async {
                let own_connection = PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(STATE_CALL_TIMEOUT)
                    .connect_lazy_with((*self.listen_options).clone());
                let mut listener = PgListener::connect_with(&own_connection).await?;
                let ping_channel = format!("{PING_CHANNEL_PREFIX}{:016x}", fastrand::u64(..));
                let nonce = format!("{:016x}", fastrand::u64(..));
                listener.listen_all([CHANNEL, WORKERS_CHANNEL, ping_channel.as_str()]).await?;
                self.reload().await?;
                self.heard();
                self.outage.workers_count_wanted.notify_one();
                self.outage.listening.store(true, Ordering::SeqCst);
                tracing::debug!("listening for provider-state changes");
                let _pinger = Pinger(tokio::spawn(self.clone().ping_listener(ping_channel.clone(), nonce.clone())));
                loop {
                    let Ok(received) = tokio::time::timeout(LISTEN_SILENCE, listener.try_recv()).await else {
                        return Err(sqlx::Error::Protocol(format!(
                            "no notification for {LISTEN_SILENCE:?}, not even a ping: the LISTEN connection is dead"
                        )));
                    };
                    match received? {
                        Some(notification) if notification.channel() == ping_channel => {
                            self.echoed(notification.payload(), &nonce);
                        }
                        Some(notification) if notification.channel() == WORKERS_CHANNEL => {
                            self.outage.workers_count_wanted.notify_one()
                        }
                        Some(notification) => self.apply_notice(notification.payload()),
                        None => {
                            // Notifications sent while it was away are lost: read the table.
                            self.outage.listening.store(false, Ordering::SeqCst);
                            tracing::info!("provider-state listener reconnected; reloading");
                            self.reload().await?;
                            self.heard();
                            self.outage.listening.store(true, Ordering::SeqCst);
                            self.outage.workers_count_wanted.notify_one();
                        }
                    }
                }
                #[allow(unreachable_code)]
                Ok::<(), sqlx::Error>(())
            };
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                result = session => result,
            };
            self.outage.listening.store(false, Ordering::SeqCst);
            if let Err(e) = result {
                tracing::warn!(error = %e, "provider-state listener lost the database; retrying");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    /// Counts the workers alive each time a count is asked for, off the LISTEN session's task,
    /// until `shutdown`. Asks that come while a count runs (it may have read the table before
    /// their worker's row was committed) make one more count after it, however many they are.
    async fn count_workers_when_asked(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.outage.workers_count_wanted.notified() => self.count_workers().await,
            }
        }
    }

    async fn count_workers(&self) {
        let stale = HEARTBEAT_STALE.as_secs_f64();
        let counted = self
            .guarded_for(Caller::Background, async {
                sqlx::query_scalar::<_, i64>(COUNT_ALIVE).bind(stale).fetch_one(&self.pool).await
            })
            .await;
        // Only ever more: a join adds a worker, and a count that finds fewer (rows aged by an
        // outage, this worker's own among them, or a count read before a heartbeat stored its
        // own) must not undo what the last heartbeat counted; the next heartbeat sets it exactly.
        if let Ok(alive) = counted {
            self.outage.workers_alive.fetch_max(u32::try_from(alive).unwrap_or(u32::MAX), Ordering::Relaxed);
        }
    }

    /// Workers seen alive at the last heartbeat or count: each limit's divisor while the
    /// database is away.
    pub fn workers_alive(&self) -> u32 {
        self.outage.workers_alive.load(Ordering::Relaxed).max(1)
    }

    /// Applies one provider-state notification to the local copy.
    fn apply_notice(&self, payload: &str) {
        let Ok(notice) = serde_json::from_str::<Notice>(payload) else {
            tracing::warn!("ignoring a malformed provider-state notification");
            return;
        };
        if notice.table {
            let table = notice.until_ms.and_then(|until_ms| cooldown_from(until_ms, notice.reason, notice.detail));
            let held = self.outage.held_cooldowns.lock().unwrap().get(&notice.provider).cloned();
            let mut cache = self.cache.lock().unwrap();
            let entry = cache.entry(notice.provider).or_default();
            entry.cooldown = with_held(table, held.as_ref(), SystemTime::now());
            entry.consecutive_server_errors = notice.server_errors.unwrap_or(0);
            return;
        }
        if let Some(count) = notice.server_errors {
            self.cache.lock().unwrap().entry(notice.provider.clone()).or_default().consecutive_server_errors = count;
        }
        if let Some(until_ms) = notice.until_ms {
            let cooldown = cooldown_from(until_ms, notice.reason, notice.detail);
            self.remember_cooldown(&notice.provider, cooldown);
        }
    }

    fn remember_cooldown(&self, provider: &str, cooldown: Option<Cooldown>) {
        let mut cache = self.cache.lock().unwrap();
        let entry = cache.entry(provider.to_string()).or_default();
        let newer = match (&entry.cooldown, &cooldown) {
            (Some(current), Some(new)) => new.replaces(current, Some(SystemTime::now())),
            (None, Some(_)) => true,
            // The shared row has no cooldown any more: a success closed the circuit.
            (Some(current), None) => current.reason == CooldownReason::Circuit,
            (None, None) => false,
        };
        if newer {
            entry.cooldown = cooldown;
        }
    }

    /// The provider's run of 5xx as this process knows it, without asking the database.
    pub fn known_server_errors(&self, provider: &str) -> i32 {
        self.cache.lock().unwrap().get(provider).map_or(0, |c| c.consecutive_server_errors)
    }

    /// The latest cooldown this process knows for `provider` (expired or not), without asking
    /// the database.
    pub fn known_cooldown(&self, provider: &str) -> Option<Cooldown> {
        self.cache.lock().unwrap().get(provider)?.cooldown.clone()
    }

    /// The refusal kept for `provider`, current at `now`, whatever the size it was for.
    fn quota_blocked(&self, provider: &str, now: SystemTime) -> Option<QuotaBlock> {
        self.cache.lock().unwrap().get(provider)?.quota_blocked.filter(|b| b.until > now)
    }

    /// The provider's windows for `ask`'s limits and pools: the same `Arc` for every ask of one
    /// provider (which is what lets the batcher put them in one batch), made again only if its
    /// limits changed.
    fn windows_for(&self, ask: Ask<'_>) -> Arc<quota_batcher::Windows> {
        let mut windows = self.windows.lock().unwrap();
        if let Some(known) = windows.get(ask.provider)
            && known.limits == ask.limits
            && known.pools.len() == ask.pools.len()
            && known.pools.iter().zip(ask.pools).all(|(a, b)| a.name == b.name && a.limits == b.limits)
        {
            return known.windows.clone();
        }
        let prepared = Arc::new(quota_batcher::Windows::new(windows_of(ask.provider, ask.limits, ask.pools)));
        let entry =
            ProviderWindows { limits: ask.limits.to_vec(), pools: ask.pools.to_vec(), windows: prepared.clone() };
        windows.insert(ask.provider.to_string(), entry);
        prepared
    }

    fn quota(&self) -> &mpsc::Sender<quota_batcher::Request> {
        self.quota.get_or_init(|| quota_batcher::spawn(self.pool.clone(), self.last_answer.clone()))
    }

    /// Claims `provider`'s probe in the table (its circuit, `known`, has expired by `now`).
    async fn claim_in_table(&self, provider: &str, now: SystemTime, known: Cooldown, hold_for: Duration) -> ProbeClaim {
        let hold = Cooldown { until: later(now, hold_for), ..known };
        let claimed = self.guarded(self.take_probe(provider, now, hold.until)).await;
        match claimed {
            Ok(true) => {
                self.remember_cooldown(provider, Some(hold));
                ProbeClaim::Call
            }
            // Lost, or nothing to claim: another worker holds the probe, or the circuit was
            // closed or replaced (or there was none). This worker's view may not have heard of
            // it yet, so the table says which.
            Ok(false) => self.lost_probe(provider, now, hold).await,
            Err(e) if refused_for_everyone(&e) => {
                // The database is away, or refuses every worker's write (a disk full, a
                // read-only standby): each worker probes on its own, at most one probe per
                // worker, as the local hold keeps this worker's other jobs back.
                tracing::debug!(provider, error = %e, "cannot claim the circuit's probe in the database; probing from here");
                self.remember_cooldown(provider, Some(hold));
                ProbeClaim::Call
            }
            // A slow or failed claim on a database that takes others' writes (the pool busy, a
            // statement cancelled, no connection slot): another worker's claim may win, so
            // this call keeps away; the view is left as it is, and the next job claims again.
            Err(e) => {
                tracing::debug!(provider, error = %e, "the claim of the circuit's probe failed; this call keeps away for a probe's time");
                ProbeClaim::Held(hold)
            }
        }
    }

    /// Takes `provider`'s probe if its circuit has expired by `now`, holding it until `until`,
    /// and announces the hold: whether it was taken. The row's lock is waited for (admissions
    /// hold it for their batch, and a claim that skipped a locked row would lose to them for as
    /// long as the provider's traffic lasts), but for a second at most: a wait behind a slow
    /// commit must not reach the state-call timeout, as timeouts in a row take the database for
    /// down, where each worker probes on its own. A claim that could not get the lock in time
    /// is lost like one that found the probe taken.
    async fn take_probe(&self, provider: &str, now: SystemTime, until: SystemTime) -> Result<bool, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL lock_timeout = '1s'").execute(&mut *tx).await?;
        let taken = sqlx::query_scalar::<_, bool>(
            "WITH claimed AS ( \
               UPDATE provider_state SET cooldown_until = to_timestamp($3::float8 / 1000), \
                 circuit_probe_at = to_timestamp($2::float8 / 1000), updated_at = now() \
               WHERE provider = $1 AND cooldown_reason = 'circuit' \
                 AND cooldown_until <= to_timestamp($2::float8 / 1000) \
               RETURNING provider, cooldown_until, cooldown_reason, cooldown_detail), \
             announced AS ( \
               SELECT pg_notify($4, json_build_object('provider', provider, \
                 'until_ms', fallback_epoch_ms(cooldown_until), \
                 'reason', cooldown_reason, 'detail', cooldown_detail)::text) FROM claimed) \
             SELECT (SELECT count(*) FROM announced) > 0",
        )
        .bind(provider)
        .bind(epoch_ms(now) as f64)
        .bind(epoch_ms(until) as f64)
        .bind(CHANNEL)
        .fetch_one(&mut *tx)
        .await;
        match taken {
            Ok(taken) => {
                tx.commit().await?;
                Ok(taken)
            }
            // 55P03 lock_not_available: the lock wait ran out.
            Err(e) if has_sqlstate(&e, &["55P03"]) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Why a claim of `provider`'s probe was lost, read from the table in a statement of its own:
    /// the claim's statement may have read the row before the winner's claim committed, and
    /// this worker's view may not have heard of it yet (nor of a cooldown that replaced the
    /// circuit, such as the probe's own 429). A running cooldown holds this call back; none means
    /// the probe has already closed the circuit. The answer is not kept in the view: by the time
    /// it is read a notice may have brought something newer, which it must not overwrite. If
    /// the table cannot be read, this call keeps away for as long as a probe may take.
    async fn lost_probe(&self, provider: &str, now: SystemTime, hold: Cooldown) -> ProbeClaim {
        match self.guarded(self.fetch_provider_row(provider)).await {
            Ok(Some(row)) => match row.cooldown {
                Some(cooldown) if cooldown.until > now || cooldown.reason == CooldownReason::Circuit => {
                    ProbeClaim::Held(cooldown)
                }
                _ => ProbeClaim::Call,
            },
            Ok(None) => ProbeClaim::Call,
            Err(e) => {
                tracing::debug!(provider, error = %e, "cannot read who holds the probe; this call keeps away for a probe's time");
                ProbeClaim::Held(hold)
            }
        }
    }

    /// The provider's row as the database has it (cooldown and error run), not kept.
    async fn fetch_provider_row(&self, provider: &str) -> Result<Option<ProviderRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT fallback_epoch_ms(cooldown_until) AS until_ms, cooldown_reason, \
             cooldown_detail, consecutive_server_errors FROM provider_state WHERE provider = $1",
        )
        .bind(provider)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|row| ProviderRow {
            cooldown: cooldown_from(row.get("until_ms"), row.get("cooldown_reason"), row.get("cooldown_detail")),
            consecutive_server_errors: row.get("consecutive_server_errors"),
        }))
    }

    /// The provider's row as the database has it (cooldown and error run), kept in this
    /// worker's view: its cooldown if it still runs at `now`.
    async fn read_cooldown(&self, provider: &str, now: SystemTime) -> Result<Option<Cooldown>, sqlx::Error> {
        let Some(ProviderRow { cooldown, consecutive_server_errors }) = self.fetch_provider_row(provider).await? else {
            return Ok(None);
        };
        self.cache.lock().unwrap().entry(provider.to_string()).or_default().consecutive_server_errors =
            consecutive_server_errors;
        self.remember_cooldown(provider, cooldown.clone());
        Ok(cooldown.filter(|c| c.until > now))
    }

    /// Takes a slot in the provider's windows and its pools', or learns when there will be one.
    /// The ask goes out with the other asks for this provider that wait with it, decided in
    /// arrival order in one transaction (`fallback_admit_batch`, migration 0008).
    async fn acquire(
        &self,
        ask: Ask<'_>,
        windows: &Arc<quota_batcher::Windows>,
        provider: &Arc<str>,
        now: SystemTime,
    ) -> Result<Admission, StoreError> {
        let admission = self.ask_windows(ask, windows, provider, 1, now).await?;
        let mut cache = self.cache.lock().unwrap();
        let cached = cache.entry(ask.provider.to_string()).or_default();
        cached.quota_blocked = QuotaBlock::after(cached.quota_blocked, &admission, ask.tokens, now);
        drop(cache);
        Ok(admission)
    }

    /// Asks the database for room for `requests` calls of `ask` (one call's, or a credit's:
    /// more than one).
    async fn ask_windows(
        &self,
        ask: Ask<'_>,
        windows: &Arc<quota_batcher::Windows>,
        provider: &Arc<str>,
        requests: u64,
        now: SystemTime,
    ) -> Result<Admission, StoreError> {
        // A calendar call's deadline is taken a little late (the database's clock runs on from
        // ours): a call that may end after a reset counts in the next day until it answers.
        let deadline = later(now, ask.flight.saturating_add(STATE_CALL_TIMEOUT));
        let leaves =
            windows.specs.iter().map(|s| s.reset.as_ref().map(|r| epoch_ms(r.next_after(deadline)) as f64)).collect();
        let request = |reply| {
            quota_batcher::Request::Admit(quota_batcher::AdmitAsk {
                provider: provider.clone(),
                windows: windows.clone(),
                tokens: saturating_i64(ask.tokens),
                flight_ms: saturating_i64(ask.flight.as_millis()),
                leaves,
                requests: (requests > 1).then(|| saturating_i64(requests)),
                open_ms: (requests > 1).then(|| saturating_i64(credits::LIFETIME.as_millis())),
                reply,
            })
        };
        let decision = self.batched_call(self.quota(), request).await?;
        let until = decision.blocked_until_ms.map(|ms| {
            let after_epoch = Duration::from_millis(u64::try_from(ms).unwrap_or(0));
            UNIX_EPOCH.checked_add(after_epoch).unwrap_or_else(|| later(now, STATE_CALL_TIMEOUT))
        });
        let admission = match (decision.usage_id, until, decision.blocked_by.as_deref()) {
            (Some(id), _, _) => Admission::Granted(Permit {
                usage_id: Some(id),
                local_id: None,
                provider: Some(provider.clone()),
                estimate: ask.tokens,
                from_credit: false,
                credit_sent: None,
            }),
            (None, _, Some("tokens_exceed_limit")) => Admission::TooLarge,
            // The provider's row was held elsewhere past the wait an admission carrying answers
            // allows (migration 0009): as a lock wait that failed, ask again shortly.
            (None, _, Some("busy")) => {
                return Err(StoreError::Unavailable("the provider's row is held elsewhere".into()));
            }
            (None, Some(until), Some("cooldown")) => match self.cooldown_of(ask.provider, now).await? {
                Some(cooldown) => Admission::Cooling(cooldown),
                None => Admission::OverQuota { until, measure: QuotaMeasure::Requests },
            },
            (None, Some(until), Some("tokens")) => Admission::OverQuota { until, measure: QuotaMeasure::Tokens },
            (None, Some(until), _) => Admission::OverQuota { until, measure: QuotaMeasure::Requests },
            (None, None, _) => Admission::Granted(Permit::UNCOUNTED),
        };
        Ok(admission)
    }

    /// A call admitted from `ask.provider`'s open credit, without a query, when it has room.
    /// Only while the listener is live: a call admitted without a query sees another worker's
    /// cooldown only through it (as a provider without limits does).
    async fn take_from_credit(&self, ask: Ask<'_>, provider: &Arc<str>, now: SystemTime) -> Option<Permit> {
        if !self.is_listening() {
            return None;
        }
        let (taken, ending) = self.credits.lock().unwrap().take(provider, ask.tokens, ask.flight, now);
        self.end_credits(ending).await;
        let taken = taken?;
        let local_id = Some(self.outage.own_calls.record_call(ask, now));
        Some(Permit {
            usage_id: Some(taken.call),
            local_id,
            provider: Some(provider.clone()),
            estimate: ask.tokens,
            from_credit: true,
            credit_sent: Some((taken.requests, taken.tokens)),
        })
    }

    /// Takes a credit for `provider` when its windows are large enough and have room, and
    /// admits the call from it. One ask for a credit per provider at a time: the calls that
    /// wait meanwhile are admitted from the one it brings. `None`: the call asks alone.
    async fn through_credit(
        &self,
        ask: Ask<'_>,
        windows: &Arc<quota_batcher::Windows>,
        provider: &Arc<str>,
        now: SystemTime,
    ) -> Result<Option<Admission>, StoreError> {
        let Some(calls) = credits::size_for(&windows.specs, ask.tokens) else { return Ok(None) };
        if !self.is_listening() {
            return Ok(None);
        }
        if !self.credits.lock().unwrap().may_ask(provider, now) {
            return Ok(None);
        }
        let gate = self.credit_asks.lock().unwrap().entry(provider.clone()).or_default().clone();
        let _one_ask_at_a_time = gate.lock().await;
        if let Some(permit) = self.take_from_credit(ask, provider, now).await {
            return Ok(Some(Admission::Granted(permit)));
        }
        if !self.credits.lock().unwrap().may_ask(provider, now) {
            return Ok(None);
        }
        // The credit's calls may be sent until its lifetime ends, each in flight for at most
        // the call's own timeout: its deadline in the windows covers the last of them.
        let tokens = ask.tokens.saturating_mul(calls);
        let credit_ask = Ask { tokens, flight: ask.flight.saturating_add(credits::LIFETIME), ..ask };
        let asked = self.ask_windows(credit_ask, windows, provider, calls, now).await;
        if asked.is_err() {
            // The calls waiting behind this ask ask one by one, together, rather than each
            // asking for a credit in turn.
            self.credits.lock().unwrap().at_limit(provider, now);
        }
        match asked? {
            Admission::Granted(Permit { usage_id: Some(call), .. }) => {
                let credit = Credit::new(call, calls, tokens, ask.flight, now);
                let endings = self.credits.lock().unwrap().open(provider, credit, now);
                self.end_credits(endings).await;
                self.close_credit_later(provider.clone(), call);
                Ok(self.take_from_credit(ask, provider, now).await.map(Admission::Granted))
            }
            Admission::OverQuota { .. } => {
                self.credits.lock().unwrap().at_limit(provider, now);
                Ok(None)
            }
            cooling @ Admission::Cooling(_) => Ok(Some(cooling)),
            Admission::Granted(_) | Admission::TooLarge => Ok(None),
        }
    }

    /// Closes credit `call` when its lifetime ends (if it is still open then); then, if its
    /// calls have not all answered, ends it at its deadline: a call that never answers (its job
    /// dropped) must not keep its credit living.
    fn close_credit_later(&self, provider: Arc<str>, call: i64) {
        let store = self.clone();
        tokio::spawn(async move {
            let mut wait = credits::LIFETIME;
            loop {
                tokio::time::sleep(wait).await;
                let endings = store.credits.lock().unwrap().close(&provider, call, SystemTime::now());
                store.end_credits(endings).await;
                let Some(deadline) = store.credits.lock().unwrap().closing_deadline(&provider, call) else { break };
                wait = deadline.duration_since(SystemTime::now()).unwrap_or_default();
            }
        });
    }

    /// The cooldown that refused an admission: the one this process knows when current (the
    /// listener, or another ask of the same refused batch, brought it), else the row's.
    async fn cooldown_of(&self, provider: &str, now: SystemTime) -> Result<Option<Cooldown>, StoreError> {
        if let Some(cooldown) = self.known_cooldown(provider).filter(|c| c.until > now) {
            return Ok(Some(cooldown));
        }
        self.guarded(self.read_cooldown(provider, now)).await
    }

    /// Deletes usage records older than any window can see (called by housekeeping).
    /// Retires, in every window, the calls that have left it (admission does so lazily for the
    /// providers it admits; this covers providers no longer called). Returns the windows' total
    /// use left.
    pub async fn prune_usage(&self) -> Result<i64, sqlx::Error> {
        let windows: Vec<(String, String, String, i64, String)> =
            sqlx::query_as("SELECT kind, scope, measure, window_ms, calendar FROM quota_window")
                .fetch_all(&self.pool)
                .await?;
        let mut left = 0i64;
        // One window per transaction: an admission locks its windows in the canonical order,
        // and must never wait on a prune that holds another of them. Each runs without the
        // state calls' bound: a window's whole period may leave at once (a calendar reset, a
        // fleet stopped for longer than the window), more than an admission can retire in time.
        for (kind, scope, measure, window_ms, calendar) in windows {
            let mut tx = self.begin_unbounded().await?;
            let used: i64 = sqlx::query_scalar(
                "WITH retired AS (SELECT fallback_retire($1, $2, $3, $4, $5, clock_timestamp()) AS used) \
                 SELECT coalesce((SELECT used FROM retired), (SELECT used FROM quota_window \
                   WHERE kind = $1 AND scope = $2 AND measure = $3 AND window_ms = $4 AND calendar = $5), 0)",
            )
            .bind(kind)
            .bind(scope)
            .bind(measure)
            .bind(window_ms)
            .bind(calendar)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            left = left.saturating_add(used);
        }
        Ok(left)
    }

    /// Deletes ledger rows first seen longer ago than `retention` (called by housekeeping).
    /// Both deletes run without the state calls' [`STATEMENT_TIMEOUT`]: the first prune of a
    /// long-running ledger may delete millions of rows.
    pub async fn prune_ledger(&self, retention: Duration) -> Result<u64, sqlx::Error> {
        let mut tx = self.begin_unbounded().await?;
        let done = sqlx::query("DELETE FROM job_results WHERE first_seen < now() - make_interval(secs => $1)")
            .bind(retention.as_secs_f64())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM delivery_failures WHERE last_at < now() - make_interval(secs => $1)")
            .bind(retention.as_secs_f64())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }
}

/// Locks every window a write-back touches, in the canonical order: those of the outage's
/// calls (`calls`) and those the `answers`' calls have rows in, creating those that do not
/// exist yet (a pool first used during the outage). One statement that inserts or locks each
/// in that order: locking the existing ones first and creating the others with the calls'
/// insert took a new window after those that sort later (review 33: a deadlock with an
/// observation holding the new pool's window and asking for the provider's).
async fn create_and_lock_windows(
    tx: &mut sqlx::PgConnection,
    calls: impl Iterator<Item = &WindowKey>,
    answers: &[AnswerWrite],
) -> Result<(), sqlx::Error> {
    let answer_calls: Vec<i64> = answers.iter().map(|a| a.call).collect();
    let (mut kinds, mut scopes, mut measures, mut windows, mut calendars) = (vec![], vec![], vec![], vec![], vec![]);
    for key in calls {
        kinds.push(key.kind.as_str());
        scopes.push(key.scope.as_str());
        measures.push(measure_name(key.measure));
        windows.push(saturating_i64(key.window.as_millis()));
        calendars.push(key.calendar.as_str());
    }
    sqlx::query(
        "INSERT INTO quota_window AS w (kind, scope, measure, window_ms, calendar, used, next_leave) \
         SELECT k, s, m, ms, c, 0, 'infinity' FROM ( \
             SELECT u.kind, u.scope, u.measure, u.window_ms, u.calendar FROM quota_use u WHERE u.call_id = ANY ($1) \
             UNION SELECT * FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[]) \
           ) AS t(k, s, m, ms, c) \
         ORDER BY k COLLATE \"C\", s COLLATE \"C\", m COLLATE \"C\", ms, c COLLATE \"C\" \
         ON CONFLICT (kind, scope, measure, window_ms, calendar) DO UPDATE SET used = w.used",
    )
    .bind(&answer_calls)
    .bind(&kinds)
    .bind(&scopes)
    .bind(&measures)
    .bind(&windows)
    .bind(&calendars)
    .execute(tx)
    .await?;
    Ok(())
}

/// The statement that writes `answers` (`fallback_finish_batch`, one row of columns per call,
/// a call's latest write only).
fn finish_batch(answers: &[AnswerWrite]) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let (calls, tokens, requests, ended, seqs) = quota_batcher::answer_columns(answers);
    sqlx::query("SELECT fallback_finish_batch($1, $2, $3, $4, $5)")
        .bind(calls)
        .bind(tokens)
        .bind(requests)
        .bind(ended)
        .bind(seqs)
}

/// Adds the outage's calls to one window: their rows, and the window's running total. One
/// set-based statement per window; a call whose row is there already (a retry of a write-back
/// that committed) adds nothing.
async fn insert_written_back_calls(
    tx: &mut sqlx::PgConnection,
    key: &WindowKey,
    call_ids: &[i64],
    amounts: &[i64],
    leaves: &[f64],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH added AS ( \
           INSERT INTO quota_use (call_id, kind, scope, measure, window_ms, calendar, amount, leaves_at) \
           SELECT c, $1, $2, $3, $4, $5, a, to_timestamp(l / 1000) \
           FROM unnest($6::bigint[], $7::bigint[], $8::float8[]) AS t(c, a, l) \
           WHERE NOT EXISTS (SELECT 1 FROM quota_use u WHERE u.call_id = t.c AND u.kind = $1 AND u.scope = $2 \
                               AND u.measure = $3 AND u.window_ms = $4 AND u.calendar = $5) \
           RETURNING amount, leaves_at) \
         INSERT INTO quota_window AS w (kind, scope, measure, window_ms, calendar, used, next_leave) \
         SELECT $1, $2, $3, $4, $5, coalesce(sum(amount), 0), coalesce(min(leaves_at), 'infinity') FROM added \
         ON CONFLICT (kind, scope, measure, window_ms, calendar) DO UPDATE \
           SET used = w.used + EXCLUDED.used, next_leave = least(w.next_leave, EXCLUDED.next_leave)",
    )
    .bind(key.kind.as_str())
    .bind(&key.scope)
    .bind(measure_name(key.measure))
    .bind(saturating_i64(key.window.as_millis()))
    .bind(&key.calendar)
    .bind(call_ids)
    .bind(amounts)
    .bind(leaves)
    .execute(tx)
    .await?;
    Ok(())
}

/// Whether a connection still answers, within [`RELEASE_PING_TIMEOUT`]: asked before the pool
/// hands a connection out, and when one comes back soon after a query on it was given up.
///
/// A state call that outlived its bound (`guarded`) is dropped mid-query and its connection
/// handed back; sqlx then pings it before reuse, with no time limit, and a connection that died
/// without a close (no RST: a partition, a frozen relay) keeps that ping, and its pool slot,
/// until the kernel gives up on it (about 15 minutes): two such and the default pool has no
/// connection left for anything. Pinging first with a bound closes such a connection at once
/// (an error makes sqlx drop it without a goodbye); a live one pays one more round trip (sqlx's
/// own ping follows), which is why only releases soon after a query was given up are pinged here
/// ([`Abandoned`]).
async fn answers_in_time(conn: &mut sqlx::PgConnection) -> Result<bool, sqlx::Error> {
    use sqlx::Connection;
    match tokio::time::timeout(RELEASE_PING_TIMEOUT, conn.ping()).await {
        Ok(Ok(())) => Ok(true),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("a pooled connection did not answer a ping within {RELEASE_PING_TIMEOUT:?}"),
        ))),
    }
}

/// Asks the server to check, while a query of this session runs, that the client is still
/// there (`client_connection_check_interval`, Postgres 14+; older servers refuse it, and the
/// session goes on without it).
///
/// [`answers_in_time`] closes a connection whose dropped query is still running (a write queued
/// on a row lock, a slow database): without this check, Postgres notices the client left only
/// when the query ends, so the backend stays, holding its place in the lock queue, while the
/// pool's freed slot opens a new connection; every round of timeouts would add as many backends
/// as the pool has slots.
async fn checks_its_client(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    use sqlx::Executor;
    // A shorter bound the operator set (the role's, the URL's `options`) is kept.
    let bound_ms = i64::try_from(STATEMENT_TIMEOUT.as_millis()).unwrap_or(i64::MAX);
    let bounded = sqlx::query(
        "SELECT set_config('statement_timeout', $1::text || 'ms', false) \
         WHERE (SELECT setting::bigint FROM pg_settings WHERE name = 'statement_timeout') NOT BETWEEN 1 AND $1",
    )
    .bind(bound_ms);
    if let Err(e) = bounded.execute(&mut *conn).await {
        tracing::warn!(error = %e, "cannot bound the time the database works on a statement; a slow one counts as an outage");
    }
    if let Err(e) = conn.execute("SET client_connection_check_interval = '1s'").await {
        tracing::debug!(error = %e, "the database does not check for a departed client; slow queries outlive their connection");
    }
    Ok(())
}

/// When a state call last gave up on its query (epoch ms; 0: never).
///
/// sqlx's own ping on a connection handed back has no bound (see [`answers_in_time`]), but
/// bounding it costs every release a round trip. Only a query given up mid-way leaves a
/// connection that may not answer, and its connection is handed back the moment it is given up:
/// releases within [`ABANDONED_LATELY`] of one are pinged with a bound, the others are not.
#[derive(Default)]
struct Abandoned(AtomicU64);

/// How long after a query was given up releases are pinged with a bound.
const ABANDONED_LATELY: Duration = Duration::from_secs(10);

impl Abandoned {
    /// Watches one state call: dropped (a timeout, or its caller gone) before it finished, it
    /// counts as given up.
    fn watch(&self) -> AbandonWatch<'_> {
        AbandonWatch { abandoned: self, finished: false }
    }

    fn lately(&self) -> bool {
        let last = self.0.load(Ordering::Relaxed);
        let now = u64::try_from(epoch_ms(SystemTime::now())).unwrap_or(0);
        last != 0 && now.saturating_sub(last) <= u64::try_from(ABANDONED_LATELY.as_millis()).unwrap_or(u64::MAX)
    }
}

struct AbandonWatch<'a> {
    abandoned: &'a Abandoned,
    finished: bool,
}

impl AbandonWatch<'_> {
    fn finished(mut self, finished: bool) {
        self.finished = finished;
    }
}

impl Drop for AbandonWatch<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let now = u64::try_from(epoch_ms(SystemTime::now())).unwrap_or(0);
            self.abandoned.0.store(now.max(1), Ordering::Relaxed);
        }
    }
}

/// How long a connection handed back to the pool may take to answer a ping.
const RELEASE_PING_TIMEOUT: Duration = Duration::from_secs(1);

/// A call admitted locally, written back while still in flight.
#[derive(Debug, Clone)]
struct WrittenBack {
    /// Its database id, shared by its rows.
    call: i64,
    provider: Arc<str>,
    /// The tokens it was written back with.
    estimate: u64,
}

/// One window's rows of the calls written back: their database ids, amounts and leaving times
/// (epoch ms).
type WrittenBackRows = (Vec<i64>, Vec<i64>, Vec<f64>);

/// What a write-back writes of an outage's calls: their rows in each window, the calls still in
/// flight (whose answers come later), and the answers of calls an earlier try may have
/// written already (written over their rows).
#[derive(Default)]
struct WrittenBackPlan {
    windows: BTreeMap<WindowKey, WrittenBackRows>,
    in_flight: Vec<(i64, WrittenBack)>,
    answered_again: Vec<AnswerWrite>,
}

/// An answer in its batcher's queue: the batch's reply, by when it must come, and what it
/// writes (kept for the write-back should the database be unreachable).
struct QueuedAnswer {
    reply: oneshot::Receiver<Result<(), StoreError>>,
    deadline: tokio::time::Instant,
    write: AnswerWrite,
}

fn answer_not_recorded(e: &StoreError) {
    tracing::debug!(error = %e, "cannot record a call's answer; its slot frees when it expires");
}

/// The table's cooldown for a provider, unless this worker holds one of its own (`held`, not
/// taken by the database) that is still running, ends later, and is not one the table's
/// replaces all the same (the provider's own time over our guess).
fn with_held(table: Option<Cooldown>, held: Option<&Cooldown>, now: SystemTime) -> Option<Cooldown> {
    match held
        .filter(|h| h.until > now && table.as_ref().is_none_or(|t| h.until > t.until && !t.replaces(h, Some(now))))
    {
        Some(held) => Some(held.clone()),
        None => table,
    }
}

/// A provider's row of `provider_state`, as read.
struct ProviderRow {
    cooldown: Option<Cooldown>,
    consecutive_server_errors: i32,
}

/// The cooldown a row of `provider_state` (or its notice) holds. A time with a reason this
/// worker does not know, or none, is held all the same (an operator's `UPDATE ... SET
/// cooldown_until = now() + '1 hour'`, a newer version's new reason): skipping a provider for
/// nothing costs a detour, calling one that was stopped may cost a 429 or a bill. The table's
/// "no cooldown" is such a row at the epoch (a closed circuit).
fn cooldown_from(until_ms: i64, reason: Option<String>, detail: Option<String>) -> Option<Cooldown> {
    let reason = match reason.as_deref().and_then(CooldownReason::parse) {
        Some(known) => known,
        None if until_ms <= 0 => return None,
        None => CooldownReason::Unrecognized,
    };
    Some(Cooldown {
        until: UNIX_EPOCH + Duration::from_millis(until_ms.max(0) as u64),
        reason,
        detail: detail.unwrap_or_default(),
    })
}

pub(super) fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| saturating_i64(d.as_millis()))
}

pub(super) fn saturating_i64(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// Whose window it is: a provider's own, or a shared pool's (a separate kind, so no provider
/// name can collide with a pool's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ScopeKind {
    // Declared in the byte order of their names ('pool' < 'provider'), so that Rust's order and
    // SQL's `COLLATE "C"` order agree.
    Pool,
    Provider,
}

impl ScopeKind {
    /// The `kind` column of the quota tables.
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Provider => "provider",
            ScopeKind::Pool => "pool",
        }
    }
}

/// One window in the quota tables. Its field order is the canonical lock order (kind, scope,
/// measure, window, calendar; strings in byte order, as SQL's `COLLATE "C"`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WindowKey {
    pub kind: ScopeKind,
    pub scope: String,
    pub measure: QuotaMeasure,
    pub window: Duration,
    /// The reset as configured for a calendar window, `""` for a sliding one: a calendar day
    /// never shares a running total with the sliding 1d window of the same scope.
    pub calendar: String,
}

/// A window and the limit it holds.
#[derive(Debug, Clone)]
pub struct WindowSpec {
    pub key: WindowKey,
    pub limit: u64,
    pub reset: Option<crate::calendar::DailyReset>,
}

/// The windows one call counts in, as the database counts them: the provider's own limits and
/// each pool's, one running total per window (two limits on the same measure and window are one,
/// the stricter), in the canonical order every admission locks them in.
pub fn windows_of(provider: &str, limits: &[LimitConfig], pools: &[QuotaPoolConfig]) -> Vec<WindowSpec> {
    let mut strictest: std::collections::BTreeMap<WindowKey, WindowSpec> = std::collections::BTreeMap::new();
    let own = limits.iter().map(|l| (ScopeKind::Provider, provider, l));
    let pooled = pools.iter().flat_map(|p| p.limits.iter().map(move |l| (ScopeKind::Pool, p.name.as_str(), l)));
    for (kind, scope, limit) in own.chain(pooled) {
        let (measure, value) = super::quota::measure_of(limit);
        let calendar = limit.resets.as_ref().map(|r| r.to_string()).unwrap_or_default();
        let key = WindowKey { kind, scope: scope.to_string(), measure, window: whole_millis(limit.per), calendar };
        let spec =
            strictest.entry(key.clone()).or_insert(WindowSpec { key, limit: value, reset: limit.resets.clone() });
        spec.limit = spec.limit.min(value);
    }
    strictest.into_values().collect()
}

/// When a job refused while the database is away asks again: soon enough to find it back.
fn ask_again_soon(now: SystemTime) -> SystemTime {
    now.checked_add(PROBE_INTERVAL * 4).unwrap_or(now)
}

/// A window's length as the quota tables key it (whole milliseconds, at most `i64::MAX`): two
/// limits whose `per` differ by less than a millisecond are one window there, so they must be
/// one here too (the stricter), or a batch would name that window twice.
fn whole_millis(per: Duration) -> Duration {
    Duration::from_millis(u64::try_from(saturating_i64(per.as_millis())).unwrap_or(0))
}

/// The name a measure has in the quota tables.
pub(super) fn measure_name(measure: QuotaMeasure) -> &'static str {
    match measure {
        QuotaMeasure::Requests => "requests",
        QuotaMeasure::Tokens => "tokens",
    }
}

impl PgStore {
    /// Sends a ping on the LISTEN session's own `channel` every [`LISTEN_PING`] through the pool
    /// (best effort: a ping that cannot be sent proves nothing, and is not waited for), and
    /// records when each one that went out was sent: its echo is due on the session.
    async fn ping_listener(self, channel: String, nonce: String) {
        let mut every = tokio::time::interval(LISTEN_PING);
        loop {
            every.tick().await;
            // Timed from when it has a connection: a wait for one (the pool busy) is no lag of
            // the session's.
            let ping = async {
                let mut connection = self.pool.acquire().await?;
                let sent = monotonic_ms();
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(&channel)
                    .bind(format!("{nonce}:{sent}"))
                    .execute(&mut *connection)
                    .await?;
                Ok::<u64, sqlx::Error>(sent)
            };
            if let Ok(Ok(sent)) = tokio::time::timeout(STATE_CALL_TIMEOUT, ping).await {
                // The oldest ping not echoed yet is the one that counts: a newer one must not
                // restart the wait for an echo that is not coming.
                let echoed =
                    self.outage.ping_sent_ms.load(Ordering::SeqCst) <= self.outage.heard_ms.load(Ordering::SeqCst);
                if echoed {
                    self.outage.ping_sent_ms.store(sent, Ordering::SeqCst);
                }
            }
        }
    }
}

/// Milliseconds on a monotonic clock of this process (from its first call): what the LISTEN
/// session's freshness is measured on, immune to the wall clock's steps.
pub(super) fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Stops the pinger when the LISTEN session it proves alive ends.
struct Pinger(tokio::task::JoinHandle<()>);

impl Drop for Pinger {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether `tokens` exceed one of the token limits (the provider's or a pool's) outright.
fn too_large_for(ask: Ask<'_>, tokens: u64) -> bool {
    let pooled = ask.pools.iter().flat_map(|p| p.limits.iter());
    ask.limits.iter().chain(pooled).any(|l| l.tokens.is_some_and(|max| tokens > max))
}

/// Whether `error` refuses a write of any worker alike: the database is away (this worker serves
/// from its own view) or out of resources the server shares (class 53 but 53300, too many
/// connections, which is this worker's). A read-only session (25006) or a role without the
/// right (class 42) may be this worker's alone (a setting of its role, a pooler routing it to a
/// standby): another worker may take the probe, so it keeps away.
fn refused_for_everyone(error: &StoreError) -> bool {
    match error {
        StoreError::Unreachable(_) => true,
        StoreError::Database(sqlx::Error::Database(db)) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or_default();
            code.starts_with("53") && code != "53300"
        }
        _ => false,
    }
}

/// Who waits on a state call.
#[derive(Debug, Clone, Copy)]
enum Caller {
    /// A job (an admission, the ledger, a cooldown it learnt): a database too slow for such
    /// calls holds jobs back.
    Job,
    /// Nobody (an answer's write, a release, the heartbeat): its slowness holds nothing back.
    Background,
}

/// Whether a statement keeps the bound of the state calls ([`STATEMENT_TIMEOUT`]).
#[derive(Debug, Clone, Copy)]
enum StatementBound {
    /// A state call: the worker gives up on it after [`STATE_CALL_TIMEOUT`] anyway.
    Kept,
    /// Work nobody waits on (the write-back after an outage): it takes as long as it needs.
    Lifted,
}

/// Whether the database refused the statement with one of `codes` (SQLSTATEs).
fn has_sqlstate(error: &sqlx::Error, codes: &[&str]) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| codes.contains(&code.as_ref())),
        _ => false,
    }
}

/// A statement cancelled past its `statement_timeout` (57014: [`STATEMENT_TIMEOUT`], or a
/// shorter one the operator set).
pub fn is_statement_timeout(error: &sqlx::Error) -> bool {
    has_sqlstate(error, &["57014"])
}

/// A statement the database gave up on for its slowness: cancelled past [`STATEMENT_TIMEOUT`]
/// or a lock wait past `lock_timeout` (55P03). The database answered: it is busy, not away,
/// and the call is tried again later like one given up in time.
pub fn is_slow(error: &sqlx::Error) -> bool {
    is_statement_timeout(error) || has_sqlstate(error, &["55P03"])
}

/// Errors that go away by themselves (the server is stopped or restarting, the network blipped).
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        // 57P01..57P03: admin shutdown, crash shutdown, "the database system is starting up".
        e => has_sqlstate(e, &["57P03", "57P01", "57P02"]),
    }
}

impl PgStore {
    /// Admission through the database: the provider's row, then its limits, in batches.
    async fn admit_shared(&self, ask: Ask<'_>, now: SystemTime) -> Result<Admission, StoreError> {
        let provider = ask.provider;
        let unlimited = ask.limits.is_empty() && ask.pools.is_empty();
        if unlimited && self.is_listening() {
            // The listener keeps the local copy current; `admit` has checked it already.
            return Ok(Admission::Granted(Permit::UNCOUNTED));
        }
        if unlimited {
            let cooldown = self.guarded(self.read_cooldown(provider, now)).await?;
            return Ok(cooldown.map_or(Admission::Granted(Permit::UNCOUNTED), Admission::Cooling));
        }
        // One copy of the name for the credits, the batch's key and the permit's answer.
        let name: Arc<str> = provider.into();
        if let Some(permit) = self.take_from_credit(ask, &name, now).await {
            return Ok(Admission::Granted(permit));
        }
        if let Some(QuotaBlock { until, measure, .. }) =
            self.quota_blocked(provider, now).filter(|b| b.stands_for(ask.tokens))
        {
            return Ok(Admission::OverQuota { until, measure });
        }
        let windows = self.windows_for(ask);
        if let Some(admission) = self.through_credit(ask, &windows, &name, now).await? {
            return Ok(admission);
        }
        let admission = self.acquire(ask, &windows, &name, now).await?;
        Ok(match admission {
            Admission::Granted(permit) => {
                let local_id = Some(self.outage.own_calls.record_call(ask, now));
                Admission::Granted(Permit { local_id, ..permit })
            }
            Admission::OverQuota { until, measure } => {
                if credits::size_for(&windows.specs, ask.tokens).is_some() {
                    self.credits.lock().unwrap().at_limit(&name, now);
                }
                Admission::OverQuota { until, measure }
            }
            other => other,
        })
    }
}

#[async_trait::async_trait]
impl ProviderState for PgStore {
    async fn admit(&self, ask: Ask<'_>, now: SystemTime) -> Admission {
        if let Some(cooldown) = self.known_cooldown(ask.provider).filter(|c| c.until > now) {
            return Admission::Cooling(cooldown);
        }
        match self.admit_shared(ask, now).await {
            Ok(admission) => admission,
            Err(_) if ask.limits.is_empty() && ask.pools.is_empty() => Admission::Granted(Permit::UNCOUNTED),
            // Only an unreachable database hands limits to this worker's own share, and not over
            // the database's last word: a refusal it gave for a larger ask still says the shared
            // window was fuller than this worker alone can see (asked again once it is back).
            Err(StoreError::Unreachable(_)) => match self.quota_blocked(ask.provider, now) {
                Some(QuotaBlock { until, measure, .. }) => {
                    Admission::OverQuota { until: until.min(ask_again_soon(now)), measure }
                }
                None => self.admit_locally(ask, now).await,
            },
            // A slow or failed admission on a reachable database: the shared window may be full,
            // so no call now; ask again shortly.
            Err(e) => {
                tracing::warn!(provider = ask.provider, error = %e, "cannot ask the database for a slot now; trying again shortly");
                let until = now.checked_add(STATE_CALL_TIMEOUT).unwrap_or(now);
                Admission::OverQuota { until, measure: QuotaMeasure::Requests }
            }
        }
    }

    async fn finish(&self, permit: Permit, tokens: Option<u64>, now: SystemTime) {
        // The job does not wait for the answer to be written: once queued, it goes out before
        // any later ask of this process for the provider (the batcher keeps each provider's
        // order), which is all such an ask needs of it; waiting only held the job's result back
        // by a batch round trip. Other providers' asks are not ordered behind it: when they
        // share a window with this one (a pool's), the answer is written first. Nor are other
        // workers' asks: an answer that raises a token window's count above the call's
        // estimate is written first too, since the job's result lets its client send the next
        // job to any worker, whose ask must count it. An answer that lowers a count, or only
        // ends the call's flight, can follow: until it lands the windows count more, not less.
        if permit.from_credit {
            if let Some(ending) = self.credit_answer(permit, tokens, now) {
                self.end_credit(ending).await;
            }
            return;
        }
        let (provider, estimate) = match (&permit.provider, permit.local_id) {
            (Some(provider), _) => (Some(provider.clone()), permit.estimate),
            // A call admitted locally and written back while in flight counts in the shared
            // windows with what it was written back with.
            (None, Some(local_id)) => match self.outage.written_back.lock().unwrap().get(&local_id) {
                Some(written) => (Some(written.provider.clone()), written.estimate),
                None => (None, 0),
            },
            (None, None) => (None, 0),
        };
        let raises = tokens.is_some_and(|t| t > estimate);
        if provider.is_some_and(|provider| self.written_first(&provider, raises)) {
            return self.finish_written(permit, tokens, now).await;
        }
        let answer = match self.queue_answer(permit, tokens, now).await {
            Ok(Some(answer)) => answer,
            Ok(None) => return,
            Err(e) => return answer_not_recorded(&e),
        };
        let store = self.clone();
        self.answers.spawn(async move {
            if let Err(e) = store.written(answer).await {
                answer_not_recorded(&e);
            }
        });
    }

    async fn release(&self, permit: Permit) {
        self.release_call(permit, SystemTime::now()).await;
    }

    async fn finish_written(&self, permit: Permit, tokens: Option<u64>, now: SystemTime) {
        if let Err(e) = self.finish_recorded(permit, tokens, now).await {
            answer_not_recorded(&e);
        }
    }

    async fn cool_down(&self, provider: &str, cooldown: Cooldown) {
        self.remember_cooldown(provider, Some(cooldown.clone()));
        match self.guarded(self.share_cooldown(provider, &cooldown)).await {
            Ok(()) => self.cooldown_shared(provider, &cooldown),
            // Refused for good (it would be refused again): this worker keeps it.
            Err(StoreError::Database(e)) => {
                tracing::warn!(provider, error = %e, "the database refused a cooldown; only this worker knows it");
                self.hold_cooldown(provider, &cooldown);
            }
            // Slow or away: shared by the next heartbeat, or when the database is back.
            Err(e) => {
                tracing::warn!(provider, error = %e, "cannot share a cooldown now; it is shared as soon as possible");
                self.hold_cooldown(provider, &cooldown);
                let mut unshared = self.outage.unshared_cooldowns.lock().unwrap();
                if unshared.len() < MAX_UNSHARED_COOLDOWNS {
                    unshared.push((provider.to_string(), cooldown));
                }
            }
        }
    }

    async fn record_success(&self, provider: &str) {
        let circuit = |c: &CachedProvider| c.cooldown.as_ref().is_some_and(|c| c.reason == CooldownReason::Circuit);
        let had_errors =
            self.cache.lock().unwrap().get(provider).is_some_and(|c| c.consecutive_server_errors > 0 || circuit(c));
        if !had_errors {
            return;
        }
        // Closing the circuit is announced so that every worker calls again at once.
        let result = self
            .guarded(
                sqlx::query(
                    "WITH up AS ( \
                       UPDATE provider_state SET consecutive_server_errors = 0, circuit_probe_at = NULL, updated_at = now(), \
                         cooldown_until = CASE WHEN cooldown_reason = 'circuit' THEN 'epoch'::timestamptz ELSE cooldown_until END, \
                         cooldown_reason = CASE WHEN cooldown_reason = 'circuit' THEN NULL ELSE cooldown_reason END \
                       WHERE provider = $1 RETURNING provider, cooldown_reason) \
                     SELECT pg_notify($2, json_build_object('provider', provider, 'until_ms', 0, \
                       'reason', NULL::text, 'detail', NULL::text, 'server_errors', 0)::text) FROM up \
                     WHERE cooldown_reason IS NULL",
                )
                .bind(provider)
                .bind(CHANNEL)
                .execute(&self.pool),
            )
            .await;
        if let Err(e) = &result {
            tracing::debug!(provider, error = %e, "cannot reset the provider's error run");
        }
        if let Some(c) = self.cache.lock().unwrap().get_mut(provider) {
            c.consecutive_server_errors = 0;
        }
        self.remember_cooldown(provider, None);
    }

    async fn claim_probe(&self, provider: &str, now: SystemTime, hold_for: Duration) -> ProbeClaim {
        // While the listener is live only a circuit this process knows of can need a probe: it
        // brings every opening within moments, long before its (at least 5 s) open time ends.
        // A view it no longer keeps current may have missed one: the table decides.
        let mut known = self.known_cooldown(provider).filter(|c| c.reason == CooldownReason::Circuit);
        if known.is_none() && !self.is_listening() {
            match self.guarded(self.fetch_provider_row(provider)).await {
                Ok(Some(ProviderRow { cooldown: Some(cooldown), .. }))
                    if cooldown.reason == CooldownReason::Circuit =>
                {
                    known = Some(cooldown);
                }
                Ok(Some(ProviderRow { cooldown: Some(cooldown), .. })) if cooldown.until > now => {
                    return ProbeClaim::Held(cooldown);
                }
                // No circuit in the table, or it cannot be read (as admission, which then
                // grants a provider without limits): nothing to probe.
                Ok(_) | Err(_) => return ProbeClaim::Call,
            }
        }
        let Some(known) = known else { return ProbeClaim::Call };
        if known.until > now {
            return ProbeClaim::Held(known);
        }
        let gate = self.probe_claims.lock().unwrap().entry(provider.to_string()).or_default().clone();
        let waiting_since = monotonic_ms();
        let mut last_claim = gate.lock().await;
        // The claim this one waited for took the probe: it is held.
        if let Some(taken) =
            self.known_cooldown(provider).filter(|c| c.reason == CooldownReason::Circuit && c.until > now)
        {
            return ProbeClaim::Held(taken);
        }
        // It lost, or could not tell: its answer is this one's too (claiming again would only
        // make each job in the queue wait for one more claim).
        if let Some((ProbeClaim::Held(held), decided)) = last_claim.as_ref()
            && *decided >= waiting_since
        {
            return ProbeClaim::Held(held.clone());
        }
        let outcome = self.claim_in_table(provider, now, known, hold_for).await;
        *last_claim = Some((outcome.clone(), monotonic_ms()));
        outcome
    }

    async fn record_server_error(&self, provider: &str, detail: &str) -> u32 {
        let result = self
            .guarded(
                sqlx::query_scalar::<_, i32>(
                    "WITH up AS ( \
                       INSERT INTO provider_state AS s (provider, consecutive_server_errors, last_error, last_error_at) \
                       VALUES ($1, 1, $2, now()) \
                       ON CONFLICT (provider) DO UPDATE SET consecutive_server_errors = s.consecutive_server_errors \
                           + CASE WHEN s.consecutive_server_errors >= $3 AND s.circuit_probe_at IS NULL THEN 0 ELSE 1 END, \
                         circuit_probe_at = NULL, \
                         last_error = EXCLUDED.last_error, last_error_at = now(), updated_at = now() \
                       RETURNING provider, consecutive_server_errors) \
                     SELECT consecutive_server_errors FROM up, LATERAL (SELECT pg_notify($4, \
                       json_build_object('provider', provider, 'server_errors', consecutive_server_errors)::text)) n",
                )
                .bind(provider)
                .bind(detail)
                .bind(i32::try_from(CIRCUIT_THRESHOLD).unwrap_or(i32::MAX))
                .bind(CHANNEL)
                .fetch_one(&self.pool),
            )
            .await;
        let mut cache = self.cache.lock().unwrap();
        let entry = cache.entry(provider.to_string()).or_default();
        match result {
            Ok(count) => entry.consecutive_server_errors = count,
            Err(e) => {
                tracing::debug!(provider, error = %e, "cannot share a server error; counting locally");
                entry.consecutive_server_errors = entry.consecutive_server_errors.saturating_add(1);
            }
        }
        u32::try_from(entry.consecutive_server_errors).unwrap_or(0)
    }

    async fn record_rejected_output(&self, provider: &str, reason: &str) {
        let result = self
            .guarded(
                sqlx::query(
                    "INSERT INTO rejected_outputs AS r (provider, reason) VALUES ($1, $2) \
                     ON CONFLICT (provider, reason) DO UPDATE SET count = r.count + 1, last_at = now()",
                )
                .bind(provider)
                .bind(reason)
                .execute(&self.pool),
            )
            .await;
        if let Err(e) = result {
            tracing::debug!(provider, reason, error = %e, "cannot count a rejected answer for `status`");
        }
    }

    async fn observe_quota(&self, ask: Ask<'_>, observed: &Permit, seen: &[QuotaObservation], now: SystemTime) {
        let mut windows = ObservedWindows::default();
        for observation in seen.iter().filter(|o| super::quota::current(o, now)) {
            for (pool, limit) in super::quota::matching(&ask, observation) {
                let (kind, scope) = match pool {
                    Some(name) => (ScopeKind::Pool, name),
                    None => (ScopeKind::Provider, ask.provider),
                };
                windows.push(kind, scope, limit, observation, observed, now);
            }
        }
        if windows.kinds.is_empty() {
            return;
        }
        // A credit's call is observed as the credit: the database counts every credit that
        // admitted calls after it was granted as sent after the figure, but for what this
        // credit had sent with the observed call.
        if let Err(e) = self.guarded(windows.observe(&self.pool, observed.usage_id)).await {
            // Best effort: the next answer's headers say it again.
            tracing::debug!(provider = ask.provider, error = %e, "cannot correct the windows from the provider's headers");
            return;
        }
        // What blocked this provider before may have changed either way: ask the database next time.
        if let Some(cached) = self.cache.lock().unwrap().get_mut(ask.provider) {
            cached.quota_blocked = None;
        }
    }
}

/// The windows one answer's rate-limit headers speak of, as the columns of
/// `fallback_observe_batch` (migration 0014): every window corrected in one statement, in the
/// windows' canonical order, by `fallback_observe` (0007, 0013) each.
#[derive(Default)]
struct ObservedWindows {
    kinds: Vec<&'static str>,
    scopes: Vec<String>,
    measures: Vec<&'static str>,
    window_ms: Vec<i64>,
    calendars: Vec<String>,
    declared: Vec<i64>,
    remaining: Vec<i64>,
    leaves_ms: Vec<i64>,
    sent: Vec<Option<i64>>,
}

impl ObservedWindows {
    /// What the provider says is left of `limit` in the answer to `observed` (its database
    /// call id; none when it was admitted locally: nothing is then lowered, see
    /// [`super::quota::observe`]). A call admitted from a credit is observed as the credit, with
    /// how much of it had been sent with the call, the call included, in this window's measure
    /// (migration 0013).
    fn push(
        &mut self,
        kind: ScopeKind,
        scope: &str,
        limit: &LimitConfig,
        seen: &QuotaObservation,
        observed: &Permit,
        now: SystemTime,
    ) {
        let (measure, declared) = super::quota::measure_of(limit);
        let sent = observed.credit_sent.filter(|_| observed.from_credit).map(|(requests, tokens)| match measure {
            QuotaMeasure::Requests => requests,
            QuotaMeasure::Tokens => tokens,
        });
        self.kinds.push(kind.as_str());
        self.scopes.push(scope.to_string());
        self.measures.push(measure_name(measure));
        self.window_ms.push(saturating_i64(limit.per.as_millis()));
        self.calendars.push(limit.resets.as_ref().map(|r| r.to_string()).unwrap_or_default());
        self.declared.push(saturating_i64(declared));
        self.remaining.push(saturating_i64(seen.remaining));
        self.leaves_ms.push(epoch_ms(super::quota::learnt_leaves(limit, seen.resets_at, now)));
        self.sent.push(sent.map(saturating_i64));
    }

    async fn observe(self, pool: &PgPool, call: Option<i64>) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT fallback_observe_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
            .bind(&self.kinds)
            .bind(&self.scopes)
            .bind(&self.measures)
            .bind(&self.window_ms)
            .bind(&self.calendars)
            .bind(&self.declared)
            .bind(&self.remaining)
            .bind(&self.leaves_ms)
            .bind(call)
            .bind(&self.sent)
            .execute(pool)
            .await
            .map(|_| ())
    }
}

impl PgStore {
    /// Writes a cooldown (only ever forward) and tells every worker in the same statement.
    async fn share_cooldown(&self, provider: &str, cooldown: &Cooldown) -> Result<(), sqlx::Error> {
        // `Cooldown::replaces` in SQL: later, a circuit reopened, or the provider's own time,
        // still to come, over our guess of a 429's (a guessed daily reset only by a daily one).
        macro_rules! replaces {
            () => {
                "(EXCLUDED.cooldown_until > s.cooldown_until \
                  OR (EXCLUDED.cooldown_reason = 'circuit' AND s.cooldown_reason = 'circuit') \
                  OR (EXCLUDED.cooldown_until > now() AND ( \
                        (EXCLUDED.cooldown_reason IN ('rate_limited', 'quota_day') \
                         AND s.cooldown_reason = 'rate_limited_estimate') \
                     OR (EXCLUDED.cooldown_reason = 'quota_day' AND s.cooldown_reason = 'quota_day_estimate'))))"
            };
        }
        sqlx::query(concat!(
            "WITH up AS ( \
               INSERT INTO provider_state AS s (provider, cooldown_until, cooldown_reason, cooldown_detail, last_error, last_error_at) \
               VALUES ($1, to_timestamp($2::float8 / 1000), $3, $4, $4, now()) \
               ON CONFLICT (provider) DO UPDATE SET \
                 cooldown_reason = CASE WHEN ", replaces!(), " THEN EXCLUDED.cooldown_reason ELSE s.cooldown_reason END, \
                 cooldown_detail = CASE WHEN ", replaces!(), " THEN EXCLUDED.cooldown_detail ELSE s.cooldown_detail END, \
                 cooldown_until = CASE WHEN ", replaces!(), " THEN EXCLUDED.cooldown_until ELSE s.cooldown_until END, \
                 last_error = EXCLUDED.last_error, last_error_at = now(), updated_at = now() \
               RETURNING s.provider, s.cooldown_until, s.cooldown_reason, s.cooldown_detail) \
             SELECT pg_notify($5, json_build_object('provider', provider, \
               'until_ms', fallback_epoch_ms(cooldown_until), \
               'reason', cooldown_reason, 'detail', cooldown_detail)::text) FROM up",
        ))
        .bind(provider)
        .bind(epoch_ms(cooldown.until) as f64)
        .bind(cooldown.reason.as_str())
        // Postgres text cannot hold NUL; a provider's message may.
        .bind(cooldown.detail.replace('\0', ""))
        .bind(CHANNEL)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Sends a ledger request to the batching task, unless the database is known to be down.
    async fn ledger_call<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Request,
    ) -> Result<T, StoreError> {
        self.batched_call(self.ledger(), request).await
    }

    /// Sends a request to a batching task (the ledger's, or admissions' and finishes'), unless
    /// the database is known to be down, and waits for its answer, all within
    /// [`STATE_CALL_TIMEOUT`].
    async fn batched_call<R, T>(
        &self,
        queue: &mpsc::Sender<R>,
        request: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> R,
    ) -> Result<T, StoreError> {
        let deadline = tokio::time::Instant::now() + STATE_CALL_TIMEOUT;
        let answer = self.enqueue(queue, request, deadline).await?;
        self.answer_of(Caller::Job, answer, deadline).await
    }

    /// Puts one request in a batcher's queue, the queue's room waited for within `deadline`:
    /// once this returns, every later request of this process is behind it.
    async fn enqueue<R, T>(
        &self,
        queue: &mpsc::Sender<R>,
        request: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> R,
        deadline: tokio::time::Instant,
    ) -> Result<oneshot::Receiver<Result<T, StoreError>>, StoreError> {
        if self.is_degraded() {
            return Err(StoreError::Unreachable("the database is down".into()));
        }
        let (reply, answer) = oneshot::channel();
        match tokio::time::timeout_at(deadline, queue.send(request(reply))).await {
            Ok(Ok(())) => Ok(answer),
            Ok(Err(_)) => Err(closed()),
            Err(_) => Err(self.gave_up_in_queue("the batching queue is full")),
        }
    }

    /// The batch's answer to one request, within `deadline`: a batch that cannot answer in
    /// time counts towards marking the database down, as any state call does.
    async fn answer_of<T>(
        &self,
        caller: Caller,
        answer: oneshot::Receiver<Result<T, StoreError>>,
        deadline: tokio::time::Instant,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout_at(deadline, answer).await {
            // The batch's own "busy" (no connection in time, a kept connection lost): one per
            // request of the batch, so it counts as a give-up does, only while the batches hear
            // nothing; a kept connection whose session ended is not an outage.
            Ok(Ok(Err(StoreError::Busy(why)))) => Err(self.gave_up_in_queue(&why)),
            // Only a batch's statement cancelled for its time comes back so (`ledger_batcher::describe`).
            Ok(Ok(Err(StoreError::Cancelled(why)))) => {
                self.outage.timeouts_in_a_row.store(0, Ordering::Relaxed);
                Err(self.cancelled(caller, true, why))
            }
            Ok(Ok(Err(StoreError::Unreachable(why)))) => {
                self.went_down(&why);
                Err(StoreError::Unreachable(why))
            }
            Ok(Ok(answer)) => {
                self.outage.timeouts_in_a_row.store(0, Ordering::Relaxed);
                self.not_cancelled();
                answer
            }
            Ok(Err(_)) => Err(closed()),
            Err(_) => Err(self.gave_up_in_queue(&format!("no answer from the batch within {STATE_CALL_TIMEOUT:?}"))),
        }
    }

    /// A batched call given up on at its deadline. Its deadline counts from when it was queued,
    /// so it may have waited behind a batch Postgres cancelled for its time and gone out with
    /// less than the whole statement bound left: while the database answers the batches'
    /// statements (a cancellation is an answer) that shows a busy database, not an absent one,
    /// and counts towards nothing. It counts as a timeout once no batch has heard from the
    /// database past the bound ([`OUTLASTED`]), which an answering database never lets happen
    /// while batches wait.
    fn gave_up_in_queue(&self, what: &str) -> StoreError {
        if !self.last_answer.answering(monotonic_ms()) {
            return self.timed_out(what);
        }
        StoreError::Busy(format!("{what} (the database answered a batch within {OUTLASTED:?})"))
    }
}

#[async_trait::async_trait]
impl ResultLedger for PgStore {
    async fn open(&self, key: &str, fingerprint: &str, receipt: Receipt) -> Result<LedgerEntry, StoreError> {
        let (key, fingerprint) = (key.to_string(), fingerprint.to_string());
        self.ledger_call(|reply| Request::Open { key, fingerprint, receipt, reply }).await
    }

    async fn store(&self, key: &str, fingerprint: &str, result_json: &str) -> Result<(), StoreError> {
        let (key, fingerprint, json) = (key.to_string(), fingerprint.to_string(), result_json.to_string());
        self.ledger_call(|reply| Request::Store { key, fingerprint, json, reply }).await
    }

    async fn record_failure(&self, key: &str, reason: &str) -> Result<u32, StoreError> {
        let count = self
            .guarded(
                sqlx::query_scalar::<_, i32>(
                    "INSERT INTO delivery_failures AS f (delivery_key, last_reason) VALUES ($1, $2) \
                     ON CONFLICT (delivery_key) DO UPDATE SET failures = f.failures + 1, \
                       last_reason = EXCLUDED.last_reason, last_at = now() \
                     RETURNING failures",
                )
                .bind(key)
                .bind(reason)
                .fetch_one(&self.pool),
            )
            .await?;
        Ok(u32::try_from(count).unwrap_or(0))
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("the batching task stopped".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds cancelled calls at `times` (ms) into a fresh run: when each took the database for down.
    fn trips_of(times: &[u64]) -> Vec<Option<Duration>> {
        let mut run = None;
        times
            .iter()
            .map(|&now| {
                let (next, tripped) = CancelledRun::one_more(run, now);
                run = next;
                tripped
            })
            .collect()
    }

    #[test]
    fn three_cancelled_calls_over_four_seconds_take_the_database_for_down_and_end_the_run() {
        let trips = trips_of(&[1_000, 2_500, 4_000, 5_000, 6_500, 8_000, 9_500]);
        let at: Vec<usize> = trips.iter().enumerate().filter(|(_, t)| t.is_some()).map(|(i, _)| i).collect();
        // The 4th call is 4 s after the first (3+ calls); the run starts again with the 5th.
        assert_eq!(at, [3], "{trips:?}");
        assert_eq!(trips[3], Some(Duration::from_millis(4_000)));
    }

    #[test]
    fn many_cancelled_calls_at_once_are_a_busy_moment_not_an_outage() {
        assert!(trips_of(&[1_000; 50]).iter().all(Option::is_none));
        assert!(trips_of(&[1_000, 1_500, 2_000, 2_900, 3_900, 4_999]).iter().all(Option::is_none));
    }

    #[test]
    fn cancelled_calls_further_apart_than_the_run_allows_never_add_up() {
        let apart = [0, 4_001, 8_002, 12_003, 16_004, 3_600_000, 3_601_000];
        assert!(trips_of(&apart).iter().all(Option::is_none), "{:?}", trips_of(&apart));
        // Within the gap they do, however long the run.
        assert!(trips_of(&[0, 4_000, 8_000]).last().is_some_and(Option::is_some));
    }

    /// A store whose admissions and answers go to the returned queue instead of a batcher
    /// (no database: the pool is lazy and never used).
    fn store_with_quota_queue() -> (PgStore, mpsc::Receiver<quota_batcher::Request>) {
        let store = PgStore::connect_lazy("postgres://postgres@127.0.0.1:1/none", 2).unwrap();
        let (sender, receiver) = mpsc::channel(8);
        assert!(store.quota.set(sender).is_ok());
        (store, receiver)
    }

    /// Calls that waited behind a credit ask that failed (the provider's row held elsewhere)
    /// ask one by one, together, rather than each asking for a credit in turn (a lock timeout
    /// each, one after another).
    #[tokio::test]
    async fn calls_waiting_behind_a_failed_credit_ask_ask_one_by_one_together() {
        let (store, mut queue) = store_with_quota_queue();
        store.outage.listening.store(true, Ordering::SeqCst);
        store.heard();
        let limits =
            [LimitConfig { requests: Some(100_000), tokens: None, per: Duration::from_secs(3600), resets: None }];
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (store, limits) = (store.clone(), limits.clone());
            calls.spawn(async move {
                let ask =
                    Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: Duration::from_secs(30) };
                store.admit(ask, SystemTime::now()).await
            });
        }
        let Some(quota_batcher::Request::Admit(credit)) = queue.recv().await else { panic!("no ask") };
        assert_eq!(credit.requests, Some(64), "a credit ask first");
        credit.reply.send(Err(StoreError::Unavailable("the provider's row is held elsewhere".into()))).ok();
        for _ in 0..3 {
            let Some(quota_batcher::Request::Admit(one)) = queue.recv().await else { panic!("no ask") };
            assert_eq!(one.requests, None, "the waiting calls ask one by one");
            let decision = quota_batcher::Decision { usage_id: Some(1), blocked_until_ms: None, blocked_by: None };
            one.reply.send(Ok(decision)).ok();
        }
        let mut granted = 0;
        while let Some(admission) = calls.join_next().await {
            granted += usize::from(matches!(admission.unwrap(), Admission::Granted(_)));
        }
        assert_eq!(granted, 3);
    }

    fn answered_permit() -> Permit {
        Permit {
            usage_id: Some(7),
            local_id: None,
            provider: Some(Arc::from("groq")),
            estimate: 100,
            from_credit: false,
            credit_sent: None,
        }
    }

    #[tokio::test]
    async fn a_calls_answer_is_queued_before_finish_returns_and_recorded_without_the_job_waiting() {
        let (store, mut queue) = store_with_quota_queue();
        store.finish(answered_permit(), Some(42), SystemTime::now()).await;
        // Queued before `finish` returned: every later ask of this process comes after it.
        let Ok(quota_batcher::Request::Finish(answer)) = queue.try_recv() else { panic!("the answer was not queued") };
        assert_eq!((answer.write.call, answer.write.tokens), (7, Some(42)));
        // Nobody has answered it yet, and the job went on: the wait for it is detached.
        assert!(!answer.reply.is_closed(), "the answer's recording was given up on");
        let mut recorded = std::pin::pin!(store.answers_recorded());
        assert!(
            futures_lite::future::poll_once(recorded.as_mut()).await.is_none(),
            "a stopping worker must wait for it"
        );
        answer.reply.send(Ok(())).ok();
        recorded.await;
        assert!(!store.is_degraded());
    }

    #[tokio::test]
    async fn an_answer_whose_headers_follow_is_written_before_finish_written_returns() {
        let (store, mut queue) = store_with_quota_queue();
        let mut written = std::pin::pin!(store.finish_written(answered_permit(), Some(42), SystemTime::now()));
        assert!(futures_lite::future::poll_once(written.as_mut()).await.is_none(), "it waits for the write");
        let Ok(quota_batcher::Request::Finish(answer)) = queue.try_recv() else { panic!("the answer was not queued") };
        answer.reply.send(Ok(())).ok();
        written.await;
    }

    /// `store`'s admissions of `groq` prepared one window of `measure`, of `kind`.
    fn prepared(store: &PgStore, kind: ScopeKind, measure: QuotaMeasure) {
        let key =
            WindowKey { kind, scope: "groq".into(), measure, window: Duration::from_secs(60), calendar: String::new() };
        let windows = Arc::new(quota_batcher::Windows::new(vec![WindowSpec { key, limit: 1000, reset: None }]));
        let prepared = ProviderWindows { limits: Vec::new(), pools: Vec::new(), windows };
        store.windows.lock().unwrap().insert("groq".into(), prepared);
    }

    /// Whether `finish` of the answered permit with `tokens` returned before its batch answered.
    async fn returns_before_the_write(
        store: &PgStore,
        queue: &mut mpsc::Receiver<quota_batcher::Request>,
        tokens: u64,
    ) -> bool {
        let mut finish = std::pin::pin!(store.finish(answered_permit(), Some(tokens), SystemTime::now()));
        let returned = futures_lite::future::poll_once(finish.as_mut()).await.is_some();
        let Ok(quota_batcher::Request::Finish(answer)) = queue.try_recv() else { panic!("the answer was not queued") };
        answer.reply.send(Ok(())).ok();
        if !returned {
            finish.await;
        }
        returned
    }

    #[tokio::test]
    async fn only_an_answer_other_workers_or_pool_mates_must_see_first_holds_the_job() {
        // The call was admitted with an estimate of 100 tokens.
        let (store, mut queue) = store_with_quota_queue();
        prepared(&store, ScopeKind::Provider, QuotaMeasure::Tokens);
        assert!(returns_before_the_write(&store, &mut queue, 60).await, "a lowered count can follow");
        assert!(returns_before_the_write(&store, &mut queue, 100).await, "so can the estimate itself");
        assert!(!returns_before_the_write(&store, &mut queue, 101).await, "a raised count is written first");
        prepared(&store, ScopeKind::Provider, QuotaMeasure::Requests);
        assert!(returns_before_the_write(&store, &mut queue, 5000).await, "no token window to raise");
        prepared(&store, ScopeKind::Pool, QuotaMeasure::Requests);
        assert!(!returns_before_the_write(&store, &mut queue, 60).await, "a pool mate's ask is not behind it");
    }

    #[tokio::test]
    async fn a_detached_answer_that_finds_the_database_gone_marks_it_down() {
        let (store, mut queue) = store_with_quota_queue();
        store.finish(answered_permit(), None, SystemTime::now()).await;
        let Ok(quota_batcher::Request::Finish(answer)) = queue.try_recv() else { panic!("the answer was not queued") };
        answer.reply.send(Err(StoreError::Unreachable("connection refused".into()))).ok();
        store.answers_recorded().await;
        assert!(store.is_degraded(), "an answer that could not be recorded is a state call like any other");
        // Down: the next answer is not even queued (its slot frees when the call expires).
        store.finish(answered_permit(), None, SystemTime::now()).await;
        assert!(queue.try_recv().is_err());
    }

    fn limit(requests: Option<u64>, tokens: Option<u64>, secs: u64) -> LimitConfig {
        LimitConfig { requests, tokens, per: Duration::from_secs(secs), resets: None }
    }

    #[test]
    fn a_kept_refusal_changes_only_with_what_a_decision_says_of_it() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let (soon, later) = (now + Duration::from_secs(5), now + Duration::from_secs(50));
        let tokens_block = |until, tokens| Some(QuotaBlock { until, measure: QuotaMeasure::Tokens, tokens });
        let over = |until, measure| Admission::OverQuota { until, measure };
        let granted = Admission::Granted(Permit::UNCOUNTED);
        let kept = |b: Option<QuotaBlock>| b.map(|b| (b.until, b.measure, b.tokens));
        // Refusals: requests stand for every ask; of two token refusals, the smaller ask's.
        let after = QuotaBlock::after(tokens_block(later, 500), &over(soon, QuotaMeasure::Requests), 900, now);
        assert_eq!(kept(after), Some((soon, QuotaMeasure::Requests, 900)));
        let after = QuotaBlock::after(tokens_block(later, 500), &over(soon, QuotaMeasure::Tokens), 20, now);
        assert_eq!(kept(after), Some((soon, QuotaMeasure::Tokens, 20)));
        let after = QuotaBlock::after(tokens_block(soon, 20), &over(later, QuotaMeasure::Tokens), 500, now);
        assert_eq!(kept(after), Some((soon, QuotaMeasure::Tokens, 20)), "in any order");
        let requests = Some(QuotaBlock { until: soon, measure: QuotaMeasure::Requests, tokens: 1 });
        let after = QuotaBlock::after(requests, &over(later, QuotaMeasure::Tokens), 500, now);
        assert_eq!(kept(after), Some((soon, QuotaMeasure::Requests, 1)));
        // Grants end what they disprove, and nothing else.
        assert_eq!(
            kept(QuotaBlock::after(tokens_block(later, 500), &granted, 50, now)),
            Some((later, QuotaMeasure::Tokens, 500))
        );
        assert_eq!(kept(QuotaBlock::after(tokens_block(later, 500), &granted, 500, now)), None);
        assert_eq!(kept(QuotaBlock::after(requests, &granted, 1, now)), None);
        // An expired refusal is not kept; decisions that say nothing of room keep nothing.
        assert_eq!(kept(QuotaBlock::after(tokens_block(now, 500), &granted, 50, now)), None);
        assert_eq!(kept(QuotaBlock::after(tokens_block(later, 500), &Admission::TooLarge, 50, now)), None);
    }

    #[test]
    fn windows_less_than_a_millisecond_apart_are_the_one_window_the_tables_key() {
        let mut limits = [limit(Some(5), None, 1), limit(Some(2), None, 1), limit(Some(7), None, 1)];
        limits[0].per += Duration::from_micros(1);
        limits[2].per += Duration::from_micros(999);
        let windows: Vec<_> = windows_of("p", &limits, &[]).into_iter().map(|w| (w.key.window, w.limit)).collect();
        assert_eq!(windows, vec![(Duration::from_secs(1), 2)], "one window of 1000 ms, the stricter limit");
        let huge = [LimitConfig { per: Duration::MAX, ..limit(Some(1), None, 1) }];
        let window = windows_of("p", &huge, &[]).into_iter().map(|w| w.key.window).next();
        // Far past what the config accepts (3650d), and still a window the tables can key.
        assert_eq!(window, Some(Duration::from_millis(i64::MAX as u64)), "as long as a bigint says");
    }

    #[test]
    fn two_limits_on_one_measure_and_window_are_one_running_total_the_stricter() {
        let limits = [
            limit(Some(4), None, 60),
            limit(Some(2), None, 60),
            limit(None, Some(500), 60),
            limit(Some(9), None, 3600),
        ];
        let windows: Vec<_> =
            windows_of("p", &limits, &[]).into_iter().map(|w| ((w.key.measure, w.key.window), w.limit)).collect();
        assert_eq!(
            windows,
            vec![
                ((QuotaMeasure::Requests, Duration::from_secs(60)), 2),
                ((QuotaMeasure::Requests, Duration::from_secs(3600)), 9),
                ((QuotaMeasure::Tokens, Duration::from_secs(60)), 500),
            ]
        );
    }

    #[test]
    fn pool_windows_are_their_own_kind_and_a_calendar_day_is_not_the_sliding_day() {
        let mut daily = limit(Some(50), None, 86_400);
        daily.resets = Some(crate::calendar::DailyReset::parse("00:00 UTC").unwrap());
        let pools = [QuotaPoolConfig { name: "p".into(), limits: vec![daily.clone(), limit(Some(20), None, 60)] }];
        let windows = windows_of("p", &[limit(Some(10), None, 86_400), daily], &pools);
        let keys: Vec<_> =
            windows.iter().map(|w| (w.key.kind, w.key.scope.as_str(), w.key.calendar.as_str(), w.limit)).collect();
        assert_eq!(
            keys,
            vec![
                (ScopeKind::Pool, "p", "", 20),
                (ScopeKind::Pool, "p", "00:00 UTC", 50),
                (ScopeKind::Provider, "p", "", 10),
                (ScopeKind::Provider, "p", "00:00 UTC", 50),
            ],
            "a provider and a pool of the same name never share a window; the order is the lock order"
        );
        assert!(ScopeKind::Pool.as_str() < ScopeKind::Provider.as_str(), "Rust's order is SQL's byte order");
    }
}
