//! Adversarial review, round 3, of 6ce9eac (quota_batcher: `Queues::release` failed every ask
//! queued behind an admission the database cancelled for its time). Both findings were
//! regressions, and 6ce9eac was reverted: these tests hold that queued asks with time left still
//! go out in the next batch, and that their grants end a run of cancellations. The gap 6ce9eac
//! aimed at stays (`review_stmt2::a_busy_moment_shorter_than_the_cancelled_run_...`, ignored).

use std::time::{Duration, SystemTime};

use fallback_worker::state::{Admission, Ask, ProviderState};

use crate::credits::requests;
use crate::review_probe2::{HOLD, migrated};
use crate::statement_timeout::slow_statements;
use crate::support::*;

/// Busy until `ms` from now (the database's clock), on every insert into `quota_use`.
async fn busy_for(env: &TestEnv, ms: u32, first: bool) {
    if first {
        sqlx::query("CREATE TABLE review3_busy_until (until timestamptz)").execute(&mut env.db().await).await.unwrap();
        let seconds =
            "greatest(0, extract(epoch FROM (SELECT max(until) FROM review3_busy_until) - clock_timestamp()))";
        slow_statements(env, "review3_busy", "BEFORE INSERT ON quota_use", seconds).await;
    }
    sqlx::query("INSERT INTO review3_busy_until VALUES (clock_timestamp() + make_interval(secs => $1::float8 / 1000))")
        .bind(f64::from(ms))
        .execute(&mut env.db().await)
        .await
        .unwrap();
}

/// Finding 1 (medium, utilization). The refusal is blanket: every ask queued behind the
/// cancelled batch is refused, however long it has waited. The commit's reason ("waiting for the
/// next batch would take them past their callers' bound") holds only for an ask queued more than
/// 0.5 s before the cancellation (2 s bound − 1.5 s statement bound); one queued later still has
/// room for a whole next statement. Here a busy moment of 1.8 s on one provider's windows: the
/// batch in flight is cancelled at 1.5 s; an ask queued at 1.0 s (1 s of its 2 s left) would go
/// out in the next batch at 1.5 s and be granted at 1.8 s, well within its bound, as before the
/// change. Now it is refused ("ask again shortly", `OverQuota` for 2 s): a short busy moment
/// refuses every call of the provider that arrived during it, sending those jobs elsewhere.
#[tokio::test]
async fn an_ask_queued_late_behind_a_cancelled_admission_with_time_left_is_still_admitted() {
    let env = TestEnv::new().await;
    let store = migrated(&env.database_url, 4).await;
    let limits = [requests(1000)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let Admission::Granted(_) = store.admit(ask, SystemTime::now()).await else { panic!("not granted") };
    busy_for(&env, 1800, true).await;
    let first = {
        let store = store.clone();
        tokio::spawn(async move {
            let limits = [requests(1000)];
            let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
            format!("{:?}", store.admit(ask, SystemTime::now()).await)
        })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let started = std::time::Instant::now();
    let late = store.admit(ask, SystemTime::now()).await;
    let took = started.elapsed();
    let first = first.await.unwrap();
    assert!(
        matches!(late, Admission::Granted(_)),
        "an ask queued 1 s into a 1.8 s busy moment, with 1 s of its bound left when the batch ahead \
         was cancelled, was refused after {took:?} instead of going out in the next batch: {late:?} \
         (the batch ahead: {first})"
    );
    assert!(!store.is_degraded(), "a reachable database taken for down");
}

/// Finding 2 (low-medium, spurious degraded mode). The refused asks count in the run of
/// cancellations where, before the change, the same asks went out in the next batch, were
/// granted, and so ended the run (`not_cancelled`). Three short busy moments (1.8 s each, 2.1 s
/// apart; the database answers every call within 1.8 s and grants each moment's late ask) now
/// chain into one run of cancelled calls from 1.5 s to 5.7 s: the reachable database is taken
/// for down and the worker goes to its local shares. Before 6ce9eac each moment's late ask was
/// granted and the run never passed one call.
#[tokio::test]
async fn short_busy_moments_whose_late_asks_would_be_granted_do_not_chain_into_a_cancelled_run() {
    let env = TestEnv::new().await;
    let store = migrated(&env.database_url, 4).await;
    let limits = [requests(1000)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let Admission::Granted(_) = store.admit(ask, SystemTime::now()).await else { panic!("not granted") };
    let start = tokio::time::Instant::now();
    let mut outcomes = Vec::new();
    for round in 0..3u32 {
        tokio::time::sleep_until(start + Duration::from_millis(2100 * u64::from(round))).await;
        busy_for(&env, 1800, round == 0).await;
        let first = {
            let store = store.clone();
            tokio::spawn(async move {
                let limits = [requests(1000)];
                let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
                format!("{:?}", store.admit(ask, SystemTime::now()).await)
            })
        };
        if round < 2 {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            outcomes.push(format!("round {round} late ask: {:?}", store.admit(ask, SystemTime::now()).await));
        }
        outcomes.push(format!("round {round} first ask: {}", first.await.unwrap()));
    }
    assert!(
        !store.is_degraded(),
        "three 1.8 s busy moments, each late ask grantable, took the reachable database for down: {outcomes:#?}"
    );
}
