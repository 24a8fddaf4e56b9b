//! Admission credits (migration 0012, `state/credits.rs`): a worker takes room for several
//! calls of a provider with large limits in one ask and admits its calls from it. Against the
//! real database: strict across workers, every slot still usable, what a credit ends with.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use fallback_worker::config::{LimitConfig, QuotaPoolConfig};
use fallback_worker::routing::QuotaObservation;
use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Admission, Ask, Permit, ProviderState, QuotaMeasure};
use tokio_util::sync::CancellationToken;

use crate::ledger_batching::{DEFAULT_POOL, store_at};
use crate::review_finish::used;
use crate::support::*;

/// A worker's store with its LISTEN session live (credits are used only then: a call admitted
/// without a query learns other workers' cooldowns through it). The session ends with `stop`.
pub(crate) struct Worker {
    pub(crate) store: PgStore,
    stop: CancellationToken,
}

impl Worker {
    pub(crate) async fn start(env: &TestEnv) -> Worker {
        let store = store_at(&env.database_url, DEFAULT_POOL).await;
        let stop = CancellationToken::new();
        tokio::spawn(store.clone().listen(stop.clone()));
        eventually("the listener is live", || async { store.is_listening() }).await;
        Worker { store, stop }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub(crate) const HOUR: u64 = 3600;

pub(crate) fn requests(n: u64) -> LimitConfig {
    LimitConfig { requests: Some(n), tokens: None, per: Duration::from_secs(HOUR), resets: None }
}

pub(crate) fn tokens(n: u64) -> LimitConfig {
    LimitConfig { requests: None, tokens: Some(n), per: Duration::from_secs(HOUR), resets: None }
}

pub(crate) fn ask(limits: &[LimitConfig], tokens: u64) -> Ask<'_> {
    Ask { provider: "p", limits, pools: &[], tokens, flight: Duration::from_secs(30) }
}

pub(crate) async fn granted(store: &PgStore, ask: Ask<'_>) -> Permit {
    match store.admit(ask, SystemTime::now()).await {
        Admission::Granted(permit) => permit,
        other => panic!("not granted: {other:?}"),
    }
}

/// The provider's headers: `remaining` of the hour's `limit` requests.
pub(crate) fn requests_left(remaining: u64, limit: u64, resets_in: Option<Duration>) -> QuotaObservation {
    QuotaObservation {
        measure: QuotaMeasure::Requests,
        remaining,
        limit: Some(limit),
        resets_at: resets_in.map(|d| SystemTime::now() + d),
        window: None,
    }
}

/// A credit of 4 of p's 1024 requests an hour, its calls' flight 200 ms, granted straight
/// through the statement to a worker that then dies (never written again): its call id.
pub(crate) async fn a_dead_credit(env: &TestEnv) -> i64 {
    sqlx::query_scalar(
        "SELECT usage_id FROM fallback_admit_batch('p', ARRAY['provider'], ARRAY['p'], ARRAY['requests'], \
         ARRAY[3600000]::bigint[], ARRAY[''], ARRAY[1024]::bigint[], ARRAY[NULL]::timestamptz[], \
         ARRAY[NULL]::timestamptz[], ARRAY[4]::bigint[], ARRAY[200]::bigint[], ARRAY[NULL]::timestamptz[], \
         ARRAY[4]::bigint[], ARRAY[1000]::bigint[])",
    )
    .fetch_one(&mut env.db().await)
    .await
    .unwrap()
}

/// The calls of a credit are one row in each window; the next ask of the worker is admitted
/// from it with no query, and its rows count the whole credit until it ends.
#[tokio::test]
async fn calls_admitted_from_a_credit_take_no_row_of_their_own() {
    let env = TestEnv::new().await;
    let worker = Worker::start(&env).await;
    let store = &worker.store;
    let limits = [requests(100_000)];
    let first = granted(store, ask(&limits, 10)).await;
    let second = granted(store, ask(&limits, 10)).await;
    assert!(first.from_credit && second.from_credit, "{first:?} {second:?}");
    assert_eq!(first.usage_id, second.usage_id, "one credit");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM quota_use WHERE scope = 'p'")
        .fetch_one(&mut env.db().await)
        .await
        .unwrap();
    assert_eq!(rows, 1, "one row for the credit");
    assert_eq!(used(&env, "provider", "p", "requests").await, 64, "the whole credit counts while it is live");
}

/// The figure in the answer of a credit's call holds the credit's calls that had answered
/// before it was admitted, and itself (migration 0013; calls still in flight may reach the
/// provider after it): the worker says how much, and only the rest of the credit is taken as
/// unseen beside the figure, in each measure. The permit carries that, in requests and tokens.
#[tokio::test]
async fn the_figure_of_a_credits_call_learns_beside_only_the_calls_it_had_not_sent() {
    let env = TestEnv::new().await;
    let worker = Worker::start(&env).await;
    let store = &worker.store;
    let limits = [requests(100_000), tokens(100_000_000)];
    let first = granted(store, ask(&limits, 100)).await;
    let in_flight = granted(store, ask(&limits, 100)).await;
    assert_eq!(first.credit_sent, Some((1, 100)));
    assert_eq!(in_flight.credit_sent, Some((1, 100)), "the first call, still out, may reach the provider after it");
    store.finish(first.clone(), Some(100), SystemTime::now()).await;
    let second = granted(store, ask(&limits, 100)).await;
    assert!(first.from_credit && second.from_credit && first.usage_id == second.usage_id, "{first:?} {second:?}");
    assert_eq!(second.credit_sent, Some((2, 200)), "the first call, answered, and itself");
    assert_eq!(used(&env, "provider", "p", "requests").await, 64);
    assert_eq!(used(&env, "provider", "p", "tokens").await, 6400);
    // The provider, in the second call's answer: 5000 calls and 70,000 tokens made elsewhere,
    // and the credit's 2 calls (200 tokens); the call still in flight is not in it.
    let tokens_left = QuotaObservation {
        measure: QuotaMeasure::Tokens,
        remaining: 100_000_000 - 70_200,
        limit: Some(100_000_000),
        resets_at: None,
        window: None,
    };
    let seen = [requests_left(100_000 - 5002, 100_000, None), tokens_left];
    store.observe_quota(ask(&limits, 100), &second, &seen, SystemTime::now()).await;
    // What it says beyond the credit's 2 calls is learnt beside the whole credit: not its 2
    // calls a second time.
    assert_eq!(used(&env, "provider", "p", "requests").await, 5000 + 64);
    assert_eq!(used(&env, "provider", "p", "tokens").await, 70_000 + 6400);
    store.finish(in_flight, Some(100), SystemTime::now()).await;
    store.finish(second, Some(100), SystemTime::now()).await;
}

/// Once its lifetime is over and its calls have answered, a credit counts what they used: the
/// requests admitted and the tokens they reported, not what it held.
#[tokio::test]
async fn a_credit_ends_with_what_its_calls_used() {
    let env = TestEnv::new().await;
    let worker = Worker::start(&env).await;
    let store = &worker.store;
    let limits = [requests(100_000), tokens(100_000_000)];
    let calls = [granted(store, ask(&limits, 100)).await, granted(store, ask(&limits, 100)).await];
    assert!(calls.iter().all(|c| c.from_credit));
    store.finish(calls[0].clone(), Some(30), SystemTime::now()).await;
    store.finish(calls[1].clone(), None, SystemTime::now()).await;
    eventually("the credit has ended on its own", || async { used(&env, "provider", "p", "requests").await == 2 })
        .await;
    eventually("its tokens are its calls'", || async { used(&env, "provider", "p", "tokens").await == 130 }).await;
}

/// A call that reports more tokens than its credit has left raises the credit's count before
/// `finish` returns: another worker's next ask must count it.
#[tokio::test]
async fn a_call_that_uses_more_than_its_credit_holds_raises_it_before_finish_returns() {
    let env = TestEnv::new().await;
    let worker = Worker::start(&env).await;
    let store = &worker.store;
    let limits = [requests(100_000), tokens(100_000_000)];
    let call = granted(store, ask(&limits, 100)).await;
    assert!(call.from_credit);
    let held = used(&env, "provider", "p", "tokens").await;
    assert_eq!(held, 6400, "64 calls of 100 tokens");
    store.finish(call, Some(9000), SystemTime::now()).await;
    assert_eq!(used(&env, "provider", "p", "tokens").await, 9000);
    store.answers_recorded().await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 1);
    assert_eq!(used(&env, "provider", "p", "tokens").await, 9000);
}

/// Three workers with many jobs each on one provider with 1024 requests an hour (credits of 4
/// calls): never more than 1024 calls admitted, and every one of the 1024 slots used — near
/// the end a credit no longer fits and the calls ask one by one. Once the workers stop, the
/// window counts exactly the calls made.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credits_across_workers_never_admit_past_the_limit_and_leave_no_slot_unused() {
    let env = TestEnv::new().await;
    let workers = [Worker::start(&env).await, Worker::start(&env).await, Worker::start(&env).await];
    let stores: Vec<PgStore> = workers.iter().map(|w| w.store.clone()).collect();
    let limits = [requests(1024)];
    let admitted = Arc::new(AtomicU64::new(0));
    let from_credits = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for store in &stores {
        for _ in 0..16 {
            let (store, admitted, from_credits) = (store.clone(), admitted.clone(), from_credits.clone());
            tasks.push(tokio::spawn(async move {
                let limits = [requests(1024)];
                for _ in 0..30 {
                    if let Admission::Granted(permit) = store.admit(ask(&limits, 1), SystemTime::now()).await {
                        admitted.fetch_add(1, Ordering::Relaxed);
                        if permit.from_credit {
                            from_credits.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::task::yield_now().await;
                        store.finish(permit, Some(1), SystemTime::now()).await;
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    for store in &stores {
        store.answers_recorded().await;
    }
    let admitted = admitted.load(Ordering::Relaxed);
    assert_eq!(admitted, 1024, "1440 asks for 1024 slots");
    assert!(from_credits.load(Ordering::Relaxed) > 512, "most calls came from credits");
    assert_eq!(used(&env, "provider", "p", "requests").await, 1024);
    // One more ask finds the window full.
    let refused = stores[0].admit(ask(&limits, 1), SystemTime::now()).await;
    assert!(matches!(refused, Admission::OverQuota { .. }), "{refused:?}");
}

/// Three workers, two providers sharing a pool, calls admitted from credits and answered with
/// counts above and below their estimates, concurrently: raises and ends of one credit cross in
/// the batches. Once the workers stop, each window counts exactly the tokens answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_credits_end_with_every_answer_counted() {
    let env = TestEnv::new().await;
    let workers = [Worker::start(&env).await, Worker::start(&env).await, Worker::start(&env).await];
    let answered = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let from_credits = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (w, worker) in workers.iter().enumerate() {
        for t in 0..24usize {
            let (store, answered, from_credits) = (worker.store.clone(), answered.clone(), from_credits.clone());
            tasks.push(tokio::spawn(async move {
                let pools = [QuotaPoolConfig { name: "acct".into(), limits: vec![requests(100_000), tokens(1 << 40)] }];
                let own = [requests(100_000), tokens(1 << 40)];
                let mut x = (w * 1000 + t + 1) as u64;
                for _ in 0..40 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let p = (x % 2) as usize;
                    let provider = ["a", "b"][p];
                    let ask =
                        Ask { provider, limits: &own, pools: &pools, tokens: 100, flight: Duration::from_secs(30) };
                    let Admission::Granted(permit) = store.admit(ask, SystemTime::now()).await else {
                        panic!("room for every call");
                    };
                    if permit.from_credit {
                        from_credits.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(x % 7)).await;
                    let used = 50 + (x >> 8) % 100;
                    store.finish(permit, Some(used), SystemTime::now()).await;
                    answered[p].fetch_add(used, Ordering::Relaxed);
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    for worker in &workers {
        worker.store.answers_recorded().await;
    }
    assert!(from_credits.load(Ordering::Relaxed) > 2000, "most of the 2880 calls came from credits");
    let (a, b) = (answered[0].load(Ordering::Relaxed) as i64, answered[1].load(Ordering::Relaxed) as i64);
    let counted = (
        used(&env, "provider", "a", "tokens").await,
        used(&env, "provider", "b", "tokens").await,
        used(&env, "pool", "acct", "tokens").await,
        used(&env, "pool", "acct", "requests").await,
    );
    assert_eq!(counted, (a, b, a + b, 2880), "windows' totals (a, b, pool tokens, pool requests) vs answered");
}

/// Limits too small for a share of them to be held back get no credit: every call asks.
#[tokio::test]
async fn small_limits_get_no_credit() {
    let env = TestEnv::new().await;
    let worker = Worker::start(&env).await;
    let store = &worker.store;
    let limits = [requests(100_000), LimitConfig { per: Duration::from_secs(60), ..requests(30) }];
    let call = granted(store, ask(&limits, 1)).await;
    assert!(!call.from_credit);
    assert_eq!(used(&env, "provider", "p", "requests").await, 1);
}

/// A worker whose LISTEN session is not live asks call by call, as it reads cooldowns per call
/// then: a call admitted from a credit would see another worker's 429 only through it.
#[tokio::test]
async fn a_worker_without_its_listener_asks_call_by_call() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let limits = [requests(100_000)];
    let call = granted(&store, ask(&limits, 1)).await;
    assert!(!call.from_credit, "{call:?}");
    assert_eq!(used(&env, "provider", "p", "requests").await, 1);
}
