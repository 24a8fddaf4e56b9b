//! Review of 0682c5c (batchers keep their connection between batches, and the pool pinged only
//! connections idle >= 1 s): terminated sessions must not switch a worker whose database is up
//! to its own view, and a kept connection must not idle while other state calls need one.

use std::time::{Duration, Instant};

use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{LedgerEntry, Receipt, ResultLedger, StoreError};
use sqlx::PgConnection;
use tokio::task::JoinHandle;

use crate::ledger_batching::{DEFAULT_POOL, lock_keys, open_queued, release, store_at, until_waiting_on_locks};
use crate::support::*;

/// Ends every pool session of `env`'s database (not the LISTEN one) as `pg_terminate_backend`
/// (an operator, a failover tool, `pg_cancel`-happy monitoring) does, and waits until those
/// backends are gone; returns how many.
async fn terminate_pool_sessions(env: &TestEnv) -> usize {
    terminate(env, TERMINATE_POOL_SESSIONS).await
}

/// The same, the idle sessions first and the busy ones (a batch waiting on a lock) once those are
/// gone: a busy session terminated first ends its batch at once, and the batcher's next batch
/// may take a pooled connection in the moment before the terminations reach it, which is then
/// killed under its statement (an outage to the worker, as it would be for any connection cut
/// mid-statement: not what the tests of kept connections are about).
async fn terminate_pool_sessions_idle_first(env: &TestEnv) -> usize {
    terminate(env, TERMINATE_IDLE_POOL_SESSIONS).await + terminate(env, TERMINATE_POOL_SESSIONS).await
}

// Materialized first: a WHERE clause may call pg_terminate_backend before its filters.
const TERMINATE_POOL_SESSIONS: &str = "WITH pool AS MATERIALIZED (SELECT pid FROM pg_stat_activity \
       WHERE datname = current_database() AND application_name = 'fallback-worker' AND pid <> pg_backend_pid() \
       AND query NOT LIKE 'LISTEN%') \
     SELECT pid FROM pool WHERE pg_terminate_backend(pid)";
const TERMINATE_IDLE_POOL_SESSIONS: &str = "WITH pool AS MATERIALIZED (SELECT pid FROM pg_stat_activity \
       WHERE datname = current_database() AND application_name = 'fallback-worker' AND pid <> pg_backend_pid() \
       AND query NOT LIKE 'LISTEN%' AND state = 'idle') \
     SELECT pid FROM pool WHERE pg_terminate_backend(pid)";

async fn terminate(env: &TestEnv, statement: &'static str) -> usize {
    let killed: Vec<i32> = sqlx::query_scalar(statement).fetch_all(&mut env.db().await).await.unwrap();
    eventually("the terminated backends are gone", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)")
            .bind(&killed)
            .fetch_one(&mut env.db().await)
            .await
            .unwrap();
        left == 0
    })
    .await;
    killed.len()
}

/// Before 0682c5c sqlx pinged every connection it handed out (`test_before_acquire`): a pooled
/// connection whose backend was terminated was dropped and replaced, unseen by the state call.
/// 0682c5c handed out connections idle < 1 s unpinged; their statement failed with 57P01/Io,
/// which `is_transient` counts as "database unreachable": the worker went degraded (no ledger,
/// local quota shares) although the database was up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_call_after_its_idle_sessions_were_terminated_succeeds() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    store.record_failure("delivery:warm", "warm").await.unwrap();
    let killed = terminate_pool_sessions(&env).await;
    assert!(killed >= 1, "no pool session to terminate");
    let answer = store.record_failure("delivery:after-kill", "after the kill").await;
    let failed_at = Instant::now();
    let degraded = store.is_degraded();
    while store.is_degraded() && failed_at.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        answer.is_ok() && !degraded,
        "a state call after its pool's idle sessions were terminated: {answer:?}; degraded: {degraded} \
         (for {:?}: no ledger, local quota shares, while the database was up)",
        failed_at.elapsed()
    );
}

/// The same through the ledger batcher: a batch takes a pooled connection (or a kept one)
/// without a ping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_open_after_its_idle_sessions_were_terminated_succeeds() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    store.open("warm", "job", Receipt::Fresh).await.unwrap();
    let killed = terminate_pool_sessions(&env).await;
    assert!(killed >= 1, "no pool session to terminate");
    let answer = store.open("after-kill", "job", Receipt::Fresh).await;
    assert!(answer.is_ok(), "a ledger open failed after its pool's idle sessions were terminated: {answer:?}");
    assert!(!store.is_degraded(), "terminated idle sessions switched the worker to degraded mode (database up)");
}

type OpenTask = JoinHandle<Result<LedgerEntry, StoreError>>;

/// With a pool of 3 (`postgres.max_connections = 4`: two ledger batches in flight): a batch
/// for `slow` waiting on its row lock (held by the returned connection), a second open of
/// `slow` deferred behind it, and a batch of another key that ended meanwhile. Waits until that
/// batch's connection is back in the pool: nothing can use a connection the batcher kept while
/// only a key in flight waits (the slow batch may take up to BATCH_TIMEOUT, 5 s).
async fn a_slow_batch_and_a_deferred_open(env: &TestEnv, store: &PgStore) -> (PgConnection, OpenTask, OpenTask) {
    let locker = lock_keys(env, &["slow"]).await;
    let first = open_queued(store, "slow");
    until_waiting_on_locks(env, 1).await;
    // Another delivery of the same key: deferred behind the slow batch.
    let second = open_queued(store, "slow");
    // A batch of another key goes out on a second connection and ends.
    store.open("quick", "job", Receipt::Fresh).await.unwrap();
    eventually("the ended batch's connection is back in the pool", || async { store.pool().num_idle() >= 2 }).await;
    (locker, first, second)
}

/// 0682c5c kept the ended batch's connection while only the slow batch's key waited: the
/// third connection then taken by another state call (a slow write-back, the quota batcher), a
/// cooldown-like write found no connection for 2 s. Before, the connection went back to the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_is_not_held_while_only_a_busy_key_waits() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, 3).await;
    let (locker, first, second) = a_slow_batch_and_a_deferred_open(&env, &store).await;
    // Something else holds the third connection (the quota batcher under load, a write-back).
    let other = store.pool().acquire().await.unwrap();
    let started = Instant::now();
    let answer = store.record_failure("delivery:starved", "needs a connection").await;
    let waited = started.elapsed();
    drop(other);
    release(locker).await;
    let _ = (first.await, second.await);
    assert!(
        answer.is_ok() && waited < Duration::from_secs(1),
        "a state call waited {waited:?} for a connection the ledger batcher kept idle: {answer:?} (pool {} open, {} idle)",
        store.pool().size(),
        store.pool().num_idle()
    );
}

/// A connection the ledger batcher kept goes to the next batch without any ping: when its
/// backend was terminated meanwhile, that batch failed as "unreachable" and the worker went
/// degraded. Every pool session is terminated here: the slow batch's (that batch fails, before
/// and after the change), the ended batch's and the idle one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_on_a_kept_connection_whose_session_was_terminated_succeeds() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, 3).await;
    let (locker, first, second) = a_slow_batch_and_a_deferred_open(&env, &store).await;
    assert!(terminate_pool_sessions_idle_first(&env).await >= 1);
    release(locker).await;
    let _first = first.await.unwrap();
    let second = second.await.unwrap();
    assert!(second.is_ok(), "the batch after the killed one failed on the batcher's kept connection: {second:?}");
}
