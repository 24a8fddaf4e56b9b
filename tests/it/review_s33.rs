//! Adversarial review of ea8db0b (an outage's calls and the answers kept meanwhile written back
//! in one transaction) and f2e9d19 (a 429 without a retry time cools the provider 60 s as an
//! estimate, `rate_limited_estimate`). Each test is a fault found and fails on f2e9d19.
//! Checked against f6946ba's `src/state/postgres.rs` as well: `calls_admitted_during_…` and
//! `the_write_back_creating_…` pass there (regressions of ea8db0b); `an_absurd_token_count_…`
//! and `a_write_back_whose_commit_answer_…` fail there too (older faults the change keeps).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fallback_worker::chain::cooldown_for;
use fallback_worker::providers::errors::{ErrorInfo, classify};
use fallback_worker::routing::CooldownReason;
use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Cooldown, ProviderState};

use crate::credits::{ask, granted, requests, tokens};
use crate::ledger_batching::{DEFAULT_POOL, store_at, until_waiting_on_locks};
use crate::review_finish::used;
use crate::support::relay::Relay;
use crate::support::*;

/// A store whose every connection goes through a relay the test can take down. No LISTEN
/// session: every limited call asks the database (no credits).
pub(crate) async fn store_behind_relay(env: &TestEnv) -> (PgStore, Relay) {
    let relay = Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = env.database_url.replace("127.0.0.1:5432", &relay.addr.to_string());
    let store = PgStore::connect_lazy(&url, 4).unwrap();
    store.migrate().await.unwrap();
    (store, relay)
}

async fn lock_waiters(env: &TestEnv) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(&mut env.db().await)
    .await
    .unwrap()
}

/// Provider p's `measure` window once it reaches `want`, or as it stands after 15 s.
pub(crate) async fn settled_count(env: &TestEnv, measure: &str, want: i64) -> i64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let counted = used(env, "provider", "p", measure).await;
        if counted == want || tokio::time::Instant::now() >= deadline {
            return counted;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// f2e9d19: an estimate (60 s, no retry time given) is "our guess; the provider may say
/// otherwise meanwhile, through another worker" (the chain test's own words). But a cooldown
/// only moves forward (`Cooldown::replaces`, `share_cooldown`'s CASE): when another worker's
/// call, in flight at the same moment, gets the provider's own word — retry in 30 s — that word
/// is dropped and the guess stays, with its reason. The provider is skipped 30 s longer than
/// it asked by every worker, and a job whose `max_wait` ends between 30 and 60 s fails at its
/// deadline though the provider said it would take calls again before it. Contract §6: a 429
/// cools the provider "until the time the provider gave, or 60 s when it gave none".
#[tokio::test]
async fn the_providers_own_retry_time_replaces_an_earlier_estimate_of_ours() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let now = SystemTime::now();
    let guess = Cooldown {
        until: now + Duration::from_secs(60),
        reason: CooldownReason::RateLimitedEstimate,
        detail: "429 without a retry time".into(),
    };
    store.cool_down("p", guess).await;
    let word = Cooldown {
        until: now + Duration::from_secs(30),
        reason: CooldownReason::RateLimited,
        detail: "429, retry-after: 30".into(),
    };
    store.cool_down("p", word).await;
    let (reason, until_ms): (String, i64) = sqlx::query_as(
        "SELECT cooldown_reason, fallback_epoch_ms(cooldown_until) FROM provider_state WHERE provider = 'p'",
    )
    .fetch_one(&mut env.db().await)
    .await
    .unwrap();
    let until = UNIX_EPOCH + Duration::from_millis(until_ms as u64);
    let ahead = until.duration_since(now).unwrap_or_default();
    assert!(
        reason == "rate_limited" && ahead <= Duration::from_secs(30),
        "the provider said 30 s; the shared row keeps our 60 s guess (reason {reason}, {ahead:?} ahead)"
    );
}

/// f2e9d19: "a daily quota's 429 with no time to go by: an estimate too" (its unit test of
/// `cooldown_for` with `retry_at: None, daily: true`). The classifier never produces that
/// combination: a per-day 429 that gives no reset gets *our* guess of one (the next UTC
/// midnight, `daily_reset`'s fallback: "our guess for daily quotas whose provider gives no
/// reset"), with `retry_at` set, and so the reason `quota_day` — the provider's word, which
/// fails every job whose `max_wait` ends before that midnight at once. Here Cerebras' verbatim
/// per-day body (providers.md) with no reset header.
#[test]
fn a_daily_429_whose_reset_is_our_guess_is_an_estimate() {
    let body = r#"{"message":"Tokens per day limit exceeded - too many tokens processed.","type":"too_many_tokens_error","param":"quota","code":"token_quota_exceeded"}"#;
    let parsed: serde_json::Value = serde_json::from_str(body).unwrap();
    let now = SystemTime::now();
    let failure =
        classify(429, &reqwest::header::HeaderMap::new(), &ErrorInfo::read(Some(&parsed), body.as_bytes()), now);
    assert!(failure.daily && failure.retry_at.is_some(), "{failure:?}");
    let (until, reason) = cooldown_for("cerebras", &failure, now).unwrap();
    assert_eq!(
        reason,
        CooldownReason::QuotaDayEstimate,
        "no time given: our guess of midnight ({:?} ahead) is taken as the provider's word",
        until.duration_since(now).unwrap_or_default()
    );
    assert!(!reason.is_providers_word());
}

/// The write-back counts each outage call's tokens as the own view holds them: the provider's
/// `usage.total_tokens`, unclamped (`plan_written_back_calls`; the answer paths clamp it to
/// `MAX_REPORTED_TOKENS` "so that one absurd count does not fail its whole batch (bigint out of
/// range)", `remember_written_back_in_flight` does too). Two such answers during an outage:
/// the window's sum is out of bigint's range, the one transaction fails, every retry fails the
/// same, and the worker never leaves degraded mode (no ledger, local shares) — and since
/// ea8db0b the answers kept meanwhile (credit endings) are held back with the calls, for good.
#[tokio::test]
async fn an_absurd_token_count_answered_during_an_outage_does_not_keep_the_worker_degraded() {
    let env = TestEnv::new().await;
    let (store, relay) = store_behind_relay(&env).await;
    let limits = [tokens(1_000_000)];
    relay.set_down(true);
    let first = granted(&store, ask(&limits, 10)).await;
    assert!(store.is_degraded(), "the first call found the database gone");
    let second = granted(&store, ask(&limits, 10)).await;
    store.finish(first, Some(u64::MAX), SystemTime::now()).await;
    store.finish(second, Some(u64::MAX), SystemTime::now()).await;
    relay.set_down(false);
    eventually("the database is back and the outage's calls are written back", || async { !store.is_degraded() }).await;
}

/// ea8db0b: the outage's calls and the answers kept meanwhile now commit together, so a
/// failure of the answers' part (`fallback_finish_batch` gives up a lock wait after 1 s, or a
/// deadlock) takes the calls with it. `recover` retries the first write-back until it succeeds,
/// but the second — for what was admitted while the first ran — is tried once: "the last calls
/// of the outage wait for the next write-back", i.e. the next outage, which may never come.
/// Before, its calls were committed first and only the answers waited. Now the calls are never
/// counted: the shared window counts less than was sent (here 2 of 3), and other workers admit
/// past the provider's limit.
#[tokio::test]
async fn calls_admitted_during_the_first_write_back_are_counted_even_when_answers_fail() {
    let env = TestEnv::new().await;
    let (store, relay) = store_behind_relay(&env).await;
    let limits = [requests(100)];
    // C: admitted by the database, answered only during the outage.
    let c = granted(&store, ask(&limits, 1)).await;
    let c_id = c.usage_id.expect("admitted by the database");
    assert_eq!(used(&env, "provider", "p", "requests").await, 1);

    relay.set_down(true);
    let l1 = granted(&store, ask(&limits, 1)).await;
    assert!(store.is_degraded());
    store.finish(l1, Some(1), SystemTime::now()).await;

    // The first write-back (L1, no answers) waits on the window, held by another worker.
    let mut window_locker = env.db().await;
    sqlx::query("BEGIN").execute(&mut window_locker).await.unwrap();
    sqlx::query(
        "SELECT 1 FROM quota_window WHERE kind = 'provider' AND scope = 'p' AND measure = 'requests' FOR UPDATE",
    )
    .execute(&mut window_locker)
    .await
    .unwrap();
    relay.set_down(false);
    until_waiting_on_locks(&env, 1).await;

    // Meanwhile (still degraded): L2 is admitted locally, and C's answer arrives.
    let l2 = granted(&store, ask(&limits, 1)).await;
    assert!(store.is_degraded());
    store.finish(l2, Some(1), SystemTime::now()).await;
    store.finish(c, Some(1), SystemTime::now()).await;

    // C's row is held elsewhere for a while when the second write-back comes.
    let mut row_locker = env.db().await;
    sqlx::query("BEGIN").execute(&mut row_locker).await.unwrap();
    sqlx::query("SELECT 1 FROM quota_use WHERE call_id = $1 FOR UPDATE")
        .bind(c_id)
        .execute(&mut row_locker)
        .await
        .unwrap();
    sqlx::query("ROLLBACK").execute(&mut window_locker).await.unwrap();
    // The write-back that takes C's answer (on f2e9d19 the second, with L2; before ea8db0b the
    // first, after its calls) waits on C's row, then gives up (lock_timeout 1 s).
    until_waiting_on_locks(&env, 1).await;
    eventually("the write-back has given up its wait", || async { lock_waiters(&env).await == 0 }).await;
    sqlx::query("ROLLBACK").execute(&mut row_locker).await.unwrap();
    eventually("the database is back", || async { !store.is_degraded() }).await;

    let counted = settled_count(&env, "requests", 3).await;
    assert_eq!(counted, 3, "C, L1 and L2 were sent; the window counts {counted}: L2 waits for the next outage");
}

/// "A write-back that fails part-way counts nothing and its retry counts each call once" —
/// unless the failure is the commit's answer: the transaction committed, the connection was
/// lost before its `CommandComplete` came back (the database was just back from an outage: a
/// flapping link). `write_back` then puts the calls back and `recover` writes them again, under
/// new ids: every outage call counts twice, for its whole window. Here a deferred trigger holds
/// the commit for 2 s so that the test can hold the answer back and cut the link.
#[tokio::test]
async fn a_write_back_whose_commit_answer_is_lost_does_not_count_its_calls_twice() {
    let env = TestEnv::new().await;
    let (store, relay) = store_behind_relay(&env).await;
    let limits = [requests(100)];
    relay.set_down(true);
    let local = granted(&store, ask(&limits, 1)).await;
    assert!(store.is_degraded());
    store.finish(local, Some(1), SystemTime::now()).await;

    let mut admin = env.db().await;
    sqlx::raw_sql(
        "CREATE FUNCTION review_s33_slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER review_s33_slow_commit AFTER INSERT ON quota_use \
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION review_s33_slow_commit();",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    relay.set_down(false);
    eventually("the write-back commits", || async {
        let committing: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' \
               AND query ILIKE 'commit%'",
        )
        .fetch_one(&mut env.db().await)
        .await
        .unwrap();
        committing > 0
    })
    .await;
    relay.hold(true);
    eventually("the write-back has committed", || async {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM quota_use WHERE scope = 'p'")
            .fetch_one(&mut env.db().await)
            .await
            .unwrap();
        rows > 0
    })
    .await;
    sqlx::raw_sql("DROP TRIGGER review_s33_slow_commit ON quota_use").execute(&mut admin).await.unwrap();
    // The commit's answer is lost with the link.
    relay.cut();
    relay.hold(false);
    eventually("the database is back", || async { !store.is_degraded() }).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 1, "one call was made during the outage");
}

/// ea8db0b locks every window that exists first (`lock_windows_of`), then creates the missing
/// ones with the calls' insert: a missing window is taken *after* windows that sort later, out
/// of the canonical order "every admission locks them" in. A pool added to the config while
/// the database was away (or first used during an outage) is such a window: ('pool', …) sorts
/// before ('provider', …). Another worker's answer with rate-limit headers observes the
/// provider's windows in the canonical order (`fallback_observe_batch`, "never deadlocks with
/// them"): it creates and holds the pool's window, then asks for the provider's. The write-back
/// holds the provider's window and waits to insert the pool's: a deadlock, which Postgres
/// breaks by failing one of them (here the observation, whose `deadlock_timeout` is shorter so
/// that the victim is known). The two statements of the observation stand for the two windows
/// of its one statement, the write-back's lock falling between them.
#[tokio::test]
async fn the_write_back_creating_a_new_pools_window_does_not_deadlock_with_an_observation() {
    use fallback_worker::config::QuotaPoolConfig;
    use fallback_worker::state::Ask;
    let env = TestEnv::new().await;
    let (store, relay) = store_behind_relay(&env).await;
    let limits = [requests(100)];
    // Before the outage the provider drew from no pool: its own window exists, the pool's not.
    let before = granted(&store, ask(&limits, 1)).await;
    store.finish(before, Some(1), SystemTime::now()).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 1);

    relay.set_down(true);
    let pools = [QuotaPoolConfig { name: "shared".into(), limits: vec![requests(1000)] }];
    let pooled = Ask { pools: &pools, ..ask(&limits, 1) };
    let local = granted(&store, pooled).await;
    assert!(store.is_degraded());
    store.finish(local, Some(1), SystemTime::now()).await;

    // Another worker observes the pool's window (creating it) and is about to observe p's.
    let mut observer = env.db().await;
    sqlx::raw_sql("SET deadlock_timeout = '100ms'; BEGIN").execute(&mut observer).await.unwrap();
    sqlx::query(
        "SELECT fallback_observe('pool', 'shared', 'requests', 3600000, '', 1000, 990, now() + interval '1 hour', \
                                 NULL::bigint, NULL::bigint)",
    )
    .execute(&mut observer)
    .await
    .unwrap();
    relay.set_down(false);
    // The write-back holds p's window and waits to create the pool's.
    until_waiting_on_locks(&env, 1).await;
    let observed = tokio::time::timeout(
        Duration::from_secs(10),
        sqlx::query(
            "SELECT fallback_observe('provider', 'p', 'requests', 3600000, '', 100, 98, now() + interval '1 hour', \
                                     NULL::bigint, NULL::bigint)",
        )
        .execute(&mut observer),
    )
    .await
    .expect("the observation is still waiting after 10 s");
    let deadlock = observed.as_ref().err().map(|e| e.to_string());
    sqlx::query("ROLLBACK").execute(&mut observer).await.ok();
    assert!(deadlock.is_none(), "the observation and the write-back deadlocked: {deadlock:?}");
    eventually("the database is back", || async { !store.is_degraded() }).await;
}
