//! Review of 1f4c677 (answers of calls recorded without the job waiting): `finish` returns once
//! its answer is queued in the provider's batching queue. The queue orders one provider's
//! requests; these tests hold what it does not order: a pool mate's ask, an observation of the
//! provider's headers (`finish_written`, which the chain calls when headers follow).

use std::time::{Duration, SystemTime};

use fallback_worker::config::{LimitConfig, QuotaPoolConfig};
use fallback_worker::routing::QuotaObservation;
use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Admission, Ask, Permit, ProviderState, QuotaMeasure};

use crate::admission_review::lock_provider_row;
use crate::ledger_batching::{DEFAULT_POOL, release, store_at, until_waiting_on_locks};
use crate::support::*;

fn requests(n: u64, secs: u64) -> LimitConfig {
    LimitConfig { requests: Some(n), tokens: None, per: Duration::from_secs(secs), resets: None }
}

pub(crate) fn tokens(n: u64, secs: u64) -> LimitConfig {
    LimitConfig { requests: None, tokens: Some(n), per: Duration::from_secs(secs), resets: None }
}

pub(crate) async fn used(env: &TestEnv, kind: &str, scope: &str, measure: &str) -> i64 {
    sqlx::query_scalar("SELECT used FROM quota_window WHERE kind = $1 AND scope = $2 AND measure = $3")
        .bind(kind)
        .bind(scope)
        .bind(measure)
        .fetch_one(&mut env.db().await)
        .await
        .unwrap()
}

/// Another job's ask for `provider` (1 token), in flight: it waits on the provider's row, held
/// by another worker (`locker`), so the provider's later requests queue behind it.
async fn an_ask_in_flight(
    env: &TestEnv,
    store: &PgStore,
    provider: &'static str,
    limits: &[LimitConfig],
    pools: &[QuotaPoolConfig],
) -> (sqlx::PgConnection, tokio::task::JoinHandle<Admission>) {
    let locker = lock_provider_row(env, provider).await;
    let (store, limits, pools) = (store.clone(), limits.to_vec(), pools.to_vec());
    let blocked = tokio::spawn(async move {
        let ask = Ask { provider, limits: &limits, pools: &pools, tokens: 1, flight: Duration::from_secs(30) };
        store.admit(ask, SystemTime::now()).await
    });
    until_waiting_on_locks(env, 1).await;
    (locker, blocked)
}

/// A job's call to `a` answers with 950 tokens (asked 100); the job then goes on to `b`, which
/// shares `a`'s pool (the answer failed the job's checks, or the job is done and the worker's
/// next job asks `b`). `finish` has returned, so by the trait's word (state/mod.rs) the ask for
/// `b` is "bound to see" the answer: 100 + 1 + 950 + 100 does not fit the pool's 1000. But the
/// answer waits in `a`'s queue behind `a`'s batch in flight, while `b`'s ask, another key, is
/// ready first: it is decided before the answer and the pool ends at 1051 of 1000.
#[tokio::test]
async fn an_ask_for_another_provider_of_the_pool_after_finish_returned_sees_the_raised_count() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let own = [requests(100, 60)];
    let pools = [QuotaPoolConfig { name: "acct".into(), limits: vec![tokens(1000, 60)] }];
    let ask_a = Ask { provider: "a", limits: &own, pools: &pools, tokens: 100, flight: Duration::from_secs(30) };
    let Admission::Granted(a) = store.admit(ask_a, SystemTime::now()).await else { panic!("room for a") };
    let (locker, blocked) = an_ask_in_flight(&env, &store, "a", &own, &pools).await;
    let job = {
        let (store, own, pools) = (store.clone(), own.to_vec(), pools.to_vec());
        tokio::spawn(async move {
            store.finish(a, Some(950), SystemTime::now()).await;
            let ask_b =
                Ask { provider: "b", limits: &own, pools: &pools, tokens: 100, flight: Duration::from_secs(30) };
            store.admit(ask_b, SystemTime::now()).await
        })
    };
    // Let the job go as far as it goes while `a`'s batch waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    release(locker).await;
    assert!(matches!(blocked.await.unwrap(), Admission::Granted(_)));
    let b = job.await.unwrap();
    store.answers_recorded().await;
    let pool_used = used(&env, "pool", "acct", "tokens").await;
    assert!(
        matches!(b, Admission::OverQuota { measure: QuotaMeasure::Tokens, .. }),
        "b's ask was decided before a's answer: {b:?}, pool at {pool_used} of 1000"
    );
    assert!(pool_used <= 1000, "the pool's window ended at {pool_used} of 1000");
}

/// A call asked 100 tokens and used 500; the provider's headers in its answer say 500 of 1000
/// are left. `settle_success` (chain/mod.rs) observes them right after `finish` returned: the
/// observation (`fallback_observe`, straight on the pool) now lands before the answer, which
/// waits behind the provider's batch in flight. The observation learns 400 tokens of "someone
/// else's" use (500 seen, 100 counted), then the answer adds its own +400: the window holds
/// 900 + 1 where 500 + 1 were used. The chain answers with `finish_written` when headers
/// follow (chain::tests::a_success_hands_what_the_headers_said_to_the_store_with_the_admissions_ask).
#[tokio::test]
async fn headers_observed_after_finish_returned_do_not_count_the_raise_twice() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let limits = [requests(100, 60), tokens(1000, 60)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 100, flight: Duration::from_secs(30) };
    let Admission::Granted(call) = store.admit(ask, SystemTime::now()).await else { panic!("room") };
    let (locker, blocked) = an_ask_in_flight(&env, &store, "p", &limits, &[]).await;
    let job = {
        let (store, limits, call): (PgStore, Vec<LimitConfig>, Permit) = (store.clone(), limits.to_vec(), call);
        tokio::spawn(async move {
            store.finish_written(call.clone(), Some(500), SystemTime::now()).await;
            let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 100, flight: Duration::from_secs(30) };
            let seen = QuotaObservation {
                measure: QuotaMeasure::Tokens,
                remaining: 500,
                limit: Some(1000),
                resets_at: Some(SystemTime::now() + Duration::from_secs(60)),
                window: None,
            };
            store.observe_quota(ask, &call, &[seen], SystemTime::now()).await;
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    release(locker).await;
    assert!(matches!(blocked.await.unwrap(), Admission::Granted(_)));
    job.await.unwrap();
    store.answers_recorded().await;
    assert_eq!(used(&env, "provider", "p", "tokens").await, 500 + 1, "the call's 500 and the other ask's 1");
}

/// Review 2: a stopping worker waits for the answers of its last calls (app.rs,
/// `answers_recorded`), which no test held: with that line removed every test passed. The
/// answer is held in the database (its window's row locked, less than the answer's 1 s lock
/// timeout) after the job's result is published; the worker is told to stop then, and `run`
/// must not return while the answer waits (the process would exit and drop it).
#[tokio::test]
async fn a_stopping_worker_does_not_return_while_its_last_answer_is_being_written() {
    use fallback_worker::mock::{MockOptions, MockProvider, Profile};
    let env = TestEnv::new().await;
    let mut options = MockOptions::new(Profile::Groq);
    options.latency = Duration::from_millis(800);
    let free = MockProvider::start(options).await.unwrap();
    let providers = format!(
        "{}{}",
        provider("free", &free.base_url(), true, "limits = [{ requests = 1000000, per = \"1h\" }]"),
        chain("default", &["free"], "")
    );
    let worker = env.spawn_worker(env.config(&providers), "worker-a").await;
    env.publish(&job("last"), lapin::BasicProperties::default()).await;
    let locker = crate::backlog::window_held_once_admitted(&env).await;
    until_waiting_on_locks(&env, 1).await;
    let locked_at = tokio::time::Instant::now();
    let (result, _) = env.next_result(&env.results).await;
    assert!(result.is_success(), "{result:?}");
    worker.shutdown.cancel();
    let mut task = worker.task;
    // Until just before the answer's lock timeout: the worker must still be waiting for it.
    let returned_early = tokio::time::timeout_at(locked_at + Duration::from_millis(800), &mut task).await.is_ok();
    release(locker).await;
    if !returned_early {
        tokio::time::timeout(PATIENCE, task).await.expect("worker stops in time").unwrap().unwrap();
    }
    assert!(!returned_early, "the worker stopped while its last answer was still being written");
    crate::backlog::assert_answered(&env).await;
}

/// Review 2 (not of this change: `finish` never touched the refusal cache): a call asked 900 of
/// a 1000-token window; an ask of 200 is refused for tokens until the 900 leave (its flight
/// plus the window) and the refusal is kept (`quota_blocked`). The call then answers with 10
/// tokens, written: the database has room for 200 at once, but this process's next ask of 200
/// is refused from the cache, without asking, until the refusal's time.
#[tokio::test]
async fn a_refusal_kept_before_an_answer_that_lowered_the_count_still_refuses_after_it() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let limits = [tokens(1000, 60)];
    let ask = |tokens| Ask { provider: "p", limits: &limits, pools: &[], tokens, flight: Duration::from_secs(30) };
    let Admission::Granted(call) = store.admit(ask(900), SystemTime::now()).await else { panic!("room") };
    let refused = store.admit(ask(200), SystemTime::now()).await;
    assert!(matches!(refused, Admission::OverQuota { measure: QuotaMeasure::Tokens, .. }), "{refused:?}");
    store.finish_recorded(call, Some(10), SystemTime::now()).await.unwrap();
    let fresh = store_at(&env.database_url, DEFAULT_POOL).await;
    assert!(matches!(fresh.admit(ask(200), SystemTime::now()).await, Admission::Granted(_)), "the database has room");
    let again = store.admit(ask(200), SystemTime::now()).await;
    assert!(matches!(again, Admission::Granted(_)), "refused from the cache after the answer: {again:?}");
}

/// Review 2: the first review's pool-mate case, across workers. A client sends a job, waits for
/// its result, then sends the next; the next lands on another worker. Before 1f4c677 the
/// result was published only once the answer was written, so the next job's ask, on any
/// worker, counted the call's 950 tokens (asked 100): 100 + 1 + 950 + 100 does not fit 1000.
/// Now worker A's answer waits in A's queue behind A's batch in flight while B's ask, another
/// process, is decided first: the window ends past its limit.
#[tokio::test]
async fn the_next_job_of_a_client_on_another_worker_sees_the_previous_answers_count() {
    let env = TestEnv::new().await;
    let a = store_at(&env.database_url, DEFAULT_POOL).await;
    let b = store_at(&env.database_url, DEFAULT_POOL).await;
    let own = [tokens(1000, 60)];
    let ask = Ask { provider: "p", limits: &own, pools: &[], tokens: 100, flight: Duration::from_secs(30) };
    let Admission::Granted(call) = a.admit(ask, SystemTime::now()).await else { panic!("room") };
    let (locker, blocked) = an_ask_in_flight(&env, &a, "p", &own, &[]).await;
    // Worker A: the answer (950 tokens), then the job's result goes to the client, whose next
    // job lands on worker B.
    let next = {
        let (a, b, own) = (a.clone(), b.clone(), own.to_vec());
        tokio::spawn(async move {
            a.finish(call, Some(950), SystemTime::now()).await;
            let ask = Ask { provider: "p", limits: &own, pools: &[], tokens: 100, flight: Duration::from_secs(30) };
            b.admit(ask, SystemTime::now()).await
        })
    };
    // Let the job go as far as it goes while A's batch waits: now B's ask waits on the lock
    // too, queued behind A's (before 1f4c677 the job waited for its answer, there was none).
    let waiting =
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'";
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    while tokio::time::Instant::now() < until
        && sqlx::query_scalar::<_, i64>(waiting).fetch_one(&mut env.db().await).await.unwrap() < 2
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    release(locker).await;
    assert!(matches!(blocked.await.unwrap(), Admission::Granted(_)));
    let next = next.await.unwrap();
    a.answers_recorded().await;
    let window = used(&env, "provider", "p", "tokens").await;
    assert!(
        matches!(next, Admission::OverQuota { measure: QuotaMeasure::Tokens, .. }),
        "the next job's ask was decided before the previous answer: {next:?}, window at {window} of 1000"
    );
}
