//! The result ledger's queries, batched: every job does one `open` and one `store`, and under
//! load dozens are in flight at once. Requests that arrive while a query runs go out together
//! in the next one (no added delay when idle), which saves most of a round trip per job.

use std::collections::{HashMap, HashSet};

use sqlx::{PgPool, Row};
use tokio::sync::{mpsc, oneshot};

use super::{LedgerEntry, StoreError};

/// Largest batch sent in one query.
const MAX_BATCH: usize = 128;

pub enum Request {
    Open { key: String, fingerprint: String, reply: oneshot::Sender<Result<LedgerEntry, StoreError>> },
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
pub fn spawn(pool: PgPool) -> mpsc::Sender<Request> {
    let (sender, receiver) = mpsc::channel(1024);
    tokio::spawn(run(pool, receiver));
    sender
}

async fn run(pool: PgPool, mut receiver: mpsc::Receiver<Request>) {
    let mut deferred: Vec<Request> = Vec::new();
    loop {
        let mut batch = std::mem::take(&mut deferred);
        if batch.is_empty() {
            match receiver.recv().await {
                Some(request) => batch.push(request),
                None => return,
            }
        }
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        // One statement cannot touch a row twice: a key seen twice waits for the next batch.
        let mut keys = HashSet::new();
        let (now, later): (Vec<Request>, Vec<Request>) =
            batch.into_iter().partition(|r| keys.insert(r.key().to_string()));
        deferred = later;
        let (opens, stores): (Vec<Request>, Vec<Request>) =
            now.into_iter().partition(|r| matches!(r, Request::Open { .. }));
        match (opens.is_empty(), stores.is_empty()) {
            (true, true) => {}
            (false, true) => open_all(&pool, opens, Vec::new()).await,
            (true, false) => store_all(&pool, stores).await,
            // Under load both kinds wait: one round trip serves them together.
            (false, false) => open_all(&pool, opens, stores).await,
        }
    }
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

/// The statement that counts receipts (`$1` keys, `$2` fingerprints), unless a key belongs to
/// another job (a reused `message_id`): then nothing is counted and the row's own fingerprint
/// comes back. A result stored before keys were bound to jobs (no fingerprint) stays unbound.
macro_rules! open_sql {
    () => {
        "INSERT INTO job_results (job_key, fingerprint) SELECT * FROM unnest($1::text[], $2::text[]) \
         ON CONFLICT (job_key) DO UPDATE SET \
           deliveries = job_results.deliveries + CASE \
             WHEN job_results.fingerprint IS NULL OR job_results.fingerprint = EXCLUDED.fingerprint THEN 1 ELSE 0 END, \
           fingerprint = CASE WHEN job_results.fingerprint IS NULL AND job_results.result IS NULL \
             THEN EXCLUDED.fingerprint ELSE job_results.fingerprint END \
         RETURNING job_key, deliveries, result, fingerprint"
    };
}

/// Counts one receipt of each key of `opens` and answers what the ledger knows of it; the
/// results of `stores`, when there are any, are written in the same statement (and, should that
/// fail, on their own).
async fn open_all(pool: &PgPool, opens: Vec<Request>, stores: Vec<Request>) {
    let requests = opens;
    let (mut keys, mut fingerprints) = (Vec::with_capacity(requests.len()), Vec::with_capacity(requests.len()));
    for request in &requests {
        if let Request::Open { key, fingerprint, .. } = request {
            keys.push(key.clone());
            fingerprints.push(fingerprint.clone());
        }
    }
    let rows = if stores.is_empty() {
        sqlx::query(open_sql!()).bind(&keys).bind(&fingerprints).fetch_all(pool).await
    } else {
        let rows = store_rows_of(&stores);
        let stored = rows.len();
        let together = concat!("WITH stored AS (", store_sql!("$3", "$4", "$5"), " RETURNING 1) ", open_sql!());
        let answer = sqlx::query(together)
            .bind(&keys)
            .bind(&fingerprints)
            .bind(rows.iter().map(|r| r.0).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.1).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.2).collect::<Vec<_>>())
            .fetch_all(pool)
            .await;
        if answer.is_ok() {
            reply_to_stores(stores, vec![Ok(()); stored]);
            answer
        } else {
            store_all(pool, stores).await;
            sqlx::query(open_sql!()).bind(&keys).bind(&fingerprints).fetch_all(pool).await
        }
    };
    let mut rows_by_key: HashMap<String, (u32, Option<String>, Option<String>)> = HashMap::new();
    let error = match rows {
        Ok(rows) => {
            for row in rows {
                let deliveries = u32::try_from(row.get::<i32, _>("deliveries")).unwrap_or(0);
                rows_by_key.insert(row.get("job_key"), (deliveries, row.get("result"), row.get("fingerprint")));
            }
            None
        }
        Err(e) => Some(describe(&e)),
    };
    let mut entries: HashMap<String, LedgerEntry> = HashMap::new();
    for (key, fingerprint) in keys.into_iter().zip(fingerprints) {
        if let Some((deliveries, result, owner)) = rows_by_key.remove(&key) {
            let other_job = owner.as_ref().is_some_and(|owner| *owner != fingerprint);
            // A result stored before keys were bound to jobs (no fingerprint) may be another
            // job's: it is never served; the job runs again and its result takes the row.
            let result = if owner.as_deref() == Some(fingerprint.as_str()) { result } else { None };
            entries.insert(key, LedgerEntry { deliveries, result, other_job });
        }
    }
    for request in requests {
        if let Request::Open { key, reply, .. } = request {
            let answer = match (&error, entries.remove(&key)) {
                (None, Some(entry)) => Ok(entry),
                (Some(e), _) => Err(e.to_store_error()),
                (None, None) => Err(StoreError::Unavailable("the ledger returned no row".into())),
            };
            let _ = reply.send(answer);
        }
    }
}

/// Stores the results of a batch in one statement; when that fails, each one alone, so that one
/// result the database refuses never costs the others their record.
async fn store_all(pool: &PgPool, requests: Vec<Request>) {
    let rows = store_rows_of(&requests);
    let together = store_rows(pool, &rows).await;
    let outcomes: Vec<Result<(), Failed>> = match together {
        Ok(()) => vec![Ok(()); rows.len()],
        Err(_) if rows.len() > 1 => {
            let mut each = Vec::with_capacity(rows.len());
            for row in &rows {
                each.push(store_rows(pool, std::slice::from_ref(row)).await);
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
async fn store_rows(pool: &PgPool, rows: &[(&str, &str, &str)]) -> Result<(), Failed> {
    let keys: Vec<&str> = rows.iter().map(|r| r.0).collect();
    let fingerprints: Vec<&str> = rows.iter().map(|r| r.1).collect();
    let results: Vec<&str> = rows.iter().map(|r| r.2).collect();
    sqlx::query(store_sql!("$1", "$2", "$3"))
        .bind(&keys)
        .bind(&fingerprints)
        .bind(&results)
        .execute(pool)
        .await
        .map(|_| ())
        .map_err(|e| describe(&e))
}

/// A batch's failure, shared by every request in it (sqlx errors cannot be cloned).
#[derive(Debug, Clone)]
struct Failed {
    message: String,
    kind: FailedKind,
}

#[derive(Debug, Clone, Copy)]
enum FailedKind {
    /// The database refused this statement.
    Refused,
    /// No connection was free in time.
    Busy,
    /// The database could not be reached.
    Unreachable,
}

impl Failed {
    fn to_store_error(&self) -> StoreError {
        let message = self.message.clone();
        match self.kind {
            FailedKind::Refused => StoreError::Unavailable(message),
            FailedKind::Busy => StoreError::Busy(message),
            FailedKind::Unreachable => StoreError::Unreachable(message),
        }
    }
}

fn describe(error: &sqlx::Error) -> Failed {
    let kind = match error {
        sqlx::Error::PoolTimedOut => FailedKind::Busy,
        e if super::postgres::is_transient(e) => FailedKind::Unreachable,
        _ => FailedKind::Refused,
    };
    Failed { message: error.to_string(), kind }
}
