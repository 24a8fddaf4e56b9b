//! One answer's rate-limit headers correct every window they speak of in one statement
//! (`fallback_observe_batch`, migration 0014): each window learns what its own figure says.

use std::time::{Duration, SystemTime};

use fallback_worker::config::{LimitConfig, QuotaPoolConfig};
use fallback_worker::routing::QuotaObservation;
use fallback_worker::state::{Admission, Ask, ProviderState, QuotaMeasure};

use crate::ledger_batching::{DEFAULT_POOL, store_at};
use crate::review_finish::{tokens, used};
use crate::support::*;

fn requests(n: u64, secs: u64) -> LimitConfig {
    LimitConfig { requests: Some(n), tokens: None, per: Duration::from_secs(secs), resets: None }
}

fn seen(measure: QuotaMeasure, remaining: u64, limit: u64, resets_in: u64) -> QuotaObservation {
    QuotaObservation {
        measure,
        remaining,
        limit: Some(limit),
        resets_at: Some(SystemTime::now() + Duration::from_secs(resets_in)),
        window: None,
    }
}

/// When the learnt row of `scope`'s `measure` window leaves, in seconds from now (rounded).
async fn learnt_leaves_in(env: &TestEnv, scope: &str, measure: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT round(extract(epoch FROM leaves_at - now()))::bigint FROM quota_use \
         WHERE learnt AND scope = $1 AND measure = $2",
    )
    .bind(scope)
    .bind(measure)
    .fetch_one(&mut env.db().await)
    .await
    .unwrap()
}

/// A provider with a day of requests and a minute of tokens, behind an account pool with its
/// own minute of requests: one answer's headers speak of all three (as Groq's and OpenRouter's
/// do). Each window learns its own figure and keeps it until its own reset, whatever order
/// the windows are listed or locked in.
#[tokio::test]
async fn every_window_an_answer_speaks_of_learns_its_own_figure_until_its_own_reset() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let own = [requests(1000, 86_400), tokens(60_000, 60)];
    let pools = [QuotaPoolConfig { name: "account".into(), limits: vec![requests(300, 60)] }];
    let ask = Ask { provider: "p", limits: &own, pools: &pools, tokens: 100, flight: Duration::from_secs(30) };
    let Admission::Granted(call) = store.admit(ask, SystemTime::now()).await else { panic!("room for the call") };
    store.finish_written(call.clone(), Some(100), SystemTime::now()).await;
    // The provider took 41 requests today, 5100 tokens this minute, 12 requests of the account.
    let headers = [
        seen(QuotaMeasure::Requests, 959, 1000, 3000),
        seen(QuotaMeasure::Tokens, 54_900, 60_000, 40),
        seen(QuotaMeasure::Requests, 288, 300, 20),
    ];
    store.observe_quota(ask, &call, &headers, SystemTime::now()).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 41);
    assert_eq!(used(&env, "provider", "p", "tokens").await, 5100);
    assert_eq!(used(&env, "pool", "account", "requests").await, 12);
    assert!((2998..=3000).contains(&learnt_leaves_in(&env, "p", "requests").await));
    assert!((38..=40).contains(&learnt_leaves_in(&env, "p", "tokens").await));
    assert!((18..=20).contains(&learnt_leaves_in(&env, "account", "requests").await));
}
