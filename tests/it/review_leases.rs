//! Review of 0682c5c (batchers keep their connection between batches, and the pool pinged only
//! connections idle >= 1 s): terminated sessions must not switch a worker whose database is up
//! to its own view, and a kept connection must not idle while other state calls need one.

use std::time::{Duration, Instant};

use fallback_worker::state::ResultLedger;

use crate::ledger_batching::{DEFAULT_POOL, store_at};
use crate::support::*;

/// Ends every pool session of `env`'s database (not the LISTEN one) as `pg_terminate_backend`
/// (an operator, a failover tool, `pg_cancel`-happy monitoring) does; returns how many.
async fn terminate_pool_sessions(env: &TestEnv) -> i64 {
    let mut admin = env.db().await;
    sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'fallback-worker' \
           AND pid <> pg_backend_pid() AND query NOT LIKE 'LISTEN%'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap()
}

/// Before 0682c5c sqlx pinged every connection it handed out (`test_before_acquire`): a pooled
/// connection whose backend was terminated was dropped and replaced, unseen by the state call.
/// Now a connection idle < 1 s goes out unpinged; its statement fails with 57P01/Io, which
/// `is_transient` counts as "database unreachable": the worker goes degraded (no ledger, local
/// quota shares) although the database is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_call_after_its_idle_sessions_were_terminated_succeeds() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    store.record_failure("delivery:warm", "warm").await.unwrap();
    let killed = terminate_pool_sessions(&env).await;
    assert!(killed >= 1, "no pool session to terminate");
    // The backends are gone well within IDLE_BEFORE_PING (1 s).
    tokio::time::sleep(Duration::from_millis(150)).await;
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
    store.open("warm", "job").await.unwrap();
    let killed = terminate_pool_sessions(&env).await;
    assert!(killed >= 1, "no pool session to terminate");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let answer = store.open("after-kill", "job").await;
    assert!(answer.is_ok(), "a ledger open failed after its pool's idle sessions were terminated: {answer:?}");
    assert!(!store.is_degraded(), "terminated idle sessions switched the worker to degraded mode (database up)");
}

/// A kept connection is held while the only requests waiting are for a key in flight (the
/// deferred branch of the ledger loop never calls `Leases::release`): nothing can use it until
/// the slow batch ends (up to BATCH_TIMEOUT, 5 s), and the rest of the process has one pool
/// connection fewer. Pool of 3 (`postgres.max_connections = 4`, two ledger batches in flight):
/// batch 1 waits on a row lock, batch 2 ends and its connection is kept (the third was idle
/// then); the third is then taken by another state call (a slow write-back, the quota batcher),
/// and a cooldown-like write finds no connection for 2 s. Before, batch 2's connection went back
/// to the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_is_not_held_while_only_a_busy_key_waits() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, 3).await;
    let mut locker = env.db().await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("INSERT INTO job_results (job_key) VALUES ('slow')").execute(&mut locker).await.unwrap();
    let first = {
        let store = store.clone();
        tokio::spawn(async move { store.open("slow", "job").await })
    };
    eventually("the first batch waits on the row lock", || async {
        let mut probe = env.db().await;
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut probe)
        .await
        .unwrap();
        waiting >= 1
    })
    .await;
    // Another delivery of the same key: deferred behind the slow batch.
    let second = {
        let store = store.clone();
        tokio::spawn(async move { store.open("slow", "job").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A batch of another key goes out on a second connection and ends.
    store.open("quick", "job").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Something else holds the third connection (the quota batcher under load, a write-back).
    let other = store.pool().acquire().await.unwrap();
    let started = Instant::now();
    let answer = store.record_failure("delivery:starved", "needs a connection").await;
    let waited = started.elapsed();
    drop(other);
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    let _ = (first.await, second.await);
    assert!(
        answer.is_ok() && waited < Duration::from_secs(1),
        "a state call waited {waited:?} for a connection the ledger batcher kept idle: {answer:?} (pool {} open, {} idle)",
        store.pool().size(),
        store.pool().num_idle()
    );
}

/// A connection kept by the ledger batcher goes to the next batch without any ping: when its
/// backend was terminated meanwhile, that batch fails as "unreachable" and the worker goes
/// degraded. Before, the next batch took a pooled connection, pinged on the way out (a dead one
/// replaced). The kept connection is made to wait deterministically: a batch of another key
/// ends while the only request waiting is for the key of a slow batch (pool of 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_on_a_kept_connection_whose_session_was_terminated_succeeds() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, 3).await;
    let mut locker = env.db().await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("INSERT INTO job_results (job_key) VALUES ('slow')").execute(&mut locker).await.unwrap();
    let first = {
        let store = store.clone();
        tokio::spawn(async move { store.open("slow", "job").await })
    };
    crate::ledger_batching::until_waiting_on_locks(&env, 1).await;
    let second = {
        let store = store.clone();
        tokio::spawn(async move { store.open("slow", "job").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    store.open("quick", "job").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Every pool session: the slow batch's (that batch fails, before and after the change), the
    // kept one and the idle one.
    let mut admin = env.db().await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'fallback-worker' \
           AND pid <> pg_backend_pid() AND query NOT LIKE 'LISTEN%'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(killed >= 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    let _first = first.await.unwrap();
    let second = second.await.unwrap();
    assert!(second.is_ok(), "the batch after the killed one failed on the batcher's kept connection: {second:?}");
}
