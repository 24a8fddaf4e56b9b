//! A job that loses a provider's half-open probe to another worker gives its slot back
//! (`ProviderState::release`). Before, the chain gave it back as an answered call
//! (`finish(permit, None)`): each loser held a request of the provider's windows, and of its
//! pools', for a whole window though nothing was sent, so a race at a circuit's end could spend
//! a tight free limit on nothing and push jobs to the next provider (or the paid one). Now a
//! call that no rate-limit figure can have counted (none was observed in its windows since its
//! admission) counts nothing from its release on; any other is answered as before, so no figure
//! is left counting a call the windows no longer hold (migration 0016,
//! tests/it/review_release*.rs).

use std::time::{Duration, SystemTime};

use fallback_worker::config::QuotaPoolConfig;
use fallback_worker::state::{Ask, ProviderState};

use crate::credits::{Worker, granted, requests, requests_left};
use crate::review_finish::used;
use crate::review_probe2::{HOLD, expired_circuit, migrated};
use crate::support::*;

/// Two workers admitted for an expired circuit (2 requests an hour: no credit, each call its
/// own rows); one wins the probe, the other releases its call: no figure came since its
/// admission, so its rows count nothing from now on, in the provider's window and its pool's.
#[tokio::test]
async fn a_call_that_lost_the_probe_leaves_no_request_in_the_windows_or_the_pools() {
    let env = TestEnv::new().await;
    let (prober, loser) = (migrated(&env.database_url, 2).await, migrated(&env.database_url, 2).await);
    let limits = [requests(2)];
    let pools = [QuotaPoolConfig { name: "acct".into(), limits: vec![requests(2)] }];
    let ask = Ask { provider: "p", limits: &limits, pools: &pools, tokens: 1, flight: HOLD };
    expired_circuit(&prober, "p", 300).await;
    let lost = granted(&loser, ask).await;
    let probe = granted(&prober, ask).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 2, "both asks count while they may call");
    assert!(prober.claim_probe("p", SystemTime::now(), HOLD).await.is_call(), "the prober takes the probe");
    assert!(!loser.claim_probe("p", SystemTime::now(), HOLD).await.is_call(), "the other loses it");
    loser.release(lost).await;
    loser.answers_recorded().await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 1, "the lost call no longer counts");
    assert_eq!(used(&env, "pool", "acct", "requests").await, 1, "nor in its pool's");
    prober.finish_written(probe, Some(1), SystemTime::now()).await;
    prober.answers_recorded().await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 1, "the probe's answer counts its one call");
}

/// A figure observed in the call's windows between its admission and its release may have
/// counted it as sent (`fallback_observe` takes every real row older than the observed call
/// for the provider's): taking it out then could leave the window below the provider, so the
/// released call is answered as before and keeps its slot for a window.
#[tokio::test]
async fn a_call_released_after_a_figure_was_counted_keeps_its_slot() {
    let env = TestEnv::new().await;
    let (prober, loser) = (migrated(&env.database_url, 2).await, migrated(&env.database_url, 2).await);
    let limits = [requests(10)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let lost = granted(&loser, ask).await;
    let seen = granted(&prober, ask).await;
    prober.finish_written(seen.clone(), None, SystemTime::now()).await;
    // The provider counts the two calls, as the figure reads them (the lost one as sent).
    let resets = Some(Duration::from_secs(1800));
    prober.observe_quota(ask, &seen, &[requests_left(8, 10, resets)], SystemTime::now()).await;
    prober.answers_recorded().await;
    loser.release(lost).await;
    loser.answers_recorded().await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 2, "answered, not taken out");
}

/// A call admitted from a credit and released: the credit ends counting only the calls sent.
#[tokio::test]
async fn a_credit_call_that_lost_the_probe_is_not_counted_when_its_credit_ends() {
    let env = TestEnv::new().await;
    let worker = Worker::start(&env).await;
    let store = &worker.store;
    let limits = [requests(100_000)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 10, flight: HOLD };
    let lost = granted(store, ask).await;
    let sent = granted(store, ask).await;
    assert!(lost.from_credit && sent.from_credit && lost.usage_id == sent.usage_id, "{lost:?} {sent:?}");
    store.release(lost).await;
    store.finish(sent, Some(10), SystemTime::now()).await;
    eventually("the credit has ended with the one call sent", || async {
        used(&env, "provider", "p", "requests").await == 1
    })
    .await;
}
