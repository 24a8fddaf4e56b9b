//! Adversarial review, round 2, of the release (f68b281, migration 0016: a released call
//! becomes learnt use, `learnt_at = admitted_at`). Each test fails on f68b281.

use std::time::{Duration, SystemTime};

use fallback_worker::state::memory::MemoryStore;
use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Admission, Ask, ProviderState};

use crate::credits::{granted, requests, requests_left};
use crate::review_finish::used;
use crate::review_probe2::{HOLD, expired_circuit, migrated};
use crate::support::*;

/// Finding 1 (the slot does not come back in the usual order). Learnt "when the call was
/// admitted", the released row was newer than the probe's own figure (the job that wins the
/// probe is the one admitted first) and stayed for the window. Since 0016 in its final form, a
/// call released before any figure was counted in its windows counts nothing at once: 2
/// requests an hour, the prober, then the loser, which releases; the probe's answer says 1 of
/// 2 left; the window counts the probe alone.
#[tokio::test]
async fn a_released_call_is_taken_back_by_the_figure_of_a_probe_admitted_before_it() {
    let env = TestEnv::new().await;
    let (prober, loser) = (migrated(&env.database_url, 2).await, migrated(&env.database_url, 2).await);
    let limits = [requests(2)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    expired_circuit(&prober, "p", 300).await;
    // The prober is admitted first, and so reaches the claim first.
    let probe = granted(&prober, ask).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let lost = granted(&loser, ask).await;
    assert!(prober.claim_probe("p", SystemTime::now(), HOLD).await.is_call(), "the prober takes the probe");
    assert!(!loser.claim_probe("p", SystemTime::now(), HOLD).await.is_call(), "the other loses it");
    loser.release(lost).await;
    loser.answers_recorded().await;
    prober.finish_written(probe.clone(), None, SystemTime::now()).await;
    let resets = Some(Duration::from_secs(1800));
    prober.observe_quota(ask, &probe, &[requests_left(1, 2, resets)], SystemTime::now()).await;
    prober.answers_recorded().await;
    assert_eq!(
        used(&env, "provider", "p", "requests").await,
        1,
        "the provider counted the probe alone: the released call's slot should be free"
    );
}

/// Finding 2 (memory store, the same hole the previous review found in the shared store).
/// `MemoryStore::release_at` forgets the call at once, but `quota::observe` reads every call
/// with an id up to the observed one as counted by the provider and takes learnt use back for
/// it. A figure observed between the loser's admission and its release (another job's call,
/// admitted after it, answering meanwhile: `release` comes after an awaited `claim_probe`, and
/// the store's lock is not held across the two) took back a learnt request for the loser's
/// call; forgetting the call then leaves the window one below the provider. 10 requests an
/// hour; another client used 5 (learnt). Ours: a first call, the loser, then a call that is
/// answered with "3 left" (5 + first + it = 7). After the release the window counts 6 and
/// admits 4 more calls: 11 at the provider.
#[tokio::test]
async fn a_memory_release_after_a_later_calls_figure_leaves_the_window_below_the_provider() {
    let store = MemoryStore::new();
    let limits = [requests(10)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let resets = Some(Duration::from_secs(1800));
    let now = SystemTime::now();
    let Admission::Granted(first) = store.admit(ask, now).await else { panic!("room") };
    store.finish(first.clone(), None, now).await;
    store.observe_quota(ask, &first, &[requests_left(4, 10, resets)], now).await;
    let Admission::Granted(lost) = store.admit(ask, now).await else { panic!("room") };
    let Admission::Granted(sent) = store.admit(ask, now).await else { panic!("room") };
    store.finish(sent.clone(), None, now).await;
    // The provider counted 5 + first + sent = 7.
    store.observe_quota(ask, &sent, &[requests_left(3, 10, resets)], now).await;
    store.release(lost).await;
    let mut admitted = 0;
    while let Admission::Granted(_) = store.admit(ask, SystemTime::now()).await {
        admitted += 1;
        assert!(admitted <= 10);
    }
    assert!(7 + admitted <= 10, "the provider counts 7 of 10; {admitted} more calls admitted");
}

/// Finding 3 (a busy window takes the worker down). Every other statement that locks a window
/// bounds its lock waits (`lock_timeout` 1 s, the `busy` answers of 0009/0012): a window held
/// elsewhere (a long write-back, now one transaction over all its windows; a worker stopped
/// mid-transaction) makes them fail fast, as slowness. `fallback_release_calls` sets none: a
/// release waits on the window until the client's `STATE_CALL_TIMEOUT` (2 s), and each such
/// wait is a timeout "in a row" (`timed_out`). At a circuit's end several jobs lose the probe
/// at once: three releases behind a window held for 3 s mark a reachable database down, and
/// the worker switches to degraded mode (local shares, no ledger).
#[tokio::test]
async fn releases_behind_a_held_window_do_not_mark_a_reachable_database_down() {
    let env = TestEnv::new().await;
    let store = PgStore::connect_lazy(&env.database_url, 8).unwrap();
    store.migrate().await.unwrap();
    let limits = [requests(10)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let mut lost = Vec::new();
    for _ in 0..3 {
        lost.push(granted(&store, ask).await);
    }
    let mut locker = env.db().await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query(
        "SELECT 1 FROM quota_window WHERE kind = 'provider' AND scope = 'p' AND measure = 'requests' FOR UPDATE",
    )
    .execute(&mut locker)
    .await
    .unwrap();
    // Three jobs lose the probe together.
    for permit in lost {
        store.release(permit).await;
    }
    let mut went_down = false;
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        went_down |= store.is_degraded();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    assert!(!went_down, "three releases waiting on a held window marked the reachable database down");
}
