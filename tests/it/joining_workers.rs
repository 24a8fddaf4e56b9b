//! A worker that joins is counted by every other at once (black-box review, session 31,
//! finding 2: two workers, a limit of 4 requests a window, Postgres stopped 4 s after they
//! started: the first still counted itself alone, took all 4 locally, the second 2: 6 calls).

use std::time::SystemTime;

use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Admission, Ask, ProviderState};
use tokio_util::sync::CancellationToken;

use crate::credits::requests;
use crate::review_outage::store_behind_relay;
use crate::review_probe2::{HOLD, migrated};
use crate::support::*;

/// How many of 4 asks `store` grants for a limit of 4 requests a window (with the database
/// away: its local share).
pub(crate) async fn local_grants_of_four(store: &PgStore) -> usize {
    let limits = [requests(4)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let mut granted = 0;
    for _ in 0..4 {
        if matches!(store.admit(ask, SystemTime::now()).await, Admission::Granted(_)) {
            granted += 1;
        }
    }
    granted
}

/// The first worker counts only itself at its heartbeat; the second joins. Without waiting for
/// the first's next heartbeat (10 s away; none is sent here), the first counts two, and an
/// outage right then finds it dividing the limit by two.
#[tokio::test]
async fn a_worker_that_joins_is_counted_at_once_and_halves_the_others_share_in_an_outage() {
    let env = TestEnv::new().await;
    let (relay, first) = store_behind_relay(&env).await;
    assert_eq!(first.heartbeat("first").await.unwrap(), 1, "alone");
    let stop = CancellationToken::new();
    let listening = tokio::spawn(first.clone().listen(stop.clone()));
    eventually("the first worker listens", || async { first.is_listening() }).await;
    let second = migrated(&env.database_url, 2).await;
    assert_eq!(second.heartbeat("second").await.unwrap(), 2, "the second counts both");
    eventually("the first counts the second", || async { first.workers_alive() == 2 }).await;

    relay.set_down(true);
    let granted = local_grants_of_four(&first).await;
    assert!(first.is_degraded(), "the test's own setup: the database is away");
    assert_eq!(granted, 2, "a local share of 4 over 2 workers");
    stop.cancel();
    let _ = listening.await;
}
