//! Adversarial review of issue #11 (pools, calendar windows, learning from headers): reproductions.
//! Each test states the property the contract (§5, §6) asks for; a failing one is a finding.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fallback_worker::config::{LimitConfig, QuotaPoolConfig};
use fallback_worker::routing::QuotaObservation;
use fallback_worker::state::memory::MemoryStore;
use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Admission, Ask, Permit, ProviderState, QuotaMeasure};

use crate::support::*;

fn requests(n: u64, per: Duration) -> LimitConfig {
    LimitConfig { requests: Some(n), tokens: None, per, resets: None }
}

async fn migrated_store(env: &TestEnv) -> PgStore {
    let store = PgStore::connect_lazy(&env.database_url, 4).unwrap();
    store.migrate().await.unwrap();
    store
}

/// A rate-limit header is a snapshot taken when the provider received *that* call; our count,
/// when the answer arrives, also holds every call we sent since (the provider has them too, or
/// will). `observe` compares the two as if they were taken at the same moment, so each answer
/// that comes back while later calls are in flight "takes back" learnt use (use by someone
/// else on the same key) that is still real: the service then sends more than the provider
/// allows and collects 429s, although it believed the headers.
async fn learnt_external_use_vs_calls_in_flight(store: &dyn ProviderState) -> usize {
    let limits = [requests(10, Duration::from_secs(60))];
    let pools = [QuotaPoolConfig { name: "account".into(), limits: limits.to_vec() }];
    let ask = Ask { provider: "p", limits: &[], pools: &pools, tokens: 1, flight: Duration::from_secs(30) };
    let now = SystemTime::now();
    let seen = |remaining| QuotaObservation {
        measure: QuotaMeasure::Requests,
        remaining,
        limit: Some(10),
        resets_at: Some(now + Duration::from_secs(60)),
        window: None,
    };
    // Another client of the key has used 5 of the account's 10: an earlier answer said 5 left.
    let Admission::Granted(first) = store.admit(ask, now).await else { panic!("room") };
    store.finish(first.clone(), None).await;
    store.observe_quota(ask, &first, &[seen(4)], now).await; // 5 external + our 1 counted by the provider
    // We fill the rest: 4 calls, sent one after the other, all in flight.
    let mut permits = Vec::new();
    while let Admission::Granted(p) = store.admit(ask, SystemTime::now()).await {
        permits.push(p);
    }
    assert_eq!(permits.len(), 4, "5 external + 1 + 4 = the account's 10");
    // The first of them answers. When the provider received it, it had counted 5 external + 2
    // of ours: its header says 3 left. Our 3 other calls reached it after that snapshot.
    let observed = permits.remove(0);
    store.finish(observed.clone(), None).await;
    store.observe_quota(ask, &observed, &[seen(3)], SystemTime::now()).await;
    // The provider's truth: 5 + 5 = 10 of 10 (the 3 in flight are counted on arrival): no room.
    let mut extra = 0;
    while let Admission::Granted(_) = store.admit(ask, SystemTime::now()).await {
        extra += 1;
        if extra > 20 {
            break;
        }
    }
    extra
}

#[tokio::test]
async fn review11_memory_an_answer_observed_while_later_calls_fly_does_not_forget_anothers_use() {
    let extra = learnt_external_use_vs_calls_in_flight(&MemoryStore::new()).await;
    assert_eq!(extra, 0, "{extra} calls sent beyond the account's 10 (each one a 429)");
}

#[tokio::test]
async fn review11_postgres_an_answer_observed_while_later_calls_fly_does_not_forget_anothers_use() {
    let env = TestEnv::new().await;
    let store = migrated_store(&env).await;
    let extra = learnt_external_use_vs_calls_in_flight(&store).await;
    assert_eq!(extra, 0, "{extra} calls sent beyond the account's 10 (each one a 429)");
}

/// At a calendar window's reset, the worker computes `first_reset` from its clock and the
/// database compares it with `clock_timestamp()` a moment later: an admission that straddles
/// the reset is answered "stale calendar, ask again" as an `OverQuota` (blocked_by = the
/// measure) although the window is empty. The chain then skips the free provider for this
/// pass (`SkippedQuota`, a firm NextTry at ~now) and moves on: to a paid provider when
/// `free_wait = "0s"` (the default). With a worker clock a little behind the database's
/// (another host), every admission in that lag before each reset is refused.
///
/// Waits for the next UTC minute (up to 60 s) and admits around it from 32 tasks on two stores
/// of 4 connections each (a busy worker: jobs in flight > connections), so some admissions wait
/// for a connection between reading the clock and reaching the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn review11_an_empty_calendar_window_never_refuses_an_admission_at_its_reset() {
    let env = TestEnv::new().await;
    let stores = [migrated_store(&env).await, migrated_store(&env).await];
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let mut boundary = (secs / 60 + 1) * 60;
    if boundary - secs < 3 {
        boundary += 60; // leave time to warm up
    }
    let reset_at = UNIX_EPOCH + Duration::from_secs(boundary);
    let hhmm = humantime::format_rfc3339_seconds(reset_at).to_string()[11..16].to_string();
    let reset = fallback_worker::calendar::DailyReset::parse(&format!("{hhmm} UTC")).unwrap();
    let daily =
        LimitConfig { requests: Some(1_000_000), tokens: None, per: Duration::from_secs(86_400), resets: Some(reset) };
    let pools = vec![QuotaPoolConfig { name: "account".into(), limits: vec![daily] }];
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
                let mut refused = Vec::new();
                let mut admitted = 0;
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
    let mut refused = Vec::new();
    let mut admitted = 0;
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

/// Migration 0007 applied over a database that 0005/0006 workers have been using: the calls
/// those workers counted must still count (a rolling upgrade must not reopen full windows).
#[tokio::test]
async fn review11_migration_0007_keeps_the_use_counted_under_0005() {
    let env = TestEnv::new().await;
    // The first six migrations only, from a copy of the directory.
    let dir = std::env::temp_dir().join(format!("review11-mig-{}", std::process::id()));
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

/// `quota::matching`: an observation whose stated `limit` matches no declared size falls back
/// to "the only declared limit of that measure", whatever its window. A per-minute budget
/// (OpenAI-style `x-ratelimit-*-requests`, no window in the name) momentarily at 0, on an
/// answer without a `-reset-` header, is then read as "the daily limit is spent": learnt use
/// of the whole day, leaving only at the end of the window (24 h), and since no call is made
/// any more, no later answer can take it back. One header starves the provider for a day.
#[tokio::test]
async fn review11_a_spent_budget_of_another_size_does_not_spend_the_only_declared_limit_for_a_day() {
    let store = MemoryStore::new();
    let limits = [requests(1000, Duration::from_secs(86_400))];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: Duration::from_secs(30) };
    let now = SystemTime::now();
    let Admission::Granted(permit) = store.admit(ask, now).await else { panic!("room") };
    store.finish(permit.clone(), None).await;
    // The provider's budget of 60 (its minute) is spent; it gave no reset time.
    let seen = QuotaObservation {
        measure: QuotaMeasure::Requests,
        remaining: 0,
        limit: Some(60),
        resets_at: None,
        window: None,
    };
    store.observe_quota(ask, &permit, &[seen], now).await;
    // Ten minutes later the minute budget is long whole again; 1 of our 1000 a day is used.
    let later = now + Duration::from_secs(600);
    let admission = store.admit(ask, later).await;
    assert!(matches!(admission, Admission::Granted(_)), "1 of 1000 used, yet: {admission:?}");
}

/// An answer's headers are written when the provider takes the call; the answer arrives
/// seconds later. One sent just before the daily reset says "0 left, whole again at the reset"
/// and arrives after it. `learnt_leaves` drops a reset that has passed and keeps the learnt use
/// until the end of the window instead: a whole new day (the next reset, or 24 h for a sliding
/// day) of a quota the provider has just renewed, with no call left to correct it.
#[tokio::test]
async fn review11_memory_a_spent_budget_whose_reset_passed_in_flight_does_not_block_the_new_day() {
    let store = MemoryStore::new();
    let reset = fallback_worker::calendar::DailyReset::parse("00:00 UTC").unwrap();
    let daily = LimitConfig { requests: Some(50), tokens: None, per: Duration::from_secs(86_400), resets: Some(reset) };
    let pools = [QuotaPoolConfig { name: "openrouter-free".into(), limits: vec![daily] }];
    let ask = Ask { provider: "or-a", limits: &[], pools: &pools, tokens: 1, flight: Duration::from_secs(30) };
    let midnight = humantime::parse_rfc3339("2026-12-01T00:00:00Z").unwrap();
    // Sent at 23:59:58 (the 50th of the day), answered at 00:00:04 with the headers of 23:59:58.
    let seen = QuotaObservation {
        measure: QuotaMeasure::Requests,
        remaining: 0,
        limit: Some(50),
        resets_at: Some(midnight),
        window: None,
    };
    store.observe_quota(ask, &Permit::UNCOUNTED, &[seen], midnight + Duration::from_secs(4)).await;
    let admission = store.admit(ask, midnight + Duration::from_secs(60)).await;
    assert!(matches!(admission, Admission::Granted(_)), "a new day of 50, yet: {admission:?}");
}

#[tokio::test]
async fn review11_postgres_a_spent_budget_whose_reset_passed_in_flight_does_not_block_the_new_window() {
    let env = TestEnv::new().await;
    let store = migrated_store(&env).await;
    let pools = [QuotaPoolConfig { name: "account".into(), limits: vec![requests(50, Duration::from_secs(86_400))] }];
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
