//! Adversarial review, round 2, of the statement bound (a72cd3e, 6c19ba0, a6f16a8:
//! `statement_timeout = 1500ms` on the state pool, `StoreError::Cancelled`, and the run of
//! cancelled calls jobs wait on, 3+ over 4 s with nothing answered between, that takes the
//! database for down). Findings 3 and 4 are fixed; 1 was fixed later (session 30: a call given
//! up on in a batcher's queue counts as a timeout only when no batch has heard from the database
//! past the bound, `state/last_answer.rs`); 2 is a known gap that predates the bound, kept
//! `#[ignore]`d (README, docs/operations.md).

use std::time::{Duration, Instant, SystemTime};

use fallback_worker::state::{Admission, Ask, ProviderState, Receipt, ResultLedger};

use crate::credits::requests;
use crate::review_outage::store_behind_relay;
use crate::review_probe2::{HOLD, migrated};
use crate::statement_timeout::slow_statements;
use crate::support::*;

/// Every insert into `quota_use` (each granted admission's statement) takes 3 s while the flag
/// in `review2_slow` is set: a database too slow for any admission, switched on and off.
async fn slow_admissions_while_flagged(env: &TestEnv, on: bool) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE review2_slow (on_ boolean NOT NULL); INSERT INTO review2_slow VALUES ({on});"
    )))
    .execute(&mut env.db().await)
    .await
    .unwrap();
    let seconds = "CASE WHEN (SELECT on_ FROM review2_slow) THEN 3 ELSE 0 END";
    slow_statements(env, "review2_slow_insert", "BEFORE INSERT ON quota_use", seconds).await;
}

async fn set_slow(env: &TestEnv, on: bool) {
    sqlx::query("UPDATE review2_slow SET on_ = $1").bind(on).execute(&mut env.db().await).await.unwrap();
}

/// Watches `store.is_degraded()` every 20 ms while `work` runs (and `after` past its end).
async fn degraded_during<T>(
    store: &fallback_worker::state::postgres::PgStore,
    after: Duration,
    work: impl std::future::Future<Output = T>,
) -> (bool, T) {
    let done = std::sync::atomic::AtomicBool::new(false);
    let (went_down, out) = tokio::join!(
        async {
            let mut went_down = false;
            let mut until: Option<Instant> = None;
            loop {
                went_down |= store.is_degraded();
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    let end = *until.get_or_insert_with(|| Instant::now() + after);
                    if Instant::now() >= end {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            went_down
        },
        async {
            let out = work.await;
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            out
        }
    );
    (went_down, out)
}

/// Finding 1 (medium). The bound is below the worker's 2 s only for the statement itself: an
/// admission waits in the quota batcher behind the provider's batch in flight (one batch per
/// provider at a time), and its 2 s (`batched_call`'s deadline) start when it is queued. When a
/// provider's windows are busy, the batch in flight is cancelled at 1.5 s (a busy moment, the
/// run of cancellations starts), the asks that queued behind it go out in the next batch at
/// 1.5 s, and each of them is given up by the worker at 2 s after it was queued: three
/// "timeouts in a row", and the reachable database is taken for down within about 2.3 s, the
/// very path the statement bound was to close ("never towards taking the database for down"),
/// and sooner than the 4 s run of cancellations the change chose for "a database too slow".
/// Here the busy moment lasts 2.8 s in all and the second batch succeeds: the database answered
/// every statement within 1.5 s of its start.
#[tokio::test]
async fn a_busy_moment_shorter_than_the_cancelled_run_does_not_take_a_reachable_database_down() {
    let env = TestEnv::new().await;
    let store = migrated(&env.database_url, 4).await;
    let limits = [requests(1000)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let Admission::Granted(_) = store.admit(ask, SystemTime::now()).await else { panic!("not granted") };
    // Inserts wait until a moment set in the table: a busy moment that ends by itself.
    sqlx::query("CREATE TABLE review2_busy_until (until timestamptz)").execute(&mut env.db().await).await.unwrap();
    let seconds = "greatest(0, extract(epoch FROM (SELECT max(until) FROM review2_busy_until) - clock_timestamp()))";
    slow_statements(&env, "review2_busy", "BEFORE INSERT ON quota_use", seconds).await;
    sqlx::query("INSERT INTO review2_busy_until VALUES (clock_timestamp() + interval '2800 ms')")
        .execute(&mut env.db().await)
        .await
        .unwrap();
    let (went_down, outcomes) = degraded_during(&store, Duration::from_millis(300), async {
        let mut asks = Vec::new();
        for _ in 0..5 {
            let store = store.clone();
            asks.push(tokio::spawn(async move {
                let limits = [requests(1000)];
                let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
                format!("{:?}", store.admit(ask, SystemTime::now()).await)
            }));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut outcomes = Vec::new();
        for ask in asks {
            outcomes.push(ask.await.unwrap());
        }
        outcomes
    })
    .await;
    assert!(
        !went_down,
        "a 2.8 s busy moment on one provider's windows took the reachable database for down: {outcomes:#?}"
    );
}

/// Finding 2 (medium). Review 1's finding 4 ("a database too slow for any admission does not
/// hold limited calls back for good") is fixed only for a worker that makes no other state call:
/// the run of cancellations ends at any answer, and every job opens the result ledger
/// (`Worker::open_ledger`) before it asks for a slot. The ledger's table is not the slow one, so
/// each job's ledger call answers, ends the run, and the run never reaches three: the worker
/// stays out of degraded mode and every call of a limited provider is refused ("ask again
/// shortly") for as long as the database stays so, as before the fix. Here: five jobs, each as
/// the worker runs it (ledger, then admission), on the database of review 1's test.
#[tokio::test]
#[ignore = "known limitation (as with timeouts before the bound): any answered call, a ledger open included, ends the run; a database slow only for admissions while the ledger answers keeps the shared view and asks again every 2 s"]
async fn a_database_too_slow_for_any_admission_does_not_hold_limited_calls_back_when_jobs_use_the_ledger() {
    let env = TestEnv::new().await;
    let store = migrated(&env.database_url, 4).await;
    let limits = [requests(1000)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let Admission::Granted(_) = store.admit(ask, SystemTime::now()).await else { panic!("not granted") };
    slow_admissions_while_flagged(&env, true).await;
    let mut outcomes = Vec::new();
    for job in 0..5 {
        let opened = store.open(&format!("job-{job}"), "sha256:job", Receipt::Fresh).await;
        let admitted = store.admit(ask, SystemTime::now()).await;
        let granted = matches!(admitted, Admission::Granted(_));
        outcomes.push(format!("ledger {:?}, admission {admitted:?}", opened.map(|_| ())));
        if granted {
            break;
        }
    }
    assert!(
        store.is_degraded() || outcomes.last().is_some_and(|o| o.contains("admission Granted")),
        "five jobs on a database too slow to admit, none served: {outcomes:#?}"
    );
}

/// Finding 3 (low). A run of cancellations outlives an outage: only the run itself resets it
/// when it takes the database for down (`cancelled`), but an outage found otherwise (a lost
/// connection, timeouts in a row) leaves it as it was, and neither `recover` nor the calls of
/// degraded mode end it (they never reach `guarded`). After the database is back, the first
/// cancelled call completes the old run, "over" the whole outage, and takes the database for
/// down again at once: one slow statement, which "never counts as a timeout".
#[tokio::test]
async fn one_cancelled_call_after_an_outage_does_not_take_the_database_down_again() {
    let env = TestEnv::new().await;
    let (relay, store) = store_behind_relay(&env).await;
    let limits = [requests(1000)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let Admission::Granted(_) = store.admit(ask, SystemTime::now()).await else { panic!("not granted") };
    slow_admissions_while_flagged(&env, true).await;
    // Two admissions cancelled (1.5 s each): a run of two.
    for _ in 0..2 {
        let admitted = store.admit(ask, SystemTime::now()).await;
        assert!(matches!(admitted, Admission::OverQuota { .. }), "a cancelled admission: {admitted:?}");
    }
    assert!(!store.is_degraded(), "two cancellations alone");
    set_slow(&env, false).await;
    // The database goes away for a few seconds, then comes back.
    relay.set_down(true);
    let _ = store.admit(ask, SystemTime::now()).await;
    assert!(store.is_degraded(), "the outage was found");
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.set_down(false);
    eventually("the database is back", || async { !store.is_degraded() }).await;
    // One slow statement.
    set_slow(&env, true).await;
    let admitted = store.admit(ask, SystemTime::now()).await;
    assert!(
        !store.is_degraded(),
        "a single cancelled admission after the outage took the database for down again ({admitted:?})"
    );
}

/// Finding 4 (low). `Caller::Background` says a cancellation of a call nobody waits on
/// counts towards nothing, and answers' retries and releases are so; but the first write of an
/// answer, which the job does not wait for either (`finish` queues it and spawns the wait,
/// `end_credit` for a credit's lowering write), goes through `answer_of`, which counts every
/// cancellation as one a job waited on. Answers alone, over windows slow to update, take the
/// database for down while no job waits on anything.
#[tokio::test]
async fn answers_nobody_waits_on_do_not_take_the_database_down_when_cancelled() {
    let env = TestEnv::new().await;
    let store = migrated(&env.database_url, 4).await;
    let limits = [requests(1000)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let mut permits = Vec::new();
    for _ in 0..5 {
        let Admission::Granted(permit) = store.admit(ask, SystemTime::now()).await else { panic!("not granted") };
        assert!(permit.usage_id.is_some() && !permit.from_credit, "admitted by the database: {permit:?}");
        permits.push(permit);
    }
    slow_statements(&env, "review2_slow_update", "BEFORE UPDATE ON quota_use", "2.5").await;
    let (went_down, ()) = degraded_during(&store, Duration::from_secs(2), async {
        for permit in permits {
            // Answered as estimated: the job does not wait for the write (not written first).
            store.finish(permit, None, SystemTime::now()).await;
            tokio::time::sleep(Duration::from_millis(1600)).await;
        }
    })
    .await;
    assert!(!went_down, "answers no job waits on, cancelled, took the reachable database for down");
}
