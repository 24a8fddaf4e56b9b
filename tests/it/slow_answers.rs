//! Answers the database did not take (a window's row held elsewhere past the statement's
//! `lock_timeout`, or every wait past the store's 2 s for a state call): they are written again
//! from the background instead of being dropped, so that a raised token count is not lost to a
//! slow moment.

use std::time::{Duration, SystemTime};

use fallback_worker::state::{Admission, Ask, ProviderState};

use crate::ledger_batching::{DEFAULT_POOL, release, store_at, until_waiting_on_locks};
use crate::review_finish::{tokens, used};
use crate::support::*;

/// A plain connection holding the lock of every window row of `scope`: a statement that
/// updates one of them waits until `release`.
async fn lock_windows(env: &TestEnv, scope: &str) -> sqlx::PgConnection {
    let mut locker = env.db().await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    let locked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM (SELECT 1 FROM quota_window WHERE scope = $1 FOR UPDATE) AS held")
            .bind(scope)
            .fetch_one(&mut locker)
            .await
            .unwrap();
    assert!(locked > 0, "no window of {scope} to lock");
    locker
}

/// A call asked 100 tokens and its answer reports 900: a raise, written before the job goes on.
/// The window's row is locked elsewhere, so the write gives up (its statement's lock wait, or
/// the store's patience) and the job goes on without it; then the lock is released. The answer
/// must still reach the window: 900, not the estimate of 100.
#[tokio::test]
async fn a_raised_count_the_database_was_too_slow_for_is_written_later() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let limits = [tokens(10_000, 3600)];
    let ask = Ask { provider: "a", limits: &limits, pools: &[], tokens: 100, flight: Duration::from_secs(30) };
    let Admission::Granted(call) = store.admit(ask, SystemTime::now()).await else { panic!("room for the call") };
    assert_eq!(used(&env, "provider", "a", "tokens").await, 100);
    let locker = lock_windows(&env, "a").await;
    let answered = {
        let store = store.clone();
        tokio::spawn(async move { store.finish(call, Some(900), SystemTime::now()).await })
    };
    until_waiting_on_locks(&env, 1).await;
    answered.await.unwrap();
    assert_eq!(used(&env, "provider", "a", "tokens").await, 100, "the write waits for the lock");
    release(locker).await;
    eventually("the window counts the answer's 900 tokens", || async {
        used(&env, "provider", "a", "tokens").await == 900
    })
    .await;
}
