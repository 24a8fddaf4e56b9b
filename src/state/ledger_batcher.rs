//! The result ledger's queries, batched: every job does one `open` and one `store`, and under
//! load dozens are in flight at once. Requests that arrive while a query runs go out together
//! in the next one (no added delay when idle), which saves most of a round trip per job.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Postgres, Row};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::last_answer::LastAnswer;
use super::postgres::monotonic_ms;
use super::{LedgerEntry, Receipt, StoreError};

/// Largest batch sent in one query.
pub(super) const MAX_BATCH: usize = 128;

pub enum Request {
    Open { key: String, fingerprint: String, receipt: Receipt, reply: oneshot::Sender<Result<LedgerEntry, StoreError>> },
    Store { key: String, fingerprint: String, json: String, reply: oneshot::Sender<Result<(), StoreError>> },
}

impl Request {
    fn key(&self) -> &str {
        match self {
            Request::Open { key, .. } | Request::Store { key, .. } => key,
        }
    }
}

/// Starts the batching task; it ends when every sender is gone.
pub fn spawn(pool: PgPool, heard: Arc<LastAnswer>) -> mpsc::Sender<Request> {
    let (sender, receiver) = mpsc::channel(1024);
    tokio::spawn(run(pool, heard, receiver));
    sender
}

/// Batches in flight at most. One batch at a time leaves a worker waiting a round trip per
/// batch (the `open` before a call, then the `store` after it, one after the other); a second
/// one goes out while the first runs, on an idle connection, and only when the pool keeps one
/// more connection for everything else (`postgres.max_connections` ≥ 4: the default 3 — the
/// listener and two in the pool — sends one batch at a time), so slow batches never take the
/// connections admissions and cooldowns need.
const MAX_IN_FLIGHT: usize = 2;

/// How many batches a batcher may have in flight on `pool`: never more than its connections but
/// one, which always stays for the other state calls, and at most [`MAX_IN_FLIGHT`].
pub(super) fn batches_in_flight(pool: &PgPool) -> usize {
    usize::try_from(pool.options().get_max_connections()).unwrap_or(1).saturating_sub(1).clamp(1, MAX_IN_FLIGHT)
}

/// The longest one batch may take: a batch whose connection died without a close (no RST)
/// would otherwise never end, and every later request for its keys (and, behind them, every
/// other) would wait for it. Its callers gave up long before (after `STATE_CALL_TIMEOUT`).
const BATCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn run(pool: PgPool, heard: Arc<LastAnswer>, mut receiver: mpsc::Receiver<Request>) {
    let max_in_flight = batches_in_flight(&pool);
    let mut closed = false;
    let mut deferred: Vec<Request> = Vec::new();
    // Keys of the batches in flight: concurrent batches never share a key, so they never wait
    // on each other's row locks (nor deadlock).
    let mut busy = Busy::default();
    let mut in_flight: JoinSet<Option<PoolConnection<Postgres>>> = JoinSet::new();
    let mut leases = Leases::new(pool.clone());
    loop {
        while in_flight.len() >= max_in_flight || (!in_flight.is_empty() && leases.available() == 0) {
            leases.keep(busy.release(in_flight.join_next_with_id().await));
        }
        let mut batch = std::mem::take(&mut deferred);
        if batch.is_empty() {
            if closed {
                break;
            }
            if receiver.is_empty() {
                leases.release();
            }
            tokio::select! {
                request = receiver.recv() => match request {
                    Some(request) => batch.push(request),
                    None => break,
                },
                // A batch ended: look again whether another may go out.
                ended = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                    leases.keep(busy.release(ended));
                    continue;
                }
            }
        }
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        // One statement cannot touch a row twice: a key seen twice, or in flight, waits.
        let (mut now, later) = first_of_each_key(batch, &busy.keys);
        deferred = later;
        if now.is_empty() {
            // Everything waits for a key in flight: wait for a batch to end, or for a request
            // of another key (which must not wait behind the slow batch), not in a spin. A kept
            // connection goes back to the pool meanwhile rather than idle beside a slow batch.
            leases.release();
            tokio::select! {
                ended = in_flight.join_next_with_id() => leases.keep(busy.release(ended)),
                request = receiver.recv(), if !closed && deferred.len() < MAX_BATCH => match request {
                    Some(request) => deferred.push(request),
                    None => closed = true,
                },
            }
            continue;
        }
        // Opens are locked in key order, then stores in key order. Two batches of this process
        // never share a key; two workers' batches can still cross (one opens k1 and stores k2,
        // the other opens k2 and stores k1: duplicated jobs) and Postgres then aborts one after
        // `deadlock_timeout`: that batch's callers get an error and the jobs go on (rare, ~1 s).
        now.sort_by(|a, b| a.key().cmp(b.key()));
        let keys: Vec<String> = now.iter().map(|r| r.key().to_string()).collect();
        // Bounded inside (`BATCH_TIMEOUT`): a batch is never dropped while its query runs.
        // Boxed: the batch's future (its sqlx statements) is kilobytes, copied several times on
        // its way into a task otherwise (measured: 7 % of the worker's instructions per job).
        let task = in_flight.spawn(Box::pin(execute(pool.clone(), heard.clone(), leases.take(), now)));
        busy.hold(task.id(), keys);
    }
    while in_flight.join_next().await.is_some() {}
    leases.release();
}

/// The keys of the batches in flight, by batch task.
#[derive(Default)]
struct Busy {
    keys: HashSet<String>,
    by_task: HashMap<tokio::task::Id, Vec<String>>,
}

impl Busy {
    fn hold(&mut self, task: tokio::task::Id, keys: Vec<String>) {
        self.keys.extend(keys.iter().cloned());
        self.by_task.insert(task, keys);
    }

    /// Frees the keys of a batch that ended, whether it finished or failed, and gives back
    /// what it handed back (its connection, when still usable).
    fn release<T>(&mut self, ended: Option<Result<(tokio::task::Id, Option<T>), tokio::task::JoinError>>) -> Option<T> {
        let (task, handed_back) = match ended {
            Some(Ok((task, handed_back))) => (task, handed_back),
            Some(Err(error)) => (error.id(), None),
            None => return None,
        };
        for key in self.by_task.remove(&task).unwrap_or_default() {
            self.keys.remove(&key);
        }
        handed_back
    }
}

/// Sends one batch (on `leased`, the previous batch's connection, when there is one): opens
/// and stores that wait together go out in one round trip. Hands back its connection when it
/// is still usable.
async fn execute(
    pool: PgPool,
    heard: Arc<LastAnswer>,
    leased: Option<PoolConnection<Postgres>>,
    batch: Vec<Request>,
) -> Option<PoolConnection<Postgres>> {
    let mut conn = match BatchConnection::acquire(&pool, leased, heard).await {
        Ok(conn) => conn,
        Err(failed) => {
            for request in batch {
                match request {
                    Request::Open { reply, .. } => drop(reply.send(Err(failed.to_store_error()))),
                    Request::Store { reply, .. } => drop(reply.send(Err(failed.to_store_error()))),
                }
            }
            return None;
        }
    };
    let (opens, stores): (Vec<Request>, Vec<Request>) =
        batch.into_iter().partition(|r| matches!(r, Request::Open { .. }));
    match (opens.is_empty(), stores.is_empty()) {
        (true, true) => {}
        (false, true) => open_all(&mut conn, opens, Vec::new()).await,
        (true, false) => store_all(&mut conn, stores).await,
        // Under load both kinds wait: one round trip serves them together.
        (false, false) => open_all(&mut conn, opens, stores).await,
    }
    conn.into_reusable()
}

/// A batch's own connection, and how long the batch may still use it.
///
/// A statement still running at the deadline (its connection died without a close, or a long
/// lock wait) leaves the connection closed, never returned to the pool: sqlx tests a returned
/// connection with a ping that has no timeout, and on a dead connection that ping holds one of
/// the pool's slots for the process's life (two such batches and the default pool has none).
/// Dropping a batch future mid-query, as a timeout around the whole batch did, returns it so.
pub(super) struct BatchConnection {
    conn: PoolConnection<Postgres>,
    deadline: tokio::time::Instant,
    timed_out: bool,
    /// A statement failed as on a lost connection: it is not kept for the next batch.
    suspect: bool,
    /// Kept from the previous batch, so not pinged before its first statement.
    unchecked: bool,
    /// Told of every answer the database gives the batch (see [`LastAnswer`]).
    heard: Arc<LastAnswer>,
}

impl BatchConnection {
    /// A connection for a batch that may take [`BATCH_TIMEOUT`] in all (the wait included):
    /// `kept`, the previous batch's, when there is one, else one of `pool`.
    pub(super) async fn acquire(
        pool: &PgPool,
        kept: Option<PoolConnection<Postgres>>,
        heard: Arc<LastAnswer>,
    ) -> Result<BatchConnection, Failed> {
        let deadline = tokio::time::Instant::now() + BATCH_TIMEOUT;
        let unchecked = kept.is_some();
        let conn = match kept {
            Some(conn) => conn,
            None => Self::pooled(pool, deadline).await?,
        };
        Ok(BatchConnection { conn, deadline, timed_out: false, suspect: false, unchecked, heard })
    }

    async fn pooled(pool: &PgPool, deadline: tokio::time::Instant) -> Result<PoolConnection<Postgres>, Failed> {
        match tokio::time::timeout_at(deadline, pool.acquire()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(describe(&e)),
            Err(_) => Err(Failed::busy("no connection for the batch in time")),
        }
    }

    /// The connection, for the next batch, when every statement of this one answered (an
    /// error the database gave is an answer; a lost connection or a timeout is not).
    pub(super) fn into_reusable(self) -> Option<PoolConnection<Postgres>> {
        (!self.timed_out && !self.suspect).then_some(self.conn)
    }

    /// Runs one statement, until the batch's deadline at most; after a statement that did not
    /// end in time, the connection is not used again.
    pub(super) async fn run<T>(
        &mut self,
        statement: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, Failed> {
        if self.timed_out {
            return Err(Failed::busy("the batch ran out of time"));
        }
        let unchecked = std::mem::take(&mut self.unchecked);
        let sent = monotonic_ms();
        let outcome = tokio::time::timeout_at(self.deadline, statement(&mut *self.conn)).await;
        if let Ok(Ok(_) | Err(sqlx::Error::Database(_))) = &outcome {
            self.heard.answered(sent, monotonic_ms());
        }
        match outcome {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => {
                let failed = describe(&e);
                self.suspect |= failed.is_lost_connection();
                // The session of a connection kept from the last batch may have ended since
                // (terminated by an operator, say) while the database is up: that batch fails,
                // the worker does not switch to its own view for it (the next batch takes a
                // pooled connection, which the pool pings first).
                if unchecked && failed.is_lost_connection() {
                    return Err(Failed::busy(&format!("the kept connection was lost: {e}")));
                }
                Err(failed)
            }
            Err(_) => {
                self.timed_out = true;
                self.conn.close_on_drop();
                Err(Failed::busy("the batch ran out of time"))
            }
        }
    }
}

/// The connections a batcher keeps from one batch to the next while requests keep waiting.
///
/// sqlx pings a connection when it goes back to the pool and again when it is taken from it,
/// each a round trip: three round trips per batch where its statement needs one. Under load a
/// batch ends with the next one's requests already waiting, so its connection goes straight to
/// that batch. It goes back to the pool as soon as nothing waits, and is kept only while the
/// pool still has a connection for the other state calls, or room to open one (a cooldown
/// write must never wait behind a batcher's idle connection).
pub(super) struct Leases {
    pool: PgPool,
    idle: Vec<PoolConnection<Postgres>>,
}

impl Leases {
    pub(super) fn new(pool: PgPool) -> Leases {
        Leases { pool, idle: Vec::new() }
    }

    /// A kept connection, if there is one.
    pub(super) fn take(&mut self) -> Option<PoolConnection<Postgres>> {
        self.idle.pop()
    }

    /// Keeps the connection a batch handed back (none when it was lost), or returns it to the
    /// pool when the other state calls would have none left.
    pub(super) fn keep(&mut self, conn: Option<PoolConnection<Postgres>>) {
        let Some(conn) = conn else { return };
        let max = self.pool.options().get_max_connections();
        if self.pool.num_idle() > 0 || self.pool.size() < max {
            self.idle.push(conn);
        }
    }

    /// Nothing waits: every kept connection goes back to the pool.
    pub(super) fn release(&mut self) {
        self.idle.clear();
    }

    /// Connections a new batch could use at once.
    pub(super) fn available(&self) -> usize {
        self.idle.len().saturating_add(self.pool.num_idle())
    }
}

/// Splits `batch` into the first request of each key not `busy` and the rest (kept in order).
fn first_of_each_key(batch: Vec<Request>, busy: &HashSet<String>) -> (Vec<Request>, Vec<Request>) {
    let mut seen = HashSet::with_capacity(batch.len());
    let firsts: Vec<bool> = batch.iter().map(|r| !busy.contains(r.key()) && seen.insert(r.key())).collect();
    drop(seen);
    let (mut now, mut later) = (Vec::with_capacity(batch.len()), Vec::new());
    for (request, first) in batch.into_iter().zip(firsts) {
        if first { now.push(request) } else { later.push(request) }
    }
    (now, later)
}

/// The statement that stores results: keys, fingerprints and results as three text arrays (the
/// parameters' numbers given), leaving a key that belongs to another job as it is.
macro_rules! store_sql {
    ($keys:literal, $fingerprints:literal, $results:literal) => {
        concat!(
            "INSERT INTO job_results (job_key, fingerprint, result, answered_at) \
             SELECT k, f, r, now() FROM unnest(",
            $keys,
            "::text[], ",
            $fingerprints,
            "::text[], ",
            $results,
            "::text[]) AS t(k, f, r) \
             ON CONFLICT (job_key) DO UPDATE SET result = EXCLUDED.result, answered_at = now(), \
               fingerprint = coalesce(job_results.fingerprint, EXCLUDED.fingerprint) \
             WHERE job_results.fingerprint IS NULL OR job_results.fingerprint = EXCLUDED.fingerprint"
        )
    };
}

/// The statement that counts receipts (`$1` keys, `$2` fingerprints, `$3` each receipt's
/// deliveries: [`Receipt::first_count`] for a new key), unless a key belongs to another job (a
/// reused `message_id`): then nothing is counted and the row's own fingerprint comes back. A
/// known key counts only a redelivery (a first count of 2). A result stored before keys were
/// bound to jobs (no fingerprint) stays unbound.
macro_rules! open_sql {
    () => {
        "INSERT INTO job_results (job_key, fingerprint, deliveries) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::int[]) \
         ON CONFLICT (job_key) DO UPDATE SET \
           deliveries = job_results.deliveries + CASE \
             WHEN EXCLUDED.deliveries > 1 \
              AND (job_results.fingerprint IS NULL OR job_results.fingerprint = EXCLUDED.fingerprint) THEN 1 ELSE 0 END, \
           fingerprint = CASE WHEN job_results.fingerprint IS NULL AND job_results.result IS NULL \
             THEN EXCLUDED.fingerprint ELSE job_results.fingerprint END \
         RETURNING job_key, deliveries, result, fingerprint"
    };
}

/// Counts one receipt of each key of `opens` and answers what the ledger knows of it; the
/// results of `stores`, when there are any, are written in the same statement (and, should that
/// fail, on their own).
async fn open_all(conn: &mut BatchConnection, opens: Vec<Request>, stores: Vec<Request>) {
    let requests = opens;
    // Borrowed from the requests, which live until they are answered: no copy of any key.
    let (mut keys, mut fingerprints) = (Vec::with_capacity(requests.len()), Vec::with_capacity(requests.len()));
    let mut counts: Vec<i32> = Vec::with_capacity(requests.len());
    for request in &requests {
        if let Request::Open { key, fingerprint, receipt, .. } = request {
            keys.push(key.as_str());
            fingerprints.push(fingerprint.as_str());
            counts.push(i32::try_from(receipt.first_count()).unwrap_or(1));
        }
    }
    let rows = if stores.is_empty() {
        let query = sqlx::query(open_sql!()).bind(&keys).bind(&fingerprints).bind(&counts);
        conn.run(async |c| query.fetch_all(c).await).await
    } else {
        let rows = store_rows_of(&stores);
        let stored = rows.len();
        let together = concat!("WITH stored AS (", store_sql!("$4", "$5", "$6"), " RETURNING 1) ", open_sql!());
        let answer = sqlx::query(together)
            .bind(&keys)
            .bind(&fingerprints)
            .bind(&counts)
            .bind(rows.iter().map(|r| r.0).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.1).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.2).collect::<Vec<_>>());
        let answer = conn.run(async |c| answer.fetch_all(c).await).await;
        if answer.is_ok() {
            reply_to_stores(stores, vec![Ok(()); stored]);
            answer
        } else {
            store_all(conn, stores).await;
            let query = sqlx::query(open_sql!()).bind(&keys).bind(&fingerprints).bind(&counts);
            conn.run(async |c| query.fetch_all(c).await).await
        }
    };
    let answers: Vec<Result<LedgerEntry, StoreError>> = match rows {
        Ok(rows) => entries_of(&keys, &fingerprints, &rows).into_iter().map(|e| e.ok_or_else(no_row)).collect(),
        Err(failed) => keys.iter().map(|_| Err(failed.to_store_error())).collect(),
    };
    let mut answers = answers.into_iter();
    for request in requests {
        if let Request::Open { reply, .. } = request {
            let answer = answers.next().unwrap_or_else(|| Err(no_row()));
            let _ = reply.send(answer);
        }
    }
}

fn no_row() -> StoreError {
    StoreError::Unavailable("the ledger returned no row".into())
}

/// What the ledger knows of each key (in the order of `keys`), from the rows the open statement
/// returned: `None` for a key without a row (or with a row that does not decode).
fn entries_of(keys: &[&str], fingerprints: &[&str], rows: &[PgRow]) -> Vec<Option<LedgerEntry>> {
    let position: HashMap<&str, usize> = keys.iter().enumerate().map(|(i, key)| (*key, i)).collect();
    let mut entries: Vec<Option<LedgerEntry>> = vec![None; keys.len()];
    for row in rows {
        let Ok(key) = row.try_get::<&str, _>("job_key") else { continue };
        let Some(&i) = position.get(key) else { continue };
        let (Ok(deliveries), Ok(result), Ok(owner)) = (
            row.try_get::<i32, _>("deliveries"),
            row.try_get::<Option<String>, _>("result"),
            row.try_get::<Option<&str>, _>("fingerprint"),
        ) else {
            continue;
        };
        let Some(&fingerprint) = fingerprints.get(i) else { continue };
        let other_job = owner.is_some_and(|owner| owner != fingerprint);
        // A result stored before keys were bound to jobs (no fingerprint) may be another job's:
        // it is never served; the job runs again and its result takes the row.
        let result = if owner == Some(fingerprint) { result } else { None };
        let deliveries = u32::try_from(deliveries).unwrap_or(0);
        if let Some(entry) = entries.get_mut(i) {
            *entry = Some(LedgerEntry { deliveries, result, other_job });
        }
    }
    entries
}

/// Stores the results of a batch in one statement; when that fails, each one alone, so that one
/// result the database refuses never costs the others their record.
async fn store_all(conn: &mut BatchConnection, requests: Vec<Request>) {
    let rows = store_rows_of(&requests);
    let together = store_rows(conn, &rows).await;
    let outcomes: Vec<Result<(), Failed>> = match together {
        Ok(()) => vec![Ok(()); rows.len()],
        Err(_) if rows.len() > 1 => {
            let mut each = Vec::with_capacity(rows.len());
            for row in &rows {
                each.push(store_rows(conn, std::slice::from_ref(row)).await);
            }
            each
        }
        Err(e) => vec![Err(e)],
    };
    reply_to_stores(requests, outcomes);
}

/// The `(key, fingerprint, result)` of each store request.
fn store_rows_of(requests: &[Request]) -> Vec<(&str, &str, &str)> {
    requests
        .iter()
        .filter_map(|r| match r {
            Request::Store { key, fingerprint, json, .. } => Some((key.as_str(), fingerprint.as_str(), json.as_str())),
            Request::Open { .. } => None,
        })
        .collect()
}

fn reply_to_stores(requests: Vec<Request>, outcomes: Vec<Result<(), Failed>>) {
    let replies = requests.into_iter().filter_map(|r| match r {
        Request::Store { reply, .. } => Some(reply),
        Request::Open { .. } => None,
    });
    for (reply, outcome) in replies.zip(outcomes) {
        let _ = reply.send(outcome.map_err(|e| e.to_store_error()));
    }
}

/// One statement for `(key, fingerprint, result)` rows.
async fn store_rows(conn: &mut BatchConnection, rows: &[(&str, &str, &str)]) -> Result<(), Failed> {
    let keys: Vec<&str> = rows.iter().map(|r| r.0).collect();
    let fingerprints: Vec<&str> = rows.iter().map(|r| r.1).collect();
    let results: Vec<&str> = rows.iter().map(|r| r.2).collect();
    let query = sqlx::query(store_sql!("$1", "$2", "$3")).bind(&keys).bind(&fingerprints).bind(&results);
    conn.run(async |c| query.execute(c).await.map(|_| ())).await
}

/// A batch's failure, shared by every request in it (sqlx errors cannot be cloned).
#[derive(Debug, Clone)]
pub(super) struct Failed {
    message: String,
    kind: FailedKind,
}

#[derive(Debug, Clone, Copy)]
enum FailedKind {
    /// The database refused this statement.
    Refused,
    /// The database cancelled this statement for its slowness.
    Cancelled,
    /// No connection was free in time.
    Busy,
    /// The database could not be reached.
    Unreachable,
}

impl Failed {
    /// No answer in time (slowness, or a connection that died): as a full pool.
    pub(super) fn busy(message: &str) -> Failed {
        Failed { message: message.to_string(), kind: FailedKind::Busy }
    }

    /// The connection failed, not the statement.
    fn is_lost_connection(&self) -> bool {
        matches!(self.kind, FailedKind::Unreachable)
    }

    pub(super) fn to_store_error(&self) -> StoreError {
        let message = self.message.clone();
        match self.kind {
            FailedKind::Refused => StoreError::Unavailable(message),
            FailedKind::Cancelled => StoreError::Cancelled(message),
            FailedKind::Busy => StoreError::Busy(message),
            FailedKind::Unreachable => StoreError::Unreachable(message),
        }
    }
}

pub(super) fn describe(error: &sqlx::Error) -> Failed {
    let kind = match error {
        sqlx::Error::PoolTimedOut => FailedKind::Busy,
        e if super::postgres::is_transient(e) => FailedKind::Unreachable,
        e if super::postgres::is_statement_timeout(e) => FailedKind::Cancelled,
        _ => FailedKind::Refused,
    };
    Failed { message: error.to_string(), kind }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(key: &str) -> Request {
        let (reply, _) = oneshot::channel();
        Request::Open { key: key.into(), fingerprint: "f".into(), receipt: Receipt::Fresh, reply }
    }

    #[test]
    fn a_key_seen_twice_in_a_batch_waits_for_the_next_one_in_order() {
        let none = HashSet::new();
        let (now, later) = first_of_each_key(["a", "b", "a", "c", "b", "a"].map(open).into(), &none);
        let keys = |requests: &[Request]| requests.iter().map(|r| r.key().to_string()).collect::<Vec<_>>();
        assert_eq!(keys(&now), ["a", "b", "c"]);
        assert_eq!(keys(&later), ["a", "b", "a"]);
        let (now, later) = first_of_each_key(keys(&later).iter().map(|k| open(k)).collect(), &none);
        assert_eq!((keys(&now), keys(&later)), (vec!["a".to_string(), "b".into()], vec!["a".to_string()]));
    }

    #[test]
    fn a_key_in_a_batch_in_flight_waits_until_that_batch_ends() {
        let keys = |requests: &[Request]| requests.iter().map(|r| r.key().to_string()).collect::<Vec<_>>();
        let mut busy = Busy::default();
        let task = tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
            let mut set = JoinSet::new();
            let id = set.spawn(async { None::<()> }).id();
            busy.hold(id, vec!["a".into()]);
            let (now, later) = first_of_each_key(["a", "b"].map(open).into(), &busy.keys);
            assert_eq!((keys(&now), keys(&later)), (vec!["b".to_string()], vec!["a".to_string()]));
            set.join_next_with_id().await
        });
        busy.release(task);
        assert!(busy.keys.is_empty() && busy.by_task.is_empty(), "the ended batch's keys are free again");
        let (now, later) = first_of_each_key(["a"].map(open).into(), &busy.keys);
        assert_eq!((keys(&now).len(), later.len()), (1, 0));
    }

    #[test]
    fn rows_answer_their_own_keys_and_a_missing_row_answers_none() {
        // No rows (the statement returned none for these keys): every key is told so.
        let entries = entries_of(&["k1", "k2"], &["f1", "f2"], &[]);
        assert_eq!(entries, vec![None, None]);
    }
}
