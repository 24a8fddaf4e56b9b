//! Adversarial review of batched admission and finishes (issue #9): each test here failed on the
//! branch as reviewed.

use std::time::{Duration, Instant, SystemTime};

use fallback_worker::config::LimitConfig;
use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Admission, Ask, ProviderState};
use sqlx::PgConnection;

use crate::ledger_batching::{
    DEFAULT_POOL, FreezingRelay, admits_again, lock_keys, open_queued, release, spawn_queued, store_at,
    store_behind_freezing_relay, until_waiting_on_locks,
};
use crate::support::*;

fn requests(n: u64, secs: u64) -> LimitConfig {
    LimitConfig { requests: Some(n), tokens: None, per: Duration::from_secs(secs), resets: None }
}

fn tokens(n: u64, secs: u64) -> LimitConfig {
    LimitConfig { requests: None, tokens: Some(n), per: Duration::from_secs(secs), resets: None }
}

/// A session holding `provider`'s row lock (the row created if need be) until `release`: an
/// admission for that provider waits on it.
pub(crate) async fn lock_provider_row(env: &TestEnv, provider: &str) -> PgConnection {
    let mut locker = env.db().await;
    sqlx::query("INSERT INTO provider_state (provider) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(provider)
        .execute(&mut locker)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("SELECT 1 FROM provider_state WHERE provider = $1 FOR UPDATE")
        .bind(provider)
        .execute(&mut locker)
        .await
        .unwrap();
    locker
}

/// One ask of 1 request for `provider` (100 per minute), answered in the background.
fn admit_in_background(store: &PgStore, provider: &'static str) -> tokio::task::JoinHandle<Admission> {
    let store = store.clone();
    tokio::spawn(async move {
        let limits = [requests(100, 60)];
        let ask = Ask { provider, limits: &limits, pools: &[], tokens: 1, flight: Duration::from_secs(5) };
        store.admit(ask, SystemTime::now()).await
    })
}

/// A circuit's cooldown of 30 s, as a worker writes after a run of 5xx.
fn circuit_cooldown() -> fallback_worker::state::Cooldown {
    fallback_worker::state::Cooldown {
        until: SystemTime::now() + Duration::from_secs(30),
        reason: fallback_worker::routing::CooldownReason::Circuit,
        detail: "test".into(),
    }
}

/// One admission batch of `store` for `provider` waits on the provider's row (held by another
/// session), and its connection then dies without a close.
async fn a_batch_dies_silently(env: &TestEnv, relay: &FreezingRelay, store: &PgStore, provider: &'static str) {
    let locker = lock_provider_row(env, provider).await;
    let hung = admit_in_background(store, provider);
    until_waiting_on_locks(env, 1).await;
    relay.freeze_existing();
    release(locker).await;
    let _ = hung.await.unwrap();
}

/// A batch that times out is dropped mid-query; sqlx then "returns" its connection to the pool
/// with a ping that has no timeout, and on a connection that died without a close that ping
/// never ends: the pool's slot is held for the process's life. Two such batches (the default
/// pool has two connections) and no state call ever gets a connection again, although the
/// database answers every new connection.
#[tokio::test]
async fn two_batches_on_dead_connections_do_not_leave_the_pool_without_connections() {
    let env = TestEnv::new().await;
    let (relay, store) = store_behind_freezing_relay(&env).await;
    let limits = [requests(100, 60)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: Duration::from_secs(5) };
    assert!(matches!(store.admit(ask, SystemTime::now()).await, Admission::Granted(_)));

    for provider in ["dead-1", "dead-2"] {
        a_batch_dies_silently(&env, &relay, &store, provider).await;
        // Until the database takes this worker's calls again (a new connection each time).
        admits_again(&store, ask, &format!("the batch of {provider}")).await;
    }
}

/// A provider's reported token count is taken as is (`usage.total_tokens`, any u64). One absurd
/// count in a batch of finishes makes the whole statement fail (bigint out of range), and the
/// other calls' raised counts in that batch are lost: those windows then count fewer tokens
/// than were used, and admit past their limit. One call at a time, only the absurd call's own
/// finish failed.
#[tokio::test]
async fn one_absurd_token_count_does_not_lose_the_other_finishes_of_its_batch() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let limits = [tokens(1_000, 60)];
    let honest = Ask { provider: "honest", limits: &limits, pools: &[], tokens: 100, flight: Duration::from_secs(30) };
    let hostile =
        Ask { provider: "hostile", limits: &limits, pools: &[], tokens: 100, flight: Duration::from_secs(30) };
    let Admission::Granted(a) = store.admit(honest, SystemTime::now()).await else { panic!("room") };
    let Admission::Granted(b) = store.admit(hostile, SystemTime::now()).await else { panic!("room") };
    // Both usages already count something else, so the absurd count overflows its window.
    let Admission::Granted(_) = store.admit(hostile, SystemTime::now()).await else { panic!("room") };

    // Hold the batcher's one batch in flight (an ask waiting on a row lock), so the two
    // finishes queue and go out together.
    let locker = lock_provider_row(&env, "blocker").await;
    let blocked = admit_in_background(&store, "blocker");
    until_waiting_on_locks(&env, 1).await;
    // Both finishes are queued behind the batch in flight before it ends.
    let finishes = {
        let store = store.clone();
        spawn_queued(async move {
            let honest_finish = store.finish_recorded(a, Some(900), SystemTime::now());
            let hostile_finish = store.finish_recorded(b, Some(u64::MAX), SystemTime::now());
            let _ = tokio::join!(honest_finish, hostile_finish);
        })
    };
    release(locker).await;
    let _ = blocked.await;
    finishes.await.unwrap();

    let mut db = env.db().await;
    let used: i64 = sqlx::query_scalar(
        "SELECT used FROM quota_window WHERE kind = 'provider' AND scope = 'honest' AND measure = 'tokens'",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(used, 900, "the honest provider's call used 900 tokens; its window counts {used}");
}

/// A pool without limits is allowed (it only says which providers share an account). A provider
/// with no limits of its own drawing from such a pool asks with no window at all: the batch then
/// granted the asks but answered none of them (its grants were returned only when a window row
/// was inserted), and every call failed with "no row for an ask".
#[tokio::test]
async fn a_provider_whose_only_pool_has_no_limits_is_admitted() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let pools = [fallback_worker::config::QuotaPoolConfig { name: "account".into(), limits: Vec::new() }];
    let ask = Ask { provider: "p", limits: &[], pools: &pools, tokens: 10, flight: Duration::from_secs(5) };
    for _ in 0..3 {
        let answer = store.admit(ask, SystemTime::now()).await;
        assert!(matches!(answer, Admission::Granted(_)), "{answer:?}");
    }
}

/// A finish of a call counted in a pool and in its provider's own window, and an admission of
/// that provider, both waiting on the pool's window (held by a third session): when it is
/// released, neither may deadlock the other, whichever of them queued first. Each order catches
/// one side locking out of the canonical order (a reversed `ORDER BY` in `fallback_admit_batch`
/// or in `fallback_finish_batch`); no other test did.
async fn finish_and_admission_cross_on_the_pool_window(finish_first: bool) {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let pools = [fallback_worker::config::QuotaPoolConfig { name: "account".into(), limits: vec![requests(100, 60)] }];
    let own = [requests(100, 60)];
    let ask = Ask { provider: "a", limits: &own, pools: &pools, tokens: 1, flight: Duration::from_secs(30) };
    let Admission::Granted(call) = store.admit(ask, SystemTime::now()).await else { panic!("room") };
    let call = call.usage_id.unwrap();
    // The waits here are the test's own, however slow the machine: only a deadlock may end them.
    for function in ["fallback_admit_batch", "fallback_finish_batch"] {
        crate::batched_admission::for_every_signature_then(
            &env,
            function,
            "ALTER FUNCTION",
            "SET lock_timeout = '60s'",
        )
        .await;
    }

    let mut holder = env.db().await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM quota_window WHERE kind = 'pool' AND scope = 'account' FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let finish = || {
        let env_url = env.database_url.clone();
        tokio::spawn(async move {
            use sqlx::Connection;
            let mut db = sqlx::PgConnection::connect(&env_url).await.unwrap();
            sqlx::query("SELECT fallback_finish_batch($1, $2)")
                .bind(vec![call])
                .bind(vec![None::<i64>])
                .execute(&mut db)
                .await
                .map(|_| ())
        })
    };
    let admit = || {
        let (store, own, pools) = (store.clone(), own.to_vec(), pools.to_vec());
        tokio::spawn(async move {
            let ask = Ask { provider: "a", limits: &own, pools: &pools, tokens: 1, flight: Duration::from_secs(30) };
            store.admit(ask, SystemTime::now()).await
        })
    };
    let (finished, admitted) = if finish_first {
        let finished = finish();
        until_waiting_on_locks(&env, 1).await;
        let admitted = admit();
        until_waiting_on_locks(&env, 2).await;
        (finished, admitted)
    } else {
        let admitted = admit();
        until_waiting_on_locks(&env, 1).await;
        let finished = finish();
        until_waiting_on_locks(&env, 2).await;
        (finished, admitted)
    };
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let (finished, admitted) = (finished.await.unwrap(), admitted.await.unwrap());
    assert!(finished.is_ok(), "the finish failed: {finished:?}");
    assert!(matches!(admitted, Admission::Granted(ref p) if p.usage_id.is_some()), "the admission: {admitted:?}");
}

#[tokio::test]
async fn a_finish_queued_first_on_a_pool_window_does_not_deadlock_an_admission() {
    finish_and_admission_cross_on_the_pool_window(true).await;
}

#[tokio::test]
async fn an_admission_queued_first_on_a_pool_window_does_not_deadlock_a_finish() {
    finish_and_admission_cross_on_the_pool_window(false).await;
}

/// One ledger batch of `store` for `key` waits on that key's row lock, and its connection then
/// dies without a close.
async fn a_ledger_batch_dies_silently(env: &TestEnv, relay: &FreezingRelay, store: &PgStore, key: &'static str) {
    let locker = lock_keys(env, &[key]).await;
    let hung = open_queued(store, key);
    until_waiting_on_locks(env, 1).await;
    relay.freeze_existing();
    release(locker).await;
    let _ = hung.await.unwrap();
}

/// The ledger's batcher drops a timed-out batch the same way: each dead ledger batch held one of
/// the pool's slots for good, and two of them left admissions (and every state call) without a
/// connection for the process's life.
#[tokio::test]
async fn two_ledger_batches_on_dead_connections_do_not_leave_admissions_without_connections() {
    let env = TestEnv::new().await;
    let (relay, store) = store_behind_freezing_relay(&env).await;
    let limits = [requests(100, 60)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: Duration::from_secs(5) };
    for key in ["dead-1", "dead-2"] {
        a_ledger_batch_dies_silently(&env, &relay, &store, key).await;
        admits_again(&store, ask, &format!("the ledger batch for {key}")).await;
    }
}

/// Upgrade: a worker applies its migrations at start, and sqlx refuses a database that has a
/// migration the worker does not know. So once a newer version's migration is applied, a worker
/// of this version that restarts during the rollout (a crash, a rescheduled pod, a rollback)
/// cannot start at all, although a newer migration keeps what older workers use (as 0008 keeps
/// 0007's functions). The same holds today for main's workers after 0008 (their binary cannot
/// change); this version at least tolerates the next one.
#[tokio::test]
async fn a_worker_still_starts_after_a_newer_versions_migration() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    // The next version's migrations: this version's and one more.
    let dir = std::env::temp_dir().join(format!("fallback-next-migrations-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(dir.join("9999_next_version.sql"), "CREATE TABLE next_version_marker (id int);").unwrap();
    let next = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
    next.run(store.pool()).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    // This version's worker restarts.
    let restarted = store.migrate().await;
    assert!(restarted.is_ok(), "this version's worker cannot start after the next version's migration: {restarted:?}");
}

/// One batch at a time with the default pool: a batch waiting on a lock holds every other
/// provider's admissions back. Another session holding one provider's row (a slow admission of
/// another worker, an operator's transaction) then stalls a second provider that shares nothing
/// with it: its ask waits until the first batch gives up after 5 s, past the caller's 2 s, so it
/// is refused (and three such timeouts in a row switch the worker to degraded mode). With one
/// admission per call, the other provider was answered at once.
#[tokio::test]
async fn a_lock_on_one_providers_row_does_not_stall_another_providers_admissions() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let limits = [requests(100, 60)];
    for provider in ["locked", "free"] {
        let ask = Ask { provider, limits: &limits, pools: &[], tokens: 1, flight: Duration::from_secs(5) };
        assert!(matches!(store.admit(ask, SystemTime::now()).await, Admission::Granted(_)));
    }
    let locker = lock_provider_row(&env, "locked").await;
    let stuck = admit_in_background(&store, "locked");
    until_waiting_on_locks(&env, 1).await;
    let ask = Ask { provider: "free", limits: &limits, pools: &[], tokens: 1, flight: Duration::from_secs(5) };
    let started = Instant::now();
    let answer = store.admit(ask, SystemTime::now()).await;
    let waited = started.elapsed();
    release(locker).await;
    let _ = stuck.await;
    assert!(
        matches!(answer, Admission::Granted(ref p) if p.usage_id.is_some()),
        "the free provider's ask, after {waited:?}: {answer:?}"
    );
}

/// A batch straddling a calendar reset (the worker's first reset has passed by the database's
/// clock) is decided as one admission after another would be: same grants, same waits, and the
/// same leaving times and first resets recorded. The equivalence test covers sliding windows
/// only.
#[tokio::test]
async fn a_batch_straddling_a_calendar_reset_is_decided_as_single_admissions_are() {
    let env = TestEnv::new().await;
    let _store = store_at(&env.database_url, DEFAULT_POOL).await;
    let mut db = env.db().await;
    let args = "ARRAY['provider', 'provider'], ARRAY[$1, $1], ARRAY['requests', 'tokens'], ARRAY[86400000, 86400000]::bigint[], \
                ARRAY['00:00 UTC', '00:00 UTC'], ARRAY[3, 100]::bigint[], \
                ARRAY[now() - interval '1 second', now() - interval '1 second'], \
                ARRAY[now() + interval '86399 seconds', now() + interval '86399 seconds']";
    let tokens = [30i64, 50, 10, 20, 5, 40];
    // Each ask's deadline ends before the passed reset (as the worker computed it): its leaving
    // time must still be the next reset.
    let batch_sql = format!(
        "SELECT ask, usage_id IS NOT NULL, blocked_until_ms, blocked_by FROM fallback_admit_batch('batch', {args}, $2, \
         array_fill(10000::bigint, ARRAY[6]), array_fill(now() - interval '1 second', ARRAY[12])) ORDER BY ask"
    );
    let batch: Vec<(i32, bool, Option<i64>, Option<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(batch_sql))
        .bind("batch")
        .bind(tokens.to_vec())
        .fetch_all(&mut db)
        .await
        .unwrap();
    let mut single = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let one_sql = format!(
            "SELECT usage_id IS NOT NULL, blocked_until_ms, blocked_by FROM fallback_admit('one', {args}, \
             ARRAY[now() - interval '1 second', now() - interval '1 second'], $2, 10000)"
        );
        let (granted, until, by): (bool, Option<i64>, Option<String>) =
            sqlx::query_as(sqlx::AssertSqlSafe(one_sql)).bind("one").bind(*t).fetch_one(&mut db).await.unwrap();
        single.push((i as i32 + 1, granted, until, by));
    }
    // now() is the transaction's start: each statement its own, so waits may differ by the
    // statements' time apart; compare them to the second.
    let coarse = |v: &[(i32, bool, Option<i64>, Option<String>)]| {
        v.iter().map(|(a, g, u, b)| (*a, *g, u.map(|ms| ms / 10_000), b.clone())).collect::<Vec<_>>()
    };
    assert_eq!(coarse(&batch), coarse(&single));
    let rows = |scope: &'static str| {
        sqlx::query_as::<_, (String, i64, f64, f64)>(
            "SELECT measure, amount, extract(epoch FROM leaves_at - now())::float8, extract(epoch FROM first_reset - now())::float8 \
             FROM quota_use WHERE scope = $1 ORDER BY call_id, measure",
        )
        .bind(scope)
    };
    let b: Vec<(String, i64, f64, f64)> = rows("batch").fetch_all(&mut db).await.unwrap();
    let o: Vec<(String, i64, f64, f64)> = rows("one").fetch_all(&mut db).await.unwrap();
    let round = |v: Vec<(String, i64, f64, f64)>| {
        v.into_iter()
            .map(|(m, a, l, f)| (m, a, (l / 10.0).round() as i64, (f / 10.0).round() as i64))
            .collect::<Vec<_>>()
    };
    let (b, o) = (round(b), round(o));
    assert!(!b.is_empty(), "some asks were granted");
    assert_eq!(b, o);
    assert!(b.iter().all(|r| r.2 > 8_000), "every grant leaves at the next reset, a day on: {b:?}");
}

/// The same mechanism for every other state call (`guarded`: a cooldown's write, a circuit's
/// probe, an observation), bounded by dropping its future after 2 s, mid-query: sqlx then
/// returns the connection with a ping that has no timeout, which on a dead connection held one of
/// the pool's slots until the kernel gave up (about 15 minutes). The pool now pings a returned
/// connection with a 1 s bound first (`after_release`) and drops one that does not answer: two
/// cooldown writes on dead connections no longer leave the default pool without a connection.
#[tokio::test]
async fn two_cooldown_writes_on_dead_connections_do_not_leave_admissions_without_connections() {
    let env = TestEnv::new().await;
    let (relay, store) = store_behind_freezing_relay(&env).await;
    let limits = [requests(100, 60)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: Duration::from_secs(5) };
    for provider in ["dead-1", "dead-2"] {
        let locker = lock_provider_row(&env, provider).await;
        let hung = {
            let store = store.clone();
            tokio::spawn(async move { store.cool_down(provider, circuit_cooldown()).await })
        };
        until_waiting_on_locks(&env, 1).await;
        relay.freeze_existing();
        release(locker).await;
        hung.await.unwrap();
        admits_again(&store, ask, &format!("the cooldown write for {provider}")).await;
    }
}

/// Review of the release ping (`after_release`, 1 s): a live but slow database (a cooldown
/// write waiting on a row lock another session holds) must not make the worker open more
/// backends than its pool has slots. The hook closes a connection whose dropped query has not
/// ended 1 s after `guarded` gave up, but Postgres does not notice a closed client while the
/// query waits on a lock: the backend stays, still queued on the lock, and the pool's slot is
/// free for a new connection, whose next write queues behind it. Each round of timeouts added
/// `pool` orphaned backends (4 on a 2-connection pool here; without the hook the slot stays taken
/// until the query ends). Each session now sets `client_connection_check_interval`, so the
/// server ends such a backend within about a second.
#[tokio::test]
async fn cooldown_writes_waiting_on_a_lock_do_not_open_more_backends_than_the_pool_has() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let limits = [requests(100, 60)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: Duration::from_secs(5) };
    let locker = lock_provider_row(&env, "slow").await;
    for _round in 0..2 {
        let writes: Vec<_> = (0..DEFAULT_POOL)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.cool_down("slow", circuit_cooldown()).await })
            })
            .collect();
        for write in writes {
            tokio::time::timeout(Duration::from_secs(10), write).await.expect("guarded ends a write").unwrap();
        }
        // Past the release ping's bound; then one call that may succeed (it resets the run of
        // timeouts, as any other worker traffic between the writes would).
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), store.admit(ask, SystemTime::now())).await;
    }
    // A backend whose client left may take a moment to notice; 5 s is plenty.
    let settled = Instant::now();
    let waiting = loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'fallback-worker' AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut env.db().await)
        .await
        .unwrap();
        if waiting <= i64::from(DEFAULT_POOL) || settled.elapsed() > Duration::from_secs(5) {
            break waiting;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    release(locker).await;
    assert!(
        waiting <= i64::from(DEFAULT_POOL),
        "{waiting} backends of a {DEFAULT_POOL}-connection pool wait on the lock (pool: {} open)",
        store.pool().size()
    );
}
