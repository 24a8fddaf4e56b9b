//! A job that loses a provider's half-open probe to another worker gives its slot back
//! (`ProviderState::release`). Before, the chain gave it back as an answered call
//! (`finish(permit, None)`): each loser held a request of the provider's windows, and of its
//! pools', for a whole window though nothing was sent, so a race at a circuit's end could spend
//! a tight free limit on nothing and push jobs to the next provider (or the paid one). Now the
//! call's rows become learnt use (migration 0016): the next figure the provider reports takes
//! them back, and no figure can leave the window below the provider's count
//! (tests/it/review_release.rs).

use std::time::{Duration, SystemTime};

use fallback_worker::config::QuotaPoolConfig;
use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Ask, ProviderState};

use crate::credits::{Worker, granted, requests, requests_left};
use crate::review_finish::used;
use crate::review_probe2::{HOLD, expired_circuit};
use crate::support::*;

async fn migrated(url: &str) -> PgStore {
    let store = PgStore::connect_lazy(url, 2).unwrap();
    store.migrate().await.unwrap();
    store
}

/// Two workers admitted for an expired circuit (3 requests an hour: no credit, each call its
/// own rows); one wins the probe, the other releases its call, whose rows (the provider's and
/// the pool's) become learnt use. The figure of a call admitted after the release says the
/// provider counted the probe and that call: the released one is taken back and its slot is
/// free again. (As an answered call it stayed: only learnt use is ever taken back.)
#[tokio::test]
async fn a_call_that_lost_the_probe_is_taken_back_by_the_next_figure() {
    let env = TestEnv::new().await;
    let (prober, loser) = (migrated(&env.database_url).await, migrated(&env.database_url).await);
    let limits = [requests(3)];
    let pools = [QuotaPoolConfig { name: "acct".into(), limits: vec![requests(3)] }];
    let ask = Ask { provider: "p", limits: &limits, pools: &pools, tokens: 1, flight: HOLD };
    expired_circuit(&prober, "p", 300).await;
    let lost = granted(&loser, ask).await;
    let probe = granted(&prober, ask).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 2, "both asks count while they may call");
    assert!(prober.claim_probe("p", SystemTime::now(), HOLD).await.is_call(), "the prober takes the probe");
    assert!(!loser.claim_probe("p", SystemTime::now(), HOLD).await.is_call(), "the other loses it");
    let lost_call = lost.usage_id.unwrap();
    loser.release(lost).await;
    loser.answers_recorded().await;
    let rows: Vec<(bool, String)> =
        sqlx::query_as("SELECT learnt, kind FROM quota_use WHERE call_id = $1 AND measure = 'requests' ORDER BY kind")
            .bind(lost_call)
            .fetch_all(&mut env.db().await)
            .await
            .unwrap();
    assert_eq!(rows, [(true, "pool".to_string()), (true, "provider".to_string())], "learnt in both windows");
    assert_eq!(used(&env, "provider", "p", "requests").await, 2, "still counted: never less than the provider");
    prober.finish_written(probe, None, SystemTime::now()).await;
    // The probe succeeded: the circuit closes, as the chain's success does.
    prober.record_success("p").await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let next = granted(&prober, ask).await;
    prober.finish_written(next.clone(), None, SystemTime::now()).await;
    let resets = Some(Duration::from_secs(1800));
    prober.observe_quota(ask, &next, &[requests_left(1, 3, resets)], SystemTime::now()).await;
    prober.answers_recorded().await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 2, "the provider counted the probe and the next call");
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
