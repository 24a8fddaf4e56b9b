//! A batched call given up on at its deadline counts towards taking the database for down only
//! when no batch has heard from the database for longer than the statement bound
//! (`state/last_answer.rs`): calls queued behind a batch Postgres cancelled for its time show a
//! busy database (review_stmt2, finding 1, which these rules fixed); a database silent past the
//! bound is not answering, and the ledger's calls alone take it for down as before.

use std::time::{Duration, Instant};

use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Receipt, ResultLedger};

use crate::review_outage::store_behind_relay;
use crate::review_probe2::migrated;
use crate::support::relay::Relay;
use crate::support::*;

/// Well past the 2 s after which three calls in a row given up on take the database for down,
/// well short of anything a worker should wait for a database that does not answer.
const DOWN_WITHIN: Duration = Duration::from_secs(6);

/// Opens the ledger for `n` jobs of distinct keys, 100 ms apart (each waits at most 2 s).
async fn opens(store: &PgStore, n: usize) -> Vec<tokio::task::JoinHandle<String>> {
    let mut opens = Vec::new();
    for i in 0..n {
        let store = store.clone();
        opens.push(tokio::spawn(async move {
            let key = format!("running-{i}");
            format!("{:?}", store.open(&key, "fingerprint", Receipt::of(false)).await)
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    opens
}

/// Stops everything the database sends (`relay.hold`), opens the ledger for six jobs, and
/// asserts that `store` serves from its own view within [`DOWN_WITHIN`] of the stop, every open
/// having failed.
async fn stalled_until_down(store: &PgStore, relay: &Relay, what: &str) {
    relay.hold(true);
    let since = Instant::now();
    let pending = opens(store, 6).await;
    while !store.is_degraded() {
        assert!(since.elapsed() < DOWN_WITHIN, "{what}: still not taken for down after {:?}", since.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for open in pending {
        let answer = open.await.unwrap();
        assert!(answer.starts_with("Err("), "no ledger answer while nothing arrives: {answer}");
    }
    relay.hold(false);
}

#[tokio::test]
async fn a_database_that_stops_answering_a_batch_is_taken_for_down_through_the_ledger_alone() {
    let env = TestEnv::new().await;
    let (relay, store) = store_behind_relay(&env).await;
    store.open("warm", "fingerprint", Receipt::of(false)).await.unwrap();
    assert!(store.pool().size() > 0, "the ledger's batch has a connection to keep");
    // Nothing the database sends arrives any more: the batch in flight runs past every bound.
    stalled_until_down(&store, &relay, "a batch stalled on a connection").await;
}

#[tokio::test]
async fn a_database_that_stops_answering_new_connections_is_taken_for_down_through_the_ledger_alone() {
    let env = TestEnv::new().await;
    migrated(&env.database_url, 2).await;
    let relay = Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = env.database_url.replace("127.0.0.1:5432", &relay.addr.to_string());
    // A pool with no connection yet: the batch waits for one to start, not for a statement.
    let store = PgStore::connect_lazy(&url, 4).unwrap();
    assert_eq!(store.pool().size(), 0, "the pool has no connection yet");
    stalled_until_down(&store, &relay, "a batch waiting for a connection that never starts").await;
}
