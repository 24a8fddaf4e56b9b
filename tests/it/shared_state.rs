//! Cooldowns shared by every worker through Postgres (contract §6).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fallback_worker::config::{LimitConfig, QuotaPoolConfig};
use fallback_worker::mock::{MockOptions, MockProvider, Profile, RetryHint, Scenario};
use fallback_worker::routing::CooldownReason;
use fallback_worker::routing::QuotaObservation;
use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Admission, Ask, Cooldown, Permit, ProviderState, QuotaMeasure, Receipt};
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;

use crate::support::relay::Relay;
use crate::support::*;

#[tokio::test]
async fn after_one_workers_429_the_other_sends_nothing_to_that_provider() {
    let env = TestEnv::new().await;
    let limited = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let backup = MockProvider::start(MockOptions::new(Profile::Cerebras)).await.unwrap();
    limited.script([Scenario::RateLimited(RetryHint::RetryAfterSeconds(120.0))]);
    let providers = format!(
        "{}{}{}",
        provider("limited", &limited.base_url(), true, ""),
        provider("backup", &backup.base_url(), true, ""),
        chain("default", &["limited", "backup"], "")
    );
    let mut config_a = env.config(&providers);
    config_a.amqp.prefetch = 2;
    let mut config_b = config_a.clone();
    config_b.amqp.prefetch = 2;
    let a = env.spawn_worker(config_a, "worker-a").await;
    let b = env.spawn_worker(config_b, "worker-b").await;

    env.publish(&job("first"), BasicProperties::default()).await;
    let (first, _) = env.next_result(&env.results).await;
    assert_eq!(first.routing.attempts[0].status, Some(429));

    for i in 0..20 {
        env.publish(&job(&format!("after-{i}")), BasicProperties::default()).await;
    }
    let results = env.results(&env.results, 20).await;
    let workers: std::collections::BTreeSet<_> = results.iter().map(|r| r.routing.worker.clone()).collect();
    assert_eq!(workers.len(), 2, "both workers answered jobs: {workers:?}");
    assert_eq!(limited.requests(), 1, "no worker called the provider after the 429");
    assert!(results.iter().all(|r| r.routing.provider.as_deref() == Some("backup")));
    a.stop().await;
    b.stop().await;
}

pub(crate) async fn migrated_store(env: &TestEnv) -> PgStore {
    let store = PgStore::connect_lazy(&env.database_url, 4).unwrap();
    store.migrate().await.unwrap();
    store
}

pub(crate) fn cooldown(secs: u64, reason: CooldownReason) -> Cooldown {
    Cooldown { until: SystemTime::now() + Duration::from_secs(secs), reason, detail: "test".into() }
}

#[tokio::test]
async fn a_cooldown_only_moves_forward() {
    let env = TestEnv::new().await;
    let store = migrated_store(&env).await;
    let long = cooldown(600, CooldownReason::Auth);
    store.cool_down("p", long.clone()).await;
    store.cool_down("p", cooldown(10, CooldownReason::RateLimited)).await;
    // A second store (another worker) reads the truth from the table.
    let other = migrated_store(&env).await;
    let ask = Ask { provider: "p", limits: &[], pools: &[], tokens: 1, flight: Duration::from_secs(5) };
    match other.admit(ask, SystemTime::now()).await {
        Admission::Cooling(c) => {
            assert_eq!(c.reason, CooldownReason::Auth);
            let drift = c.until.duration_since(long.until).unwrap_or_else(|e| e.duration());
            assert!(drift < Duration::from_millis(2), "{drift:?}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        other.admit(ask, SystemTime::now() + Duration::from_secs(601)).await,
        Admission::Granted(Permit::UNCOUNTED)
    );
}

#[tokio::test]
async fn notifications_reach_other_workers_and_a_reconnect_reloads() {
    let env = TestEnv::new().await;
    let writer = migrated_store(&env).await;
    let reader = migrated_store(&env).await;
    let shutdown = CancellationToken::new();
    let listening = tokio::spawn(reader.clone().listen(shutdown.clone()));
    // Wait until the listener is subscribed.
    let mut db = env.db().await;
    eventually("the listener subscribes", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND datname = current_database()",
        )
        .fetch_one(&mut env.db().await)
        .await
        .unwrap();
        n > 0
    })
    .await;
    writer.cool_down("q", cooldown(300, CooldownReason::RateLimited)).await;
    eventually("the notification arrives", || async { reader.known_cooldown("q").is_some() }).await;

    // A change that sends no notification (the table's triggers off, as a restore runs with
    // session_replication_role = replica) is only learnt by reloading the table, which the
    // listener does after it loses its connection.
    sqlx::query("BEGIN").execute(&mut db).await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica").execute(&mut db).await.unwrap();
    sqlx::query("INSERT INTO provider_state (provider, cooldown_until, cooldown_reason) VALUES ('s', now() + interval '5 minutes', 'auth')")
        .execute(&mut db)
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut db).await.unwrap();
    assert!(reader.known_cooldown("s").is_none());
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND datname = current_database()",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert!(killed >= 1);
    eventually("the reload brings the unannounced cooldown", || async { reader.known_cooldown("s").is_some() }).await;
    shutdown.cancel();
    listening.await.unwrap();
}

/// An operator clears a cooldown by hand, as docs/operations.md says (`UPDATE provider_state
/// SET cooldown_until = now() ...`), or deletes a provider's row: running workers follow at once,
/// with no restart (the table's trigger, migration 0015). A black-box run found them keeping
/// the old cooldown while `status` said usable. An `infinity` typed by hand neither fails the
/// change nor the workers' reload.
#[tokio::test]
async fn a_cooldown_changed_by_hand_reaches_running_workers() {
    let env = TestEnv::new().await;
    let writer = migrated_store(&env).await;
    let reader = migrated_store(&env).await;
    let shutdown = CancellationToken::new();
    let listening = tokio::spawn(reader.clone().listen(shutdown.clone()));
    eventually("the listener is live", || async { reader.is_listening() }).await;
    writer.cool_down("q", cooldown(300, CooldownReason::RateLimited)).await;
    eventually("the cooldown arrives", || async {
        reader.known_cooldown("q").is_some_and(|c| c.until > SystemTime::now())
    })
    .await;
    let mut db = env.db().await;
    sqlx::query("UPDATE provider_state SET cooldown_until = now() WHERE provider = 'q'")
        .execute(&mut db)
        .await
        .unwrap();
    eventually("the cleared cooldown arrives", || async {
        reader.known_cooldown("q").is_none_or(|c| c.until <= SystemTime::now())
    })
    .await;
    sqlx::query("UPDATE provider_state SET cooldown_until = 'infinity', cooldown_reason = 'auth' WHERE provider = 'q'")
        .execute(&mut db)
        .await
        .unwrap();
    let far = SystemTime::now() + Duration::from_secs(100 * 365 * 86_400);
    eventually("a cooldown without end arrives", || async {
        reader.known_cooldown("q").is_some_and(|c| c.until > far)
    })
    .await;
    reader.reload().await.expect("the table reloads with an infinite cooldown in it");
    sqlx::query("DELETE FROM provider_state WHERE provider = 'q'").execute(&mut db).await.unwrap();
    eventually("the deleted row clears the cooldown", || async { reader.known_cooldown("q").is_none() }).await;
    shutdown.cancel();
    listening.await.unwrap();
}

/// A cooldown typed by hand with a reason the worker does not know, or with none (an operator's
/// `INSERT ... (provider, cooldown_until)`; a newer version's new reason during a rolling
/// upgrade), is held until its time, by the notice and by a reload alike: before, such a row was
/// read as no cooldown at all, and the provider called. It ends at the row's time, not later
/// (review_cool: a far-off or mis-scaled time would stop the provider for good). The table's own
/// "none" (the epoch, as a closed circuit leaves it) stays none.
#[tokio::test]
async fn a_cooldown_set_by_hand_with_an_unknown_reason_or_none_is_held() {
    let env = TestEnv::new().await;
    let reader = migrated_store(&env).await;
    let shutdown = CancellationToken::new();
    let listening = tokio::spawn(reader.clone().listen(shutdown.clone()));
    eventually("the listener is live", || async { reader.is_listening() }).await;
    let ends: f64 = sqlx::query_scalar(
        "WITH up AS (INSERT INTO provider_state (provider, cooldown_until, cooldown_reason) VALUES \
           ('m', now() + interval '1 hour', 'maintenance'), ('n', now() + interval '1 hour', NULL), \
           ('e', 'epoch', NULL) RETURNING cooldown_until) \
         SELECT extract(epoch FROM max(cooldown_until))::float8 FROM up",
    )
    .fetch_one(reader.pool())
    .await
    .unwrap();
    let ends = UNIX_EPOCH + Duration::from_secs_f64(ends);
    // Held as an estimate, until the row's time.
    let held = |provider| {
        reader.known_cooldown(provider).is_some_and(|c| {
            let off = c.until.duration_since(ends).unwrap_or_else(|e| e.duration());
            c.reason == CooldownReason::Unrecognized && off < Duration::from_millis(5)
        })
    };
    eventually("the unknown reason's cooldown arrives", || async { held("m") }).await;
    eventually("the cooldown without a reason arrives", || async { held("n") }).await;
    assert!(ends > SystemTime::now() + Duration::from_secs(3000));
    reader.reload().await.unwrap();
    assert!(held("m") && held("n"), "a reload reads them the same");
    assert!(reader.known_cooldown("e").is_none(), "the epoch is no cooldown");
    // Admission follows: refused now, granted at the row's time (the store decides on the `now`
    // it is given: no waiting).
    let ask = |provider| Ask { provider, limits: &[], pools: &[], tokens: 1, flight: Duration::from_secs(7) };
    for provider in ["m", "n"] {
        assert!(matches!(reader.admit(ask(provider), SystemTime::now()).await, Admission::Cooling(_)));
        let admitted = reader.admit(ask(provider), ends + Duration::from_millis(1)).await;
        assert!(matches!(admitted, Admission::Granted(_)), "{provider}: {admitted:?}");
    }
    shutdown.cancel();
    listening.await.unwrap();
}

#[tokio::test]
async fn limits_hold_across_workers_under_concurrency() {
    let env = TestEnv::new().await;
    let (a, b) = (migrated_store(&env).await, migrated_store(&env).await);
    let limits = [LimitConfig { requests: Some(5), tokens: None, per: Duration::from_secs(2), resets: None }];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 10, flight: Duration::from_secs(5) };
    let attempts = (0..40).map(|i| {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let limits = limits.clone();
        tokio::spawn(async move {
            let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 10, flight: Duration::from_secs(5) };
            store.admit(ask, SystemTime::now()).await
        })
    });
    let mut granted = Vec::new();
    for attempt in attempts {
        if let Admission::Granted(permit) = attempt.await.unwrap() {
            granted.push(permit);
        }
    }
    assert_eq!(granted.len(), 5, "exactly the limit is granted, whatever the concurrency");
    // Answered calls keep counting for one window after their answer.
    for permit in granted {
        a.finish_recorded(permit, Some(12), SystemTime::now()).await.unwrap();
    }
    let finished_at = SystemTime::now();
    let fresh = migrated_store(&env).await;
    let Admission::OverQuota { until, measure } = fresh.admit(ask, SystemTime::now()).await else {
        panic!("still full")
    };
    assert_eq!(measure, QuotaMeasure::Requests);
    let frees_in = until.duration_since(finished_at).unwrap_or_default();
    assert!(frees_in > Duration::from_millis(1500) && frees_in <= Duration::from_secs(2), "{frees_in:?}");
    tokio::time::sleep(until.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(20)).await;
    assert!(matches!(fresh.admit(ask, SystemTime::now()).await, Admission::Granted(_)), "the window has moved on");
}

#[tokio::test]
async fn token_limits_use_estimates_corrected_by_usage() {
    let env = TestEnv::new().await;
    let store = migrated_store(&env).await;
    let limits = [LimitConfig { requests: None, tokens: Some(1000), per: Duration::from_secs(60), resets: None }];
    let big = Ask { provider: "t", limits: &limits, pools: &[], tokens: 800, flight: Duration::from_secs(5) };
    let Admission::Granted(permit) = store.admit(big, SystemTime::now()).await else { panic!() };
    let other = migrated_store(&env).await;
    assert!(matches!(
        other.admit(big, SystemTime::now()).await,
        Admission::OverQuota { measure: QuotaMeasure::Tokens, .. }
    ));
    // The answer says it used far fewer tokens than estimated: room opens up.
    store.finish_recorded(permit, Some(100), SystemTime::now()).await.unwrap();
    let third = migrated_store(&env).await;
    assert!(matches!(third.admit(big, SystemTime::now()).await, Admission::Granted(_)));
    let huge = Ask { tokens: 5000, ..big };
    assert_eq!(third.admit(huge, SystemTime::now()).await, Admission::TooLarge);
}

#[tokio::test]
async fn two_workers_together_never_exceed_a_strict_provider_limit() {
    let env = TestEnv::new().await;
    let mut strict = MockOptions::new(Profile::Groq);
    strict.limits = vec![fallback_worker::mock::RequestLimit { requests: 4, per: Duration::from_secs(1) }];
    strict.latency = Duration::from_millis(20);
    let free = MockProvider::start(strict).await.unwrap();
    let paid = MockProvider::start(MockOptions::new(Profile::Openai)).await.unwrap();
    let providers = format!(
        "{}{}{}",
        provider("free", &free.base_url(), true, "limits = [{ requests = 4, per = \"1s\" }]"),
        provider("paid", &paid.base_url(), false, ""),
        chain("default", &["free", "paid"], "free_wait = \"1h\"")
    );
    let a = env.spawn_worker(env.config(&providers), "worker-a").await;
    let b = env.spawn_worker(env.config(&providers), "worker-b").await;
    let jobs = 24;
    for i in 0..jobs {
        env.publish(&job(&format!("q-{i}")), BasicProperties::default()).await;
    }
    let results = env.results(&env.results, jobs).await;
    assert!(
        results.iter().all(|r| r.is_success() && r.routing.provider.as_deref() == Some("free")),
        "all on the free tier"
    );
    let stats = free.stats();
    assert_eq!(stats.rate_limited, 0, "no request was refused");
    assert_eq!(stats.requests, jobs);
    assert_eq!(paid.requests(), 0, "no paid call while free capacity meets free_wait");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn status_shows_cooldowns_usage_and_last_errors() {
    let env = TestEnv::new().await;
    let store = migrated_store(&env).await;
    let providers = format!(
        "{}{}{}",
        provider(
            "groq",
            "http://127.0.0.1:9/v1",
            true,
            "limits = [{ requests = 30, per = \"1m\" }, { tokens = 6000, per = \"1m\" }]"
        ),
        provider("paid", "http://127.0.0.1:9/v1", false, ""),
        chain("default", &["groq", "paid"], "")
    );
    let limits = [
        LimitConfig { requests: Some(30), tokens: None, per: Duration::from_secs(60), resets: None },
        LimitConfig { requests: None, tokens: Some(6000), per: Duration::from_secs(60), resets: None },
    ];
    let ask = Ask { provider: "groq", limits: &limits, pools: &[], tokens: 120, flight: Duration::from_secs(5) };
    for _ in 0..3 {
        assert!(matches!(store.admit(ask, SystemTime::now()).await, Admission::Granted(_)));
    }
    store.cool_down("groq", cooldown(600, CooldownReason::RateLimited)).await;
    let config = env.config_file(&providers, "");
    let run = |json: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_fallback-worker"));
        command.args(["--config", config.to_str().unwrap(), "status"]);
        if json {
            command.arg("--json");
        }
        command.output().unwrap()
    };
    let output = run(true);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let statuses: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let groq = &statuses[0];
    assert_eq!(groq["provider"], "groq");
    assert_eq!(groq["state"], "cooling");
    assert_eq!(groq["reason"], "rate_limited");
    assert_eq!(groq["last_error"], "test");
    assert_eq!(groq["windows"][0], serde_json::json!({"measure": "requests", "limit": 30, "per": "1m", "used": 3}));
    assert_eq!(groq["windows"][1]["used"], 360);
    assert_eq!(statuses[1]["state"], "usable");
    assert_eq!(statuses[1]["free"], false);

    let table = String::from_utf8(run(false).stdout).unwrap();
    let groq_line = table.lines().find(|l| l.starts_with("groq")).expect(&table);
    assert!(groq_line.contains("cooling") && groq_line.contains("3/30 requests per 1m"), "{table}");
}

#[tokio::test]
async fn the_ledger_answers_concurrent_opens_and_stores_exactly() {
    use fallback_worker::state::ResultLedger;
    let env = TestEnv::new().await;
    let store = migrated_store(&env).await;
    // Every key redelivered twice at once: the batch must count both receipts, not fail on the
    // repeat (the first counts the unseen first delivery too).
    let opens = (0..50).map(|i| {
        let store = store.clone();
        let key = format!("k{}", i % 25);
        tokio::spawn(async move { (i % 25, store.open(&key, "job", Receipt::Redelivered).await.unwrap()) })
    });
    let mut seen: std::collections::BTreeMap<i32, Vec<u32>> = Default::default();
    for open in opens {
        let (key, entry) = open.await.unwrap();
        assert_eq!(entry.result, None);
        seen.entry(key).or_default().push(entry.deliveries);
    }
    for deliveries in seen.values_mut() {
        deliveries.sort();
        assert_eq!(deliveries, &vec![2, 3]);
    }
    let stores = (0..25).map(|i| {
        let store = store.clone();
        tokio::spawn(async move { store.store(&format!("k{i}"), "job", &format!("{{\"n\":{i}}}")).await.unwrap() })
    });
    for stored in stores {
        stored.await.unwrap();
    }
    let again = store.open("k7", "job", Receipt::Redelivered).await.unwrap();
    assert_eq!(again.deliveries, 4);
    assert_eq!(again.result.as_deref(), Some("{\"n\":7}"), "stored as published, byte for byte");
    // Another job under the same key is told so, counts nothing, and cannot overwrite.
    let other = store.open("k7", "another job", Receipt::Redelivered).await.unwrap();
    assert!(other.other_job && other.result.is_none());
    store.store("k7", "another job", "{\"n\":\"other\"}").await.unwrap();
    let mine = store.open("k7", "job", Receipt::Redelivered).await.unwrap();
    assert_eq!((mine.deliveries, mine.result.as_deref()), (5, Some("{\"n\":7}")));
    // Published again (a new message): no failed delivery.
    let copy = store.open("k7", "job", Receipt::Fresh).await.unwrap();
    assert_eq!((copy.deliveries, copy.result.as_deref()), (5, Some("{\"n\":7}")));
}

#[tokio::test]
async fn one_unstorable_result_never_fails_the_others_and_nul_escapes_are_stored() {
    use fallback_worker::state::ResultLedger;
    let env = TestEnv::new().await;
    let store = migrated_store(&env).await;
    // JSON text with an escaped NUL: valid JSON that a jsonb column refuses.
    let nul = r#"{"content":"a\u0000b"}"#;
    let stores = (0..20).map(|i| {
        let store = store.clone();
        let json = if i == 7 { nul.to_string() } else { format!("{{\"n\":{i}}}") };
        tokio::spawn(async move { store.store(&format!("k{i}"), "job", &json).await })
    });
    for stored in stores {
        stored.await.unwrap().unwrap();
    }
    assert_eq!(store.open("k7", "job", Receipt::Fresh).await.unwrap().result.as_deref(), Some(nul));
    assert_eq!(store.open("k3", "job", Receipt::Fresh).await.unwrap().result.as_deref(), Some("{\"n\":3}"));
}

#[tokio::test]
async fn a_result_stored_before_keys_were_bound_to_jobs_is_never_served() {
    use fallback_worker::state::ResultLedger;
    let env = TestEnv::new().await;
    let store = migrated_store(&env).await;
    // A row an older worker wrote: no fingerprint, another job's result.
    sqlx::query("INSERT INTO job_results (job_key, result) VALUES ('msg:legacy', '{\"theirs\":1}')")
        .execute(&mut env.db().await)
        .await
        .unwrap();
    let entry = store.open("msg:legacy", "job-b", Receipt::Fresh).await.unwrap();
    assert_eq!((entry.result, entry.other_job), (None, false), "run again, never served");
    store.store("msg:legacy", "job-b", "{\"mine\":1}").await.unwrap();
    let again = store.open("msg:legacy", "job-b", Receipt::Fresh).await.unwrap();
    assert_eq!(again.result.as_deref(), Some("{\"mine\":1}"));
    assert!(store.open("msg:legacy", "job-c", Receipt::Fresh).await.unwrap().other_job, "the key now belongs to job-b");
}

#[tokio::test]
async fn opens_and_stores_in_flight_together_are_all_done_in_shared_round_trips() {
    use fallback_worker::state::ResultLedger;
    let env = TestEnv::new().await;
    let store = migrated_store(&env).await;
    for i in 0..40 {
        store.open(&format!("s{i}"), "job", Receipt::Fresh).await.unwrap();
    }
    // Stores of answered jobs and opens of new ones at the same time, as under load.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (storing, opening) = (store.clone(), store.clone());
        tasks.push(tokio::spawn(async move {
            storing.store(&format!("s{i}"), "job", &format!("{{\"n\":{i}}}")).await.map(|_| None)
        }));
        tasks.push(tokio::spawn(async move { opening.open(&format!("o{i}"), "job", Receipt::Fresh).await.map(Some) }));
    }
    for task in tasks {
        if let Some(entry) = task.await.unwrap().unwrap() {
            assert_eq!((entry.deliveries, entry.result, entry.other_job), (1, None, false));
        }
    }
    for i in [0, 17, 39] {
        let entry = store.open(&format!("s{i}"), "job", Receipt::Redelivered).await.unwrap();
        assert_eq!(entry.result, Some(format!("{{\"n\":{i}}}")));
        assert_eq!(entry.deliveries, 2);
    }
}

#[tokio::test]
async fn a_success_in_one_worker_ends_every_workers_run_of_server_errors() {
    let env = TestEnv::new().await;
    let (a, b) = (migrated_store(&env).await, migrated_store(&env).await);
    let shutdown = CancellationToken::new();
    let listeners =
        [tokio::spawn(a.clone().listen(shutdown.clone())), tokio::spawn(b.clone().listen(shutdown.clone()))];
    eventually("both listeners subscribe", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND datname = current_database()",
        )
        .fetch_one(&mut env.db().await)
        .await
        .unwrap();
        n >= 2
    })
    .await;
    assert_eq!(a.record_server_error("p", "503").await, 1);
    assert_eq!(a.record_server_error("p", "503").await, 2);
    // B learns of the run through the notifications, so its success ends it for everyone.
    let learnt = || async {
        sqlx::query_scalar::<_, i32>("SELECT consecutive_server_errors FROM provider_state WHERE provider = 'p'")
            .fetch_one(&mut env.db().await)
            .await
            .unwrap()
    };
    assert_eq!(learnt().await, 2);
    eventually("B hears of the run", || async {
        b.record_success("p").await;
        learnt().await == 0
    })
    .await;
    assert_eq!(a.record_server_error("p", "503").await, 1, "the run started again after B's success");
    shutdown.cancel();
    for listener in listeners {
        listener.await.unwrap();
    }
}

fn pool(name: &str, limits: Vec<LimitConfig>) -> Vec<QuotaPoolConfig> {
    vec![QuotaPoolConfig { name: name.into(), limits }]
}

fn requests(n: u64, per: Duration) -> LimitConfig {
    LimitConfig { requests: Some(n), tokens: None, per, resets: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_and_two_providers_sharing_a_pool_never_exceed_it() {
    let env = TestEnv::new().await;
    let (a, b) = (migrated_store(&env).await, migrated_store(&env).await);
    let pools = pool("account", vec![requests(5, Duration::from_secs(60))]);
    let own = [requests(4, Duration::from_secs(60))];
    let attempts = (0..40).map(|i| {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (pools, own) = (pools.clone(), own.clone());
        tokio::spawn(async move {
            let provider = if i % 4 < 2 { "free-a" } else { "free-b" };
            let ask = Ask { provider, limits: &own, pools: &pools, tokens: 1, flight: Duration::from_secs(5) };
            (provider, store.admit(ask, SystemTime::now()).await)
        })
    });
    let mut granted = Vec::new();
    for attempt in attempts {
        let (provider, admission) = attempt.await.unwrap();
        match admission {
            Admission::Granted(permit) => granted.push((provider, permit)),
            Admission::OverQuota { measure, .. } => assert_eq!(measure, QuotaMeasure::Requests),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(granted.len(), 5, "the pool's 5 across both providers and both workers, not 4 + 4");
    assert!(granted.iter().all(|(_, p)| p.usage_id.is_some()));
    // A provider named like the pool has its own windows: the pool's use is not its use.
    let namesake = [requests(1, Duration::from_secs(60))];
    let ask = Ask { provider: "account", limits: &namesake, pools: &[], tokens: 1, flight: Duration::from_secs(5) };
    assert!(matches!(a.admit(ask, SystemTime::now()).await, Admission::Granted(_)));
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT kind, scope, used FROM quota_window ORDER BY kind, scope")
            .fetch_all(&mut env.db().await)
            .await
            .unwrap();
    let pool_row = rows.iter().find(|(kind, scope, _)| kind == "pool" && scope == "account");
    assert_eq!(pool_row.map(|r| r.2), Some(5), "{rows:?}");
    let own_row = rows.iter().find(|(kind, scope, _)| kind == "provider" && scope == "account");
    assert_eq!(own_row.map(|r| r.2), Some(1), "{rows:?}");
    // Answers let nobody in before the window has moved on, whichever provider asks.
    for (_, permit) in granted {
        b.finish_recorded(permit, None, SystemTime::now()).await.unwrap();
    }
    let ask = Ask { provider: "free-b", limits: &own, pools: &pools, tokens: 1, flight: Duration::from_secs(5) };
    assert!(matches!(migrated_store(&env).await.admit(ask, SystemTime::now()).await, Admission::OverQuota { .. }));
}

#[tokio::test]
async fn a_calendar_window_holds_until_the_reset_and_is_not_the_sliding_day() {
    let env = TestEnv::new().await;
    let store = migrated_store(&env).await;
    let reset = fallback_worker::calendar::DailyReset::parse("00:00 UTC").unwrap();
    let daily =
        LimitConfig { requests: Some(2), tokens: None, per: Duration::from_secs(86_400), resets: Some(reset.clone()) };
    let limits = [daily, requests(10, Duration::from_secs(86_400))];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: Duration::from_secs(5) };
    for _ in 0..2 {
        let Admission::Granted(permit) = store.admit(ask, SystemTime::now()).await else { panic!("room") };
        store.finish_recorded(permit, None, SystemTime::now()).await.unwrap();
    }
    let now = SystemTime::now();
    match migrated_store(&env).await.admit(ask, now).await {
        Admission::OverQuota { until, measure } => {
            assert_eq!(measure, QuotaMeasure::Requests);
            assert_eq!(until, reset.next_after(now), "room at the next reset exactly, not 24 h after the calls");
        }
        other => panic!("{other:?}"),
    }
    let windows: Vec<(String, i64)> = sqlx::query_as("SELECT calendar, used FROM quota_window ORDER BY calendar")
        .fetch_all(&mut env.db().await)
        .await
        .unwrap();
    assert_eq!(windows, vec![("".to_string(), 2), ("00:00 UTC".to_string(), 2)], "two running totals");
}

/// Calls `fallback_admit` (0007) for one calendar window whose resets the test chooses (the
/// database's clock cannot be moved): `first_reset` as the worker saw it, `next_reset` the one
/// after, the call leaving at `leaves`.
async fn admit_calendar(
    env: &TestEnv,
    first_reset: SystemTime,
    next_reset: SystemTime,
    leaves: SystemTime,
) -> (Option<i64>, Option<i64>) {
    let ms = |t: SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as f64;
    sqlx::query_as(
        "SELECT usage_id, blocked_until_ms FROM fallback_admit('p', ARRAY['pool'], ARRAY['acct'], ARRAY['requests'], \
           ARRAY[86400000::bigint], ARRAY['12:00 UTC'], ARRAY[2::bigint], \
           ARRAY[to_timestamp($1::float8 / 1000)], ARRAY[to_timestamp($2::float8 / 1000)], \
           ARRAY[to_timestamp($3::float8 / 1000)], 1, 5000)",
    )
    .bind(ms(first_reset))
    .bind(ms(next_reset))
    .bind(ms(leaves))
    .fetch_one(&mut env.db().await)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_spent_calendar_window_has_room_again_at_its_reset_exactly() {
    let env = TestEnv::new().await;
    migrated_store(&env).await;
    let reset = SystemTime::now() + Duration::from_millis(1500);
    let day = Duration::from_secs(86_400);
    assert!(admit_calendar(&env, reset, reset + day, reset).await.0.is_some());
    assert!(admit_calendar(&env, reset, reset + day, reset).await.0.is_some());
    let (granted, until_ms) = admit_calendar(&env, reset, reset + day, reset).await;
    assert_eq!(granted, None);
    let reset_ms = reset.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert!(until_ms.unwrap() >= reset_ms && until_ms.unwrap() <= reset_ms + 1, "{until_ms:?} vs {reset_ms}");
    tokio::time::sleep(reset.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(20)).await;
    let next = SystemTime::now() + day;
    assert!(admit_calendar(&env, next, next + day, next).await.0.is_some(), "the new day has room");
}

/// A worker whose clock lags the database's still sees a reset that has passed by the
/// database's clock as the next one: its admission counts in the new day (it leaves at the
/// reset after), never refused as "stale" (an over-quota verdict the chain would skip past,
/// to a paid provider). Only a calendar a whole day stale is sent back to look again.
#[tokio::test]
async fn a_worker_whose_clock_lags_the_database_is_admitted_at_a_reset() {
    let env = TestEnv::new().await;
    migrated_store(&env).await;
    let day = Duration::from_secs(86_400);
    let passed = SystemTime::now() - Duration::from_secs(2);
    assert!(admit_calendar(&env, passed, passed + day, passed).await.0.is_some(), "the new day has room");
    let leaves_ms: i64 =
        sqlx::query_scalar("SELECT (extract(epoch FROM leaves_at) * 1000)::bigint FROM quota_use WHERE scope = 'acct'")
            .fetch_one(&mut env.db().await)
            .await
            .unwrap();
    let next_ms = (passed + day).duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert!((leaves_ms - next_ms).abs() <= 1, "it counts until the next reset: {leaves_ms} vs {next_ms}");
    let (granted, until_ms) = admit_calendar(&env, passed - day, passed, passed).await;
    assert_eq!(granted, None, "a whole day stale: look again");
    assert!(until_ms.is_some());
}

/// The same at a real reset, with admissions straddling it from 32 tasks on two stores of 4
/// connections each (some wait for a connection between reading the clock and reaching the
/// database): an empty window refuses none. Waits for the next UTC minute (up to a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_calendar_window_never_refuses_an_admission_at_its_reset() {
    let env = TestEnv::new().await;
    let stores = [migrated_store(&env).await, migrated_store(&env).await];
    let secs = SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut boundary = (secs / 60 + 1) * 60;
    if boundary - secs < 3 {
        boundary += 60; // leave time to warm up
    }
    let reset_at = std::time::UNIX_EPOCH + Duration::from_secs(boundary);
    let hhmm = humantime::format_rfc3339_seconds(reset_at).to_string()[11..16].to_string();
    let reset = fallback_worker::calendar::DailyReset::parse(&format!("{hhmm} UTC")).unwrap();
    let daily =
        LimitConfig { requests: Some(1_000_000), tokens: None, per: Duration::from_secs(86_400), resets: Some(reset) };
    let pools = pool("account", vec![daily]);
    // Warm up (windows created, connections open).
    for (i, store) in stores.iter().enumerate() {
        for p in 0..16 {
            let provider = format!("free-{}", p * 2 + i);
            let ask =
                Ask { provider: &provider, limits: &[], pools: &pools, tokens: 1, flight: Duration::from_secs(5) };
            assert!(matches!(store.admit(ask, SystemTime::now()).await, Admission::Granted(_)));
        }
    }
    let start = reset_at - Duration::from_millis(150);
    tokio::time::sleep(start.duration_since(SystemTime::now()).unwrap_or_default()).await;
    let stop = reset_at + Duration::from_millis(150);
    let tasks: Vec<_> = (0..32)
        .map(|t| {
            let store = stores[t % 2].clone();
            let pools = pools.clone();
            tokio::spawn(async move {
                let provider = format!("free-{t}");
                let (mut admitted, mut refused) = (0, Vec::new());
                while SystemTime::now() < stop {
                    let ask = Ask {
                        provider: &provider,
                        limits: &[],
                        pools: &pools,
                        tokens: 1,
                        flight: Duration::from_secs(5),
                    };
                    match store.admit(ask, SystemTime::now()).await {
                        Admission::Granted(_) => admitted += 1,
                        other => refused.push(format!("{other:?}")),
                    }
                }
                (admitted, refused)
            })
        })
        .collect();
    let (mut admitted, mut refused) = (0, Vec::new());
    for task in tasks {
        let (a, r) = task.await.unwrap();
        admitted += a;
        refused.extend(r);
    }
    assert!(admitted > 0);
    assert!(
        refused.is_empty(),
        "an empty window refused {} of {} admissions at its reset: {:?}",
        refused.len(),
        admitted + refused.len(),
        &refused[..refused.len().min(3)]
    );
}

#[tokio::test]
async fn observations_move_the_shared_count_both_ways_but_never_below_real_calls() {
    let env = TestEnv::new().await;
    let (a, b) = (migrated_store(&env).await, migrated_store(&env).await);
    let pools = pool("account", vec![requests(20, Duration::from_secs(60))]);
    let own = [requests(30, Duration::from_secs(60))];
    let ask = Ask { provider: "p", limits: &own, pools: &pools, tokens: 1, flight: Duration::from_secs(5) };
    let Admission::Granted(first) = a.admit(ask, SystemTime::now()).await else { panic!() };
    let seen = |remaining, limit| QuotaObservation {
        measure: QuotaMeasure::Requests,
        remaining,
        limit: Some(limit),
        resets_at: Some(SystemTime::now() + Duration::from_secs(30)),
        window: None,
    };
    // The provider says 1 of its 20 is left: 19 counted, so the second worker gets one more call.
    a.observe_quota(ask, &first, &[seen(1, 20)], SystemTime::now()).await;
    let used = |env: &TestEnv| {
        let env = env.database_url.clone();
        async move {
            let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&env).await.unwrap();
            sqlx::query_scalar::<_, i64>("SELECT used FROM quota_window WHERE kind = 'pool' AND scope = 'account'")
                .fetch_one(&mut db)
                .await
                .unwrap()
        }
    };
    assert_eq!(used(&env).await, 19);
    let Admission::Granted(second) = b.admit(ask, SystemTime::now()).await else { panic!() };
    assert!(matches!(b.admit(ask, SystemTime::now()).await, Admission::OverQuota { .. }));
    // It says 15 are left (in the answer to the second call): learnt use is taken back, the
    // two real calls stay.
    b.observe_quota(ask, &second, &[seen(15, 20)], SystemTime::now()).await;
    assert_eq!(used(&env).await, 5);
    b.observe_quota(ask, &second, &[seen(20, 20)], SystemTime::now()).await;
    assert_eq!(used(&env).await, 2, "real calls are never forgotten");
    assert!(matches!(b.admit(ask, SystemTime::now()).await, Admission::Granted(_)));
}

/// A header is the provider's count when it took the observed call: calls admitted after it
/// are in our window, not in its figure, and must not make it look as if another client's use
/// of the key had gone (`fallback_observe` of 0007 discounts them).
#[tokio::test]
async fn an_answer_observed_while_later_calls_fly_does_not_take_back_anothers_use() {
    let env = TestEnv::new().await;
    let store = migrated_store(&env).await;
    let pools = pool("account", vec![requests(10, Duration::from_secs(60))]);
    let ask = Ask { provider: "p", limits: &[], pools: &pools, tokens: 1, flight: Duration::from_secs(30) };
    let resets_at = SystemTime::now() + Duration::from_secs(60);
    let seen = |remaining| QuotaObservation {
        measure: QuotaMeasure::Requests,
        remaining,
        limit: Some(10),
        resets_at: Some(resets_at),
        window: None,
    };
    // Another client of the key has used 5 of the 10: the answer to our first says 4 left.
    let Admission::Granted(first) = store.admit(ask, SystemTime::now()).await else { panic!("room") };
    store.finish_written(first.clone(), None, SystemTime::now()).await;
    store.observe_quota(ask, &first, &[seen(4)], SystemTime::now()).await;
    let mut flying = Vec::new();
    while let Admission::Granted(p) = store.admit(ask, SystemTime::now()).await {
        flying.push(p);
    }
    assert_eq!(flying.len(), 4, "5 external + 1 + 4 = the account's 10");
    // The first of the four answers: the provider had counted 5 + 2 of ours, 3 left.
    let observed = flying.remove(0);
    store.finish_written(observed.clone(), None, SystemTime::now()).await;
    store.observe_quota(ask, &observed, &[seen(3)], SystemTime::now()).await;
    let admission = store.admit(ask, SystemTime::now()).await;
    assert!(matches!(admission, Admission::OverQuota { .. }), "the account's 10 are used: {admission:?}");
}

/// Headers written just before a reset arrive after it: the budget they call spent has been
/// renewed since, and is not counted again for a whole window.
#[tokio::test]
async fn a_spent_budget_whose_reset_passed_in_flight_does_not_block_the_new_window() {
    let env = TestEnv::new().await;
    let store = migrated_store(&env).await;
    let pools = pool("account", vec![requests(50, Duration::from_secs(86_400))]);
    let ask = Ask { provider: "p", limits: &[], pools: &pools, tokens: 1, flight: Duration::from_secs(30) };
    let now = SystemTime::now();
    let seen = QuotaObservation {
        measure: QuotaMeasure::Requests,
        remaining: 0,
        limit: Some(50),
        resets_at: Some(now - Duration::from_secs(2)),
        window: None,
    };
    store.observe_quota(ask, &Permit::UNCOUNTED, &[seen], now).await;
    let admission = store.admit(ask, SystemTime::now()).await;
    assert!(matches!(admission, Admission::Granted(_)), "the provider's budget reset 2 s ago, yet: {admission:?}");
}

/// Migration 0007 applied over a database that 0005/0006 workers have been using: the calls
/// those workers counted still count (a rolling upgrade does not reopen full windows).
#[tokio::test]
async fn migration_0007_keeps_the_use_counted_under_0005() {
    let env = TestEnv::new().await;
    // The first six migrations only, from a copy of the directory.
    let dir = std::env::temp_dir().join(format!("shared-state-mig-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.as_str() < "0007" {
            std::fs::copy(&path, dir.join(&name)).unwrap();
        }
    }
    let old = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
    let mut db = env.db().await;
    old.run(&mut db).await.unwrap();
    // An old worker admits 2 calls under a limit of 2 requests a minute.
    for _ in 0..2 {
        let id: Option<i64> = sqlx::query_scalar(
            "SELECT usage_id FROM fallback_acquire('p', ARRAY[2::bigint], ARRAY[60000::bigint], '{}', '{}', 1, 5000)",
        )
        .fetch_one(&mut db)
        .await
        .unwrap();
        assert!(id.is_some());
    }
    drop(db);
    let store = migrated_store(&env).await;
    let limits = [requests(2, Duration::from_secs(60))];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: Duration::from_secs(5) };
    let admission = store.admit(ask, SystemTime::now()).await;
    assert!(matches!(admission, Admission::OverQuota { .. }), "the window was full before the upgrade: {admission:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn status_lists_pools_with_their_use_next_reset_and_who_draws_from_them() {
    let env = TestEnv::new().await;
    let store = migrated_store(&env).await;
    let providers = format!(
        "{}{}{}{}",
        provider(
            "gemini",
            "http://127.0.0.1:9/v1",
            true,
            "quotas = [\"google\"]\nlimits = [{ requests = 20, per = \"1d\", resets = \"00:00 America/Los_Angeles\" }]"
        ),
        provider("gemini-native", "http://127.0.0.1:9/v1", true, "quotas = [\"google\"]"),
        "[[quotas]]\nname = \"google\"\nlimits = [{ requests = 20, per = \"1d\", resets = \"00:00 America/Los_Angeles\" }, { requests = 5, per = \"1m\" }]\n\n",
        chain("default", &["gemini", "gemini-native"], "")
    );
    let config_file = env.config_file(&providers, "");
    let config = fallback_worker::config::Config::load(&config_file, &Default::default()).unwrap();
    let gemini = config.provider("gemini").unwrap();
    let pools = config.pools_of(gemini);
    let ask =
        Ask { provider: "gemini", limits: &gemini.limits, pools: &pools, tokens: 10, flight: Duration::from_secs(5) };
    for _ in 0..2 {
        assert!(matches!(store.admit(ask, SystemTime::now()).await, Admission::Granted(_)));
    }
    let run = |json: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_fallback-worker"));
        command.args(["--config", config_file.to_str().unwrap(), "status"]);
        if json {
            command.arg("--json");
        }
        command.output().unwrap()
    };
    let output = run(true);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let lines: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let reset = fallback_worker::calendar::DailyReset::parse("00:00 America/Los_Angeles").unwrap();
    let next = humantime::format_rfc3339_seconds(reset.next_after(SystemTime::now())).to_string();
    assert_eq!(lines[0]["provider"], "gemini");
    assert_eq!(lines[0]["pools"], serde_json::json!(["google"]));
    assert_eq!(lines[0]["windows"][0]["used"], 2);
    assert_eq!(lines[0]["windows"][0]["resets"], "00:00 America/Los_Angeles");
    assert_eq!(lines[0]["windows"][0]["next_reset"], next.as_str());
    let pool = &lines[2];
    assert_eq!(pool["pool"], "google");
    assert_eq!(pool["providers"], serde_json::json!(["gemini", "gemini-native"]));
    assert_eq!(pool["windows"][0]["used"], 2);
    assert_eq!(pool["windows"][0]["next_reset"], next.as_str());
    assert_eq!(pool["windows"][1], serde_json::json!({"measure": "requests", "limit": 5, "per": "1m", "used": 2}));

    let table = String::from_utf8(run(false).stdout).unwrap();
    let pool_line = table.lines().find(|l| l.starts_with("google")).expect(&table);
    assert!(
        pool_line.contains(&format!("2/20 requests per 1day (resets 00:00 America/Los_Angeles, next {next})"))
            && pool_line.contains("gemini, gemini-native"),
        "{table}"
    );
    assert_eq!(lines[1]["state"], "usable", "room in the pool: {}", lines[1]);

    // The pool's minute is spent: a provider with room of its own is over quota through it.
    for _ in 0..3 {
        assert!(matches!(store.admit(ask, SystemTime::now()).await, Admission::Granted(_)));
    }
    let lines: serde_json::Value = serde_json::from_slice(&run(true).stdout).unwrap();
    assert_eq!(lines[1]["provider"], "gemini-native");
    assert_eq!(lines[1]["state"], "over_quota", "{}", lines[1]);
    assert_eq!(lines[1]["reason"], "pool google: requests");
}

#[tokio::test]
async fn calls_admitted_while_the_database_was_away_count_in_the_pool_once_it_is_back() {
    let env = TestEnv::new().await;
    let relay = Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = env.database_url.replace("127.0.0.1:5432", &relay.addr.to_string());
    let store = PgStore::connect_lazy(&url, 4).unwrap();
    store.migrate().await.unwrap();
    let pools = pool("account", vec![requests(3, Duration::from_secs(60))]);
    let ask = Ask { provider: "p", limits: &[], pools: &pools, tokens: 1, flight: Duration::from_secs(5) };
    assert!(matches!(store.admit(ask, SystemTime::now()).await, Admission::Granted(Permit { usage_id: Some(_), .. })));

    relay.set_down(true);
    let mut local = 0;
    for _ in 0..5 {
        match store.admit(ask, SystemTime::now()).await {
            Admission::Granted(permit) => {
                assert_eq!(permit.usage_id, None, "admitted from this worker's own view");
                local += 1;
                // Answered at once: the record must outlive the answer until it is written back.
                store.finish(permit, None, SystemTime::now()).await;
            }
            Admission::OverQuota { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(store.is_degraded());
    assert_eq!(local, 2, "the pool's share (3 for one worker), the call before the outage included");

    relay.set_down(false);
    eventually("the database is back", || async { !store.is_degraded() }).await;
    let used: i64 = sqlx::query_scalar("SELECT used FROM quota_window WHERE kind = 'pool' AND scope = 'account'")
        .fetch_one(&mut env.db().await)
        .await
        .unwrap();
    assert_eq!(used, 3, "the outage's calls count in the shared pool");
    assert!(matches!(store.admit(ask, SystemTime::now()).await, Admission::OverQuota { .. }));
}

#[tokio::test]
async fn housekeeping_retires_what_has_left_every_window_of_providers_and_pools() {
    let env = TestEnv::new().await;
    let store = migrated_store(&env).await;
    let window = Duration::from_millis(300);
    let pools = pool("account", vec![requests(5, window)]);
    let own = [requests(5, window)];
    let ask = Ask { provider: "p", limits: &own, pools: &pools, tokens: 1, flight: Duration::from_secs(5) };
    let Admission::Granted(permit) = store.admit(ask, SystemTime::now()).await else { panic!() };
    assert_eq!(store.prune_usage().await.unwrap(), 2, "one call in the provider's window and one in the pool's");
    store.finish(permit, None, SystemTime::now()).await;
    eventually("both windows are empty one window after the answer", || async {
        store.prune_usage().await.unwrap() == 0
    })
    .await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM quota_use").fetch_one(&mut env.db().await).await.unwrap();
    assert_eq!(rows, 0);
}
