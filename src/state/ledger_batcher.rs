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
    Open { key: String, reply: oneshot::Sender<Result<LedgerEntry, StoreError>> },
    Store { key: String, json: String, reply: oneshot::Sender<Result<(), StoreError>> },
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
        if !stores.is_empty() {
            store_all(&pool, stores).await;
        }
        if !opens.is_empty() {
            open_all(&pool, opens).await;
        }
    }
}

async fn open_all(pool: &PgPool, requests: Vec<Request>) {
    let keys: Vec<String> = requests.iter().map(|r| r.key().to_string()).collect();
    let rows = sqlx::query(
        "INSERT INTO job_results (job_key) SELECT unnest($1::text[]) \
         ON CONFLICT (job_key) DO UPDATE SET deliveries = job_results.deliveries + 1 \
         RETURNING job_key, deliveries, result::text AS result",
    )
    .bind(&keys)
    .fetch_all(pool)
    .await;
    let mut entries: HashMap<String, LedgerEntry> = HashMap::new();
    let error = match rows {
        Ok(rows) => {
            for row in rows {
                let entry = LedgerEntry {
                    deliveries: row.get::<i32, _>("deliveries").max(0) as u32,
                    result: row.get("result"),
                };
                entries.insert(row.get("job_key"), entry);
            }
            None
        }
        Err(e) => Some(e.to_string()),
    };
    for request in requests {
        if let Request::Open { key, reply } = request {
            let answer = match (&error, entries.remove(&key)) {
                (None, Some(entry)) => Ok(entry),
                (Some(e), _) => Err(StoreError::Unavailable(e.clone())),
                (None, None) => Err(StoreError::Unavailable("the ledger returned no row".into())),
            };
            let _ = reply.send(answer);
        }
    }
}

async fn store_all(pool: &PgPool, requests: Vec<Request>) {
    let (mut keys, mut results) = (Vec::with_capacity(requests.len()), Vec::with_capacity(requests.len()));
    for request in &requests {
        if let Request::Store { key, json, .. } = request {
            keys.push(key.clone());
            results.push(json.clone());
        }
    }
    let done = sqlx::query(
        "INSERT INTO job_results (job_key, result, answered_at) \
         SELECT k, r::jsonb, now() FROM unnest($1::text[], $2::text[]) AS t(k, r) \
         ON CONFLICT (job_key) DO UPDATE SET result = EXCLUDED.result, answered_at = now()",
    )
    .bind(&keys)
    .bind(&results)
    .execute(pool)
    .await
    .map(|_| ())
    .map_err(|e| e.to_string());
    for request in requests {
        if let Request::Store { reply, .. } = request {
            let _ = reply.send(done.clone().map_err(StoreError::Unavailable));
        }
    }
}
