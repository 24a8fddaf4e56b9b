//! The ledger batcher under slow, stuck and dead batches (issue #9's review): it never takes the
//! last pool connection, never stalls every key behind one, and recovers from a dead connection.
//!
//! Each test holds a ledger row's lock from a plain connection (an uncommitted insert of the
//! key), so that a ledger batch touching that key is deterministically in flight and slow,
//! as it would be behind another worker's transaction, a slow disk, or a dead TCP peer.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use fallback_worker::config::LimitConfig;
use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Admission, Ask, Permit, ProviderState, Receipt, ResultLedger};
use sqlx::PgConnection;
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// The default pool: `postgres.max_connections = 3`, one of them the listener's.
pub(crate) const DEFAULT_POOL: u32 = 2;

/// Waits (40 s at most, a new connection each time) until `store` grants `ask` a counted slot
/// again after `what` died; fails naming the last answer and the pool's state.
pub(crate) async fn admits_again(store: &PgStore, ask: Ask<'_>, what: &str) {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < Duration::from_secs(40) {
        match store.admit(ask, SystemTime::now()).await {
            Admission::Granted(permit) if permit.usage_id.is_some() => return,
            other => last = Some(other),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "40 s after {what} died the database still admits nothing: {last:?} (pool: {} open, {} idle)",
        store.pool().size(),
        store.pool().num_idle()
    );
}

pub(crate) async fn store_at(url: &str, pool: u32) -> PgStore {
    let store = PgStore::connect_lazy(url, pool).unwrap();
    store.migrate().await.unwrap();
    // Open every connection of the pool once, so that idle connections exist (a warm worker).
    let mut held = Vec::new();
    for _ in 0..pool {
        held.push(store.pool().acquire().await.unwrap());
    }
    drop(held);
    store
}

/// A plain connection holding the row lock of each key (an uncommitted insert): a ledger
/// statement on those keys waits until `release`.
pub(crate) async fn lock_keys(env: &TestEnv, keys: &[&str]) -> PgConnection {
    let mut locker = env.db().await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    for key in keys {
        sqlx::query("INSERT INTO job_results (job_key) VALUES ($1)").bind(*key).execute(&mut locker).await.unwrap();
    }
    locker
}

pub(crate) async fn release(mut locker: PgConnection) {
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
}

fn open_in_background(
    store: &PgStore,
    key: &str,
) -> tokio::task::JoinHandle<Result<fallback_worker::state::LedgerEntry, fallback_worker::state::StoreError>> {
    let (store, key) = (store.clone(), key.to_string());
    tokio::spawn(async move { store.open(&key, "job", Receipt::Fresh).await })
}

/// The commit says the second batch goes out "only on a connection nobody else is waiting
/// for, so the ledger never starves admissions and cooldowns of the pool's connections". With
/// the default pool (2 connections) two slow batches hold both, and every other state call
/// (admission, cooldowns, record_failure, heartbeats) times out. One batch at a time (before
/// 58b4409) always left one connection free.
/// Waits until `n` sessions of the test's database wait on a row lock: that many ledger batches
/// are in flight behind the locker (bounded by `eventually`).
pub(crate) async fn until_waiting_on_locks(env: &TestEnv, n: i64) {
    eventually(&format!("{n} sessions waiting on a row lock"), || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut env.db().await)
        .await
        .unwrap();
        waiting >= n
    })
    .await;
}

/// Polls `call` once, so that its request is in its batcher's queue (a FIFO) before anything
/// sent after this returns, then lets it finish in the background.
pub(crate) fn spawn_queued<T: Send + 'static>(
    call: impl Future<Output = T> + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    let mut pending = Box::pin(call);
    assert!(futures_lite::future::block_on(futures_lite::future::poll_once(&mut pending)).is_none());
    tokio::spawn(pending)
}

/// `store.admit` of `tokens` to `provider` under `limits` (a 30 s flight), queued (see
/// [`spawn_queued`]): the admission, and how long it took.
pub(crate) fn admit_queued(
    store: &PgStore,
    provider: &'static str,
    limits: &[LimitConfig],
    tokens: u64,
) -> tokio::task::JoinHandle<(Admission, Duration)> {
    let (store, limits) = (store.clone(), limits.to_vec());
    spawn_queued(async move {
        let started = Instant::now();
        let ask = Ask { provider, limits: &limits, pools: &[], tokens, flight: Duration::from_secs(30) };
        (store.admit(ask, SystemTime::now()).await, started.elapsed())
    })
}

/// `store.finish_recorded(permit, tokens, now)`, queued (see [`spawn_queued`]): ends once the batch
/// answered (whatever it answered, as `finish` would take it).
pub(crate) fn finish_queued(store: &PgStore, permit: &Permit, tokens: Option<u64>) -> tokio::task::JoinHandle<()> {
    let (store, permit) = (store.clone(), permit.clone());
    spawn_queued(async move {
        let _ = store.finish_recorded(permit, tokens, SystemTime::now()).await;
    })
}

/// `store(key)`, queued (see [`spawn_queued`]).
fn store_queued(
    store: &PgStore,
    key: &'static str,
) -> tokio::task::JoinHandle<Result<(), fallback_worker::state::StoreError>> {
    let store = store.clone();
    spawn_queued(async move { store.store(key, "job", "{\"n\":1}").await })
}

/// `open(key)`, queued (see [`spawn_queued`]).
pub(crate) fn open_queued(
    store: &PgStore,
    key: &'static str,
) -> tokio::task::JoinHandle<Result<fallback_worker::state::LedgerEntry, fallback_worker::state::StoreError>> {
    let store = store.clone();
    spawn_queued(async move { store.open(key, "job", Receipt::Fresh).await })
}

#[tokio::test]
async fn two_slow_ledger_batches_leave_other_state_calls_a_connection() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let locker = lock_keys(&env, &["slow-a", "slow-b"]).await;
    let a = open_in_background(&store, "slow-a");
    until_waiting_on_locks(&env, 1).await;
    let b = open_in_background(&store, "slow-b");
    // The second batch either waits on its lock too, or (one batch at a time) stays queued.
    let _ = tokio::time::timeout(Duration::from_secs(1), until_waiting_on_locks(&env, 2)).await;

    let started = Instant::now();
    let answer = store.record_failure("delivery:review9", "a state call that needs a connection").await;
    let waited = started.elapsed();
    release(locker).await;
    let _ = (a.await, b.await);
    assert!(
        answer.is_ok(),
        "a state call found no pool connection while two ledger batches waited ({waited:?}): {answer:?}"
    );
}

/// One slow batch in flight; the second slot works (control), until one request for the slow
/// batch's key is deferred: then the batching loop blocks in `join_next` on the slow batch and
/// reads no new request, so every open/store of the process waits behind that one batch. In
/// the worker this is the normal sequence after a slow `open(K)`: the caller gives up after
/// 2 s, runs the job, and sends `store(K)` while `open(K)` is still in flight.
#[tokio::test]
async fn a_request_deferred_behind_a_slow_batch_does_not_stall_every_other_key() {
    let env = TestEnv::new().await;
    // A pool with room for both batches and one more connection (max_connections = 4).
    let store = store_at(&env.database_url, 3).await;
    let locker = lock_keys(&env, &["slow"]).await;
    let slow = open_in_background(&store, "slow");
    until_waiting_on_locks(&env, 1).await;

    // Control: with one slow batch in flight, another key goes out on the idle connection.
    let control = store.open("fast-0", "job", Receipt::Fresh).await;
    assert!(control.is_ok(), "control: the second slot answers another key: {control:?}");

    // The same job's store, after its open timed out: deferred behind the slow batch.
    let deferred = store_queued(&store, "slow");
    let started = Instant::now();
    let other = store.open("fast-1", "job", Receipt::Fresh).await;
    let waited = started.elapsed();
    release(locker).await;
    let _ = (slow.await, deferred.await);
    assert!(other.is_ok(), "another key waited {waited:?} behind the slow batch and got {other:?}");
    assert!(!store.is_degraded(), "one slow key switched the whole worker to degraded mode (database up)");
}

/// A TCP relay whose existing connections can be frozen: they stay open but carry no byte
/// (a network partition, a failed-over address, a VM paused), while new connections work.
pub(crate) struct FreezingRelay {
    pub(crate) addr: SocketAddr,
    /// Connections with an id below this are frozen.
    frozen_below: tokio::sync::watch::Sender<u64>,
    next_id: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl FreezingRelay {
    pub(crate) async fn start(upstream: SocketAddr) -> FreezingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen_below, _) = tokio::sync::watch::channel(0u64);
        let next_id = Arc::new(AtomicU64::new(0));
        let (watch, ids) = (frozen_below.clone(), next_id.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let id = ids.fetch_add(1, Ordering::SeqCst);
                let mut frozen = watch.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else { return };
                    let freeze = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
                        _ = frozen.wait_for(|below| id < *below) => true,
                    };
                    if freeze {
                        // Keep both sockets open, carrying nothing, for the rest of the test.
                        std::future::pending::<()>().await;
                    }
                });
            }
        });
        FreezingRelay { addr, frozen_below, next_id, accept }
    }

    /// Freezes every connection opened so far; later ones work.
    pub(crate) fn freeze_existing(&self) {
        let below = self.next_id.load(Ordering::SeqCst);
        self.frozen_below.send_replace(below);
    }
}

/// A warm store of the default pool whose connections go through a [`FreezingRelay`].
pub(crate) async fn store_behind_freezing_relay(env: &TestEnv) -> (FreezingRelay, PgStore) {
    let relay = FreezingRelay::start("127.0.0.1:5432".parse().unwrap()).await;
    let store = store_at(&env.database_url.replace("127.0.0.1:5432", &relay.addr.to_string()), DEFAULT_POOL).await;
    (relay, store)
}

impl Drop for FreezingRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A store whose ledger batch for `in-flight` sits on a connection that died without a close,
/// and the job's own `store` of that key queued behind it.
struct DeadBatch {
    _relay: FreezingRelay,
    store: PgStore,
    hung: tokio::task::JoinHandle<Result<fallback_worker::state::LedgerEntry, fallback_worker::state::StoreError>>,
    stored: tokio::task::JoinHandle<Result<(), fallback_worker::state::StoreError>>,
}

async fn a_batch_on_a_dead_connection(env: &TestEnv) -> DeadBatch {
    let (relay, store) = store_behind_freezing_relay(env).await;
    let locker = lock_keys(env, &["in-flight"]).await;
    let hung = open_in_background(&store, "in-flight");
    until_waiting_on_locks(env, 1).await;
    relay.freeze_existing();
    release(locker).await;
    // The job goes on without the ledger (its open timed out) and stores its result.
    let stored = store_queued(&store, "in-flight");
    DeadBatch { _relay: relay, store, hung, stored }
}

/// Contract §4: "No state call waits on a dead connection pool" and the worker "reconnects by
/// itself and goes on". A ledger batch whose connection dies without a close (no RST: a
/// partition, a failover, a NAT) never ends: no timeout wraps it. The job's own `store` for
/// that key is then deferred, and the batching loop waits for the dead batch forever: the
/// ledger never answers again although the database answers every new connection (every job
/// then pays 2 s per ledger call and loses its idempotency, for as long as the process lives).
#[tokio::test]
async fn the_ledger_answers_again_after_a_batch_connection_died_silently() {
    let env = TestEnv::new().await;
    let DeadBatch { _relay, store, hung, stored } = a_batch_on_a_dead_connection(&env).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    let mut i = 0;
    while Instant::now() < deadline {
        i += 1;
        match store.open(&format!("after-{i}"), "job", Receipt::Fresh).await {
            Ok(_) => {
                last = None;
                break;
            }
            Err(e) => last = Some(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let degraded = store.is_degraded();
    let (size, idle) = (store.pool().size(), store.pool().num_idle());
    hung.abort();
    stored.abort();
    // A fresh connection works all along: the database is not what is missing.
    let mut direct = env.db().await;
    sqlx::query("SELECT 1").execute(&mut direct).await.unwrap();
    assert!(
        last.is_none(),
        "30 s after the dead connection, the ledger still fails every call: {last:?} \
         (degraded: {degraded}, pool size {size}, idle {idle})"
    );
}

/// f6b463b matches rows to requests by position; no test had a batch of several keys with
/// different fingerprints and results (the existing one gives every key the fingerprint "job"
/// and reads results back one key at a time), so answering each key with another key's row
/// passed every test. Here each of 40 concurrent opens must get its own key's row.
#[tokio::test]
async fn each_open_of_a_batch_gets_its_own_keys_row() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, 4).await;
    let stores = (0..40).map(|i| {
        let store = store.clone();
        tokio::spawn(async move { store.store(&format!("k{i}"), &format!("job-{i}"), &format!("{{\"n\":{i}}}")).await })
    });
    for stored in stores.collect::<Vec<_>>() {
        stored.await.unwrap().unwrap();
    }
    let opens = (0..40).map(|i| {
        let store = store.clone();
        tokio::spawn(
            async move { (i, store.open(&format!("k{i}"), &format!("job-{i}"), Receipt::Fresh).await.unwrap()) },
        )
    });
    for open in opens.collect::<Vec<_>>() {
        let (i, entry) = open.await.unwrap();
        assert!(!entry.other_job, "k{i} told it belongs to another job");
        assert_eq!(entry.result.as_deref(), Some(format!("{{\"n\":{i}}}").as_str()), "k{i}");
    }
}

/// `ledger_call` bounds the wait for the answer (2 s) but not the `send` into the batcher's
/// channel (1024 requests). Once the batching loop is stuck (the dead batch above), every
/// timed-out request stays in the channel; when it is full, a ledger call never returns: the
/// job holding it hangs for good (each up-phase between two degraded phases adds its jobs'
/// opens and stores, so under load this comes within a minute of the dead connection).
#[tokio::test]
async fn a_ledger_call_returns_even_when_the_batcher_queue_is_full() {
    let env = TestEnv::new().await;
    let DeadBatch { _relay, store, hung, stored } = a_batch_on_a_dead_connection(&env).await;
    // Requests pile up while the ledger is believed up (here at once; in a worker, over cycles).
    let burst: Vec<_> = (0..1100).map(|i| open_in_background(&store, &format!("burst-{i}"))).collect();
    // Wait for the store to have gone degraded and come back (the probe answers: fresh connections work).
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !store.is_degraded() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while Instant::now() < deadline && store.is_degraded() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let late = tokio::time::timeout(Duration::from_secs(10), store.open("late", "job", Receipt::Fresh)).await;
    hung.abort();
    stored.abort();
    for task in burst {
        task.abort();
    }
    assert!(late.is_ok(), "a ledger call did not return within 10 s (its STATE_CALL_TIMEOUT is 2 s)");
}

/// Each batcher keeps its connection from one batch to the next while requests wait (sqlx would
/// ping it on the way back to the pool and again on the way out), but the two batchers never
/// keep both of the default pool's connections: under a continuous load of ledger opens and
/// stores and of admissions and finishes, a state call outside the batchers (`record_failure`,
/// which takes a pool connection as a cooldown write does) waits for a batch to end at most,
/// not for the batchers to run out of work. Measured against the ledger's own answer time in
/// the same run (a batch or two): kept connections made the outside call wait 100 ms to 2 s
/// while an open took a few ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_batchers_keep_their_connections_but_leave_one_for_other_state_calls() {
    use std::sync::atomic::AtomicBool;
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let stop = Arc::new(AtomicBool::new(false));
    let open_times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let admitted = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    // More requesters than one batch takes (`MAX_BATCH`): requests are waiting when a batch ends.
    for task in 0..160 {
        let (ledger, stop_ledger, open_times) = (store.clone(), stop.clone(), open_times.clone());
        load.push(tokio::spawn(async move {
            for n in 0.. {
                if stop_ledger.load(Ordering::Relaxed) {
                    break;
                }
                let key = format!("lease-{task}-{n}");
                let started = Instant::now();
                if ledger.open(&key, "job", Receipt::Fresh).await.is_ok() {
                    open_times.lock().unwrap().push(started.elapsed());
                    let _ = ledger.store(&key, "job", "{}").await;
                }
            }
        }));
        let (quota, stop_quota, admitted) = (store.clone(), stop.clone(), admitted.clone());
        load.push(tokio::spawn(async move {
            let limits = [fallback_worker::config::LimitConfig {
                requests: Some(1_000_000),
                tokens: None,
                per: Duration::from_secs(3600),
                resets: None,
            }];
            while !stop_quota.load(Ordering::Relaxed) {
                let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: Duration::from_secs(5) };
                if let Admission::Granted(permit) = quota.admit(ask, SystemTime::now()).await {
                    quota.finish(permit, Some(1), SystemTime::now()).await;
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    eventually("both batchers are busy", || async {
        open_times.lock().unwrap().len() >= 200 && admitted.load(Ordering::Relaxed) >= 200
    })
    .await;

    let mut outside = Vec::new();
    let mut failures = Vec::new();
    for i in 0..21 {
        let started = Instant::now();
        let answer = store.record_failure(&format!("delivery:lease-{i}"), "a call outside the batchers").await;
        outside.push(started.elapsed());
        if let Err(e) = answer {
            failures.push(format!("call {i} after {:?}: {e}", started.elapsed()));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert!(failures.is_empty(), "state calls found no connection while the batchers were busy: {failures:?}");
    assert!(!store.is_degraded(), "a busy pool switched the worker to degraded mode (database up)");
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2]
    };
    let (outside, open) = (median(&mut outside), median(&mut open_times.lock().unwrap()));
    assert!(
        outside <= open * 4,
        "a call outside the batchers waited {outside:?} (median) for a connection, a ledger open {open:?}"
    );
}

/// A TCP relay to Postgres that counts what the client sends: lone Sync messages (sqlx's ping,
/// `S` with length 4, is sent alone and waits for its answer, so it arrives as a chunk of its
/// own) and every other chunk (a statement: Bind/Execute/Sync written together).
struct PingCountingRelay {
    addr: SocketAddr,
    pings: Arc<AtomicU64>,
    statements: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl PingCountingRelay {
    async fn start(upstream: SocketAddr) -> PingCountingRelay {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (pings, statements) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (ping_count, statement_count) = (pings.clone(), statements.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (pings, statements) = (ping_count.clone(), statement_count.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(upstream).await else { return };
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_server, mut to_server) = outbound.into_split();
                    let upstream = async move {
                        let mut buffer = vec![0u8; 64 * 1024];
                        while let Ok(n) = from_client.read(&mut buffer).await {
                            let Some(chunk) = buffer.get(..n).filter(|c| !c.is_empty()) else { break };
                            let counter = if chunk == b"S\0\0\0\x04" { &pings } else { &statements };
                            counter.fetch_add(1, Ordering::Relaxed);
                            if to_server.write_all(chunk).await.is_err() {
                                break;
                            }
                        }
                    };
                    let downstream = tokio::io::copy(&mut from_server, &mut to_client);
                    let _ = tokio::join!(upstream, downstream);
                });
            }
        });
        PingCountingRelay { addr, pings, statements, accept }
    }

    fn counts(&self) -> (u64, u64) {
        (self.pings.load(Ordering::Relaxed), self.statements.load(Ordering::Relaxed))
    }
}

impl Drop for PingCountingRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Under load a ledger batch hands its connection straight to the next one: no ping on the way
/// back to the pool nor on the way out (each a round trip; sqlx pings both ways). Handing every
/// connection back costs two pings per batch; counted at the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_ledger_batches_pay_no_pings() {
    let env = TestEnv::new().await;
    let relay = PingCountingRelay::start("127.0.0.1:5432".parse().unwrap()).await;
    let store = store_at(&env.database_url.replace("127.0.0.1:5432", &relay.addr.to_string()), DEFAULT_POOL).await;
    let (pings_before, statements_before) = relay.counts();
    // More requesters than one batch takes (`MAX_BATCH`): requests are waiting when a batch ends.
    let mut load = Vec::new();
    for task in 0..160 {
        let store = store.clone();
        load.push(tokio::spawn(async move {
            for n in 0..10 {
                let key = format!("wire-{task}-{n}");
                store.open(&key, "job", Receipt::Fresh).await.unwrap();
                store.store(&key, "job", "{}").await.unwrap();
            }
        }));
    }
    for task in load {
        task.await.unwrap();
    }
    let (pings, statements) = relay.counts();
    let (pings, statements) = (pings - pings_before, statements - statements_before);
    assert!(statements >= 10, "the load sent {statements} statements");
    assert!(
        pings * 4 <= statements,
        "{pings} pings for {statements} statements: back-to-back batches handed their connection back to the pool"
    );
}
